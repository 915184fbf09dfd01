"""This project's own weights file: an uncompressed .npz with one float32 array per parameter, keyed by its path in
the model's parameter tree ('backbone/conv1_1/kernel', 'fusion/hidden/kernel'); for a model with non-parameter
state, by its path in the model's variables ('params/backbone/...', 'batch_stats/backbone/...'). Files written
before the fusion head was stored have backbone keys only, as '<layer>/<kernel|bias>'; they still read."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from scaleattn.weights import sources

PARTS = ("backbone", "fusion")
COLLECTIONS = ("params", "batch_stats")  # the variables a model with non-parameter state stores


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + "/"))
    else:
      flat[path] = np.asarray(value)
  return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _is_legacy(names: set[str]) -> bool:
  return "conv1_1/kernel" in names and all(n.count("/") == 1 and n.endswith(("/kernel", "/bias")) for n in names)


def _in_tree(name: str) -> bool:
  parts = name.split("/")
  return len(parts) > 1 and (parts[0] in PARTS or (parts[0] in COLLECTIONS and len(parts) > 2 and parts[1] in PARTS))


def matches(names: set[str]) -> bool:
  return bool(names) and (all(_in_tree(n) for n in names) or _is_legacy(names))


def convert(state: Mapping[str, np.ndarray], *, source: str, mean_rgb: Sequence[float], **_: Any) -> dict[str, Any]:
  """The stored tree as it is: its first layer was rewritten for the pipeline's input when it was converted."""
  del source, mean_rgb
  flat = {k: np.asarray(v, np.float32) for k, v in state.items()}
  if _is_legacy(set(flat)):
    flat = {f"backbone/{k}": v for k, v in flat.items()}
  return unflatten(flat)


def save(path: str, tree: Mapping[str, Any]) -> None:
  """Writes `tree` whole or not at all: to a temporary name beside `path`, renamed once complete."""
  path_ = epath.Path(path)
  path_.parent.mkdir(parents=True, exist_ok=True)
  tmp = path_.parent / (path_.name + ".tmp")
  try:
    with tmp.open("wb") as f:
      np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flatten(tree).items()})
    tmp.replace(path_)
  finally:
    if tmp.exists():
      tmp.unlink()


LAYOUT = sources.register(sources.Layout(
    name="scaleattn", description="this project's .npz ('backbone/<layer>/<kernel|bias>', 'fusion/...')",
    matches=matches, convert=convert, input_order="rgb"))
