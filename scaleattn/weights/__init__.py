"""Weights from elsewhere: readers for PyTorch, safetensors, Caffe and this project's .npz files (none needs the
framework that wrote them), the layouts that turn them into this project's parameters (`sources`), named
downloadable sources (`named`), and `load_init`, which puts any of them into a freshly initialised model.

  params = weights.load_init(config.init_from, params, mean_rgb=config.input.mean_rgb)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from scaleattn.weights import named, resnet, sources, tree, vgg  # noqa: F401 - importing registers the layouts.
from scaleattn.weights.sources import Layout, convert_file, read_any, register

__all__ = ["Layout", "convert_file", "load_init", "merge", "read_any", "register", "resolve"]


def resolve(source: str, *, fetch: named.Fetcher | None = None) -> str:
  """A local path for `source`: named weights ('imagenet:vgg16') are fetched once into the cache; a path is kept."""
  if named.is_named(source):
    return named.resolve(source, **({"fetch": fetch} if fetch else {}))
  return source


def _shape_problems(target: Mapping[str, Any], loaded: Mapping[str, Any], prefix: str) -> list[str]:
  flat_target, flat_loaded = tree.flatten(target), tree.flatten(loaded)
  problems = [f"{prefix}/{k}: the model has no such parameter" for k in flat_loaded if k not in flat_target]
  problems += [f"{prefix}/{k}: model expects {flat_target[k].shape}, got {v.shape}" for k, v in flat_loaded.items()
               if k in flat_target and flat_target[k].shape != v.shape]
  return problems


def _cast_like(target: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
  """`target` with the leaves of `loaded` put in (same dtypes as target)."""
  out = dict(target)
  for key, value in loaded.items():
    out[key] = _cast_like(target[key], value) if isinstance(value, Mapping) else np.asarray(
        value, np.asarray(target[key]).dtype)
  return out


def merge(params: Mapping[str, Any], loaded: Mapping[str, Any], *, source: str) -> dict[str, Any]:
  """`params` (a MultiScaleNet tree: 'backbone', 'fusion') with `loaded`'s arrays put in.

  Backbone arrays must fit (all mismatches are reported at once), except fc8, which is skipped with a log line when
  only its class count differs. A fusion head is taken when the source has one that fits, otherwise it keeps its
  initialiser (logged). The input tree is left alone.
  """
  if "backbone" not in params:
    raise ValueError(f"{source}: expected a MultiScaleNet parameter tree with 'backbone', got keys {list(params)}")
  backbone = dict(loaded.get("backbone", {}))
  fc8, model_fc8 = backbone.get("fc8"), params["backbone"].get("fc8")
  if fc8 is not None and model_fc8 is not None and np.shape(fc8["kernel"])[:-1] == np.shape(model_fc8["kernel"])[:-1] \
      and np.shape(fc8["kernel"])[-1] != np.shape(model_fc8["kernel"])[-1]:
    logging.info("%s: fc8 has %d classes, the model %d; fc8 keeps its initialiser.", source,
                 np.shape(fc8["kernel"])[-1], np.shape(model_fc8["kernel"])[-1])
    del backbone["fc8"]
  problems = [f"backbone/{layer}: the model's backbone has no such layer (it has {', '.join(params['backbone'])})"
              for layer in backbone if layer not in params["backbone"]]
  problems += _shape_problems({k: params["backbone"][k] for k in backbone if k in params["backbone"]},
                              {k: v for k, v in backbone.items() if k in params["backbone"]}, "backbone")
  if problems:
    raise ValueError(f"{source} does not fit the model (VGG-16 sources fit config.model.backbone.block_widths=(64, "
                     "128, 256, 512, 512), block_depths=(2, 2, 3, 3, 3), fc_width=1024):\n  " + "\n  ".join(problems))
  merged = {**params, "backbone": _cast_like(params["backbone"], backbone)}
  fusion = loaded.get("fusion")
  if fusion and "fusion" in params:
    if fusion_problems := _shape_problems(params["fusion"], fusion, "fusion"):
      logging.warning("%s: its fusion head does not fit the model's (%s); the fusion head keeps its initialiser.",
                      source, "; ".join(fusion_problems))
    else:
      merged["fusion"] = _cast_like(params["fusion"], fusion)
  kept = [layer for layer in params["backbone"] if layer not in backbone]
  logging.info("%s: loaded backbone layers %s; keeping their initialisation: %s; fusion head %s.", source,
               ", ".join(backbone) or "none", ", ".join(kept) or "none",
               "loaded" if merged.get("fusion") is not params.get("fusion") else "initialised")
  return merged


def load_init(source: str, weights: Mapping[str, Any], *, mean_rgb: Sequence[float],
              options: Mapping[str, Any] | None = None, fetch: named.Fetcher | None = None) -> dict[str, Any]:
  """`weights` (host NumPy arrays of a fresh MultiScaleNet: its parameter tree, or its variables when the model has
  non-parameter state) initialised from `source`: a recognised weights file (any layout in `sources`, converted on
  the fly) or named weights ('imagenet:vgg16', fetched once). `mean_rgb` is config.input.mean_rgb; `options` what
  the backbone's converters need (`backbone.weight_options()`: fc6/fc7 width, stride layout). Returns the same
  kind of tree as `weights`; a source's non-parameter state (BatchNorm statistics) replaces the model's, which it
  must fit exactly."""
  path = resolve(source, fetch=fetch)
  _, loaded = convert_file(path, mean_rgb=mean_rgb, **(options or {}))
  if "params" not in weights:
    if "params" in loaded:
      raise ValueError(f"{source}: holds {sorted(loaded)}, variables of a model with non-parameter state; the model "
                       "has parameters only")
    return merge(weights, loaded, source=source)
  state = {k: v for k, v in weights.items() if k != "params"}
  loaded_params = loaded["params"] if "params" in loaded else loaded
  loaded_state = {k: v for k, v in loaded.items() if k != "params"} if "params" in loaded else {}
  for collection, tree_ in loaded_state.items():
    if collection not in state:
      raise ValueError(f"{source}: has {collection!r}, which the model does not")
    if problems := _shape_problems(state[collection], tree_, collection):
      raise ValueError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    state[collection] = _cast_like(state[collection], tree_)
  return {"params": merge(weights["params"], loaded_params, source=source), **state}
