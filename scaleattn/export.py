"""A trained model as one file for inference: its parameters and the resolved config, without optimizer state.

  python -m scaleattn.export --workdir=W --out=model.msgpack            # latest checkpoint (or --step=N)
  python -m scaleattn.main --exported=model.msgpack --workdir=W2 --mode=predict --inputs=img.jpg

File format: flax msgpack (`flax.serialization.msgpack_serialize`) of a dict
  {'format': 'scaleattn.export', 'version': 2, 'config_json': the ConfigDict as JSON, 'params': the MultiScaleNet
   parameter tree of float32 arrays ({'backbone': ..., 'fusion': ...})}.
JSON has no tuples, so `config_from_json` turns every list back into a tuple (the configs use tuples only).
Version 1 files (and workdirs' config.json from before `config.model` had backbone and fusion sub-configs) are
read too: `upgrade_config` moves their model fields into today's layout; the parameter tree is the same.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import serialization, traverse_util

from scaleattn import checkpointing, models
from scaleattn.state import build_experiment

FORMAT, VERSION = "scaleattn.export", 2  # 2: config.model with backbone and fusion sub-configs
READABLE_VERSIONS = (1, 2)
_V1_BACKBONE_FIELDS = ("block_widths", "block_depths", "fc_width", "conv5_dilation", "fc6_dilation", "dropout_rate")


def config_to_json(config: ml_collections.ConfigDict) -> str:
  try:
    return config.to_json(sort_keys=True)
  except TypeError as e:
    raise TypeError(f"the config has a value that JSON cannot hold, so it cannot be exported: {e}") from e


def _tuples(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def upgrade_config(raw: dict) -> dict:
  """A config dict from before `config.model` had backbone and fusion sub-configs, in today's layout (the fields
  added since take the values that reproduce the old behaviour); a current one is returned unchanged."""
  model = raw.get("model", {})
  if not isinstance(model.get("fusion"), str):
    return raw
  model["backbone"] = {"name": "largefov", **{k: model.pop(k) for k in _V1_BACKBONE_FIELDS if k in model},
                       "fc8_init_std": None}
  model["fusion"] = {"name": model["fusion"], "hidden": model.pop("attention_hidden"),
                     "dropout_rate": model.pop("attention_dropout")}
  model.setdefault("conv_impl", "auto")
  model.setdefault("remat", "none")
  raw.get("loss", {}).pop("ignore_label", None)
  raw.setdefault("train", {}).setdefault("microbatches", 1)
  raw.setdefault("eval", {}).setdefault("crf", {"enabled": False})
  return raw


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """The ConfigDict written by `config_to_json` (or a run's config.json), tuples restored, upgraded to today's
  layout if older."""
  return ml_collections.ConfigDict(_tuples(upgrade_config(json.loads(text))))


def check_params(params: Any, model_config: ml_collections.ConfigDict, source: str) -> None:
  """Raises ValueError unless `params` has exactly the names and shapes `build_model(model_config)` creates."""
  model = models.build_model(model_config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False)["params"])
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  problems = [f"{k}: missing (config expects {s})" for k, s in want.items() if k not in got]
  problems += [f"{k}: not a parameter of the configured model" for k in got if k not in want]
  problems += [f"{k}: config expects {want[k]}, got {s}" for k, s in got.items() if k in want and want[k] != s]
  if problems:
    raise ValueError(f"{source}: parameters do not match config.model:\n  " + "\n  ".join(sorted(problems)))


def export_model(path: str, params: Any, config: ml_collections.ConfigDict) -> None:
  """Writes `params` (checked against `config.model`) and `config` to `path` (temporary name, then renamed)."""
  params = jax.device_get(params)
  check_params(params, config.model, f"export to {path}")
  payload = {"format": FORMAT, "version": VERSION, "config_json": config_to_json(config),
             "params": jax.tree.map(np.asarray, params)}
  path_ = epath.Path(path)
  path_.parent.mkdir(parents=True, exist_ok=True)
  tmp = path_.parent / (path_.name + ".tmp")
  tmp.write_bytes(serialization.msgpack_serialize(payload))
  tmp.replace(path_)


def load_exported(path: str) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
  """(params as NumPy arrays, config) from a file written by `export_model`."""
  path_ = epath.Path(path)
  if not path_.exists():
    raise FileNotFoundError(f"exported model {path}: no such file")
  try:
    payload = serialization.msgpack_restore(path_.read_bytes())
  except Exception as e:  # noqa: BLE001 - msgpack raises several types for a file that is not msgpack.
    raise ValueError(f"{path}: not an exported scaleattn model ({type(e).__name__}: {e})") from e
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    raise ValueError(f"{path}: not an exported scaleattn model (no format tag {FORMAT!r})")
  if payload.get("version") not in READABLE_VERSIONS:
    raise ValueError(f"{path}: export format version {payload.get('version')}, this code reads {READABLE_VERSIONS}")
  return payload["params"], config_from_json(payload["config_json"])


def export_workdir(workdir: str, out: str, step: int | None = None) -> int:
  """Exports a training run's checkpoint (latest, or `step`) with the run's config.json; returns the step."""
  config_path = epath.Path(workdir) / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path}: no such file; is {workdir} a training workdir?")
  config = config_from_json(config_path.read_text())
  params, restored_step = checkpointing.restore_params(workdir, config.train, build_experiment(config).abstract_state,
                                                       step)
  export_model(out, params, config)
  return restored_step


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m scaleattn.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="training workdir (its config.json and checkpoints/)")
  parser.add_argument("--out", required=True, help="the exported file, e.g. model.msgpack")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  args = parser.parse_args(argv)
  step = export_workdir(args.workdir, args.out, args.step)
  print(f"Exported step {step} of {args.workdir} to {args.out}")


if __name__ == "__main__":
  main()
