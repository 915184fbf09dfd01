"""Configs as JSON and back: what a workdir's config.json and an exported model hold. Configs written by earlier
versions are read into today's layout (`upgrade_config`), so old runs and files stay usable."""
from __future__ import annotations

import json
from typing import Any

import ml_collections

from scaleattn.config import defaults

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


def _fill_missing(raw: dict, defaults: dict) -> dict:
  """Fields added to the defaults since `raw` was written take their defaults (which keep a new feature off)."""
  for key, value in defaults.items():
    if key not in raw:
      raw[key] = value
    elif isinstance(value, dict) and isinstance(raw[key], dict):
      _fill_missing(raw[key], value)
  return raw


def upgrade_config(raw: dict) -> dict:
  """A config dict from before `config.model` had backbone and fusion sub-configs, in today's layout (the fields
  added since take the values that reproduce the old behaviour); one of today's layout gets the fields added to
  the defaults since it was written, at their defaults."""
  model = raw.get("model", {})
  if not isinstance(model.get("fusion"), str):
    return _fill_missing(raw, defaults.get_config().to_dict())
  model["backbone"] = {"name": "largefov", **{k: model.pop(k) for k in _V1_BACKBONE_FIELDS if k in model},
                       "fc8_init_std": None}
  model["fusion"] = {"name": model["fusion"], "hidden": model.pop("attention_hidden"),
                     "dropout_rate": model.pop("attention_dropout")}
  raw.get("loss", {}).pop("ignore_label", None)
  return _fill_missing(raw, defaults.get_config().to_dict())


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """The ConfigDict written by `config_to_json` (or a run's config.json), tuples restored, upgraded to today's
  layout if older."""
  return ml_collections.ConfigDict(_tuples(upgrade_config(json.loads(text))))
