"""Checks a run's config before anything is built or compiled, so a typo costs one clear message,
not a stack trace ten minutes into a run."""
from __future__ import annotations

from collections.abc import Sequence

import ml_collections

OUTPUT_STRIDE = 8
_CHOICES = {
    "model.fusion": ("attention", "average", "max"),
    "model.scale_execution": ("loop", "vmap"),
    "model.dtype": ("float32", "bfloat16"),
    "loss.per_scale_grid": ("output", "native"),
    "optim.name": ("sgd", "adam"),
    "optim.schedule": ("step", "poly", "cosine", "constant"),
    "train.on_nonfinite": ("raise", "skip"),
}


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field, the value and what was expected."""


def _get(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict, *, num_data_devices: int, process_count: int = 1) -> None:
  """Raises ConfigError listing every problem found in `config`."""
  problems = []
  for field, choices in _CHOICES.items():
    if _get(config, field) not in choices:
      problems.append(f"config.{field}={_get(config, field)!r}: expected one of {choices}")

  scales: Sequence[float] = tuple(config.model.scales)
  if not scales or any(not s > 0 for s in scales):
    problems.append(f"config.model.scales={scales!r}: expected a non-empty tuple of positive scales")
  elif scales[0] != 1.0:
    problems.append(f"config.model.scales={scales!r}: the first scale must be 1.0 (it sets the output grid)")
  elif len(set(scales)) != len(scales):
    problems.append(f"config.model.scales={scales!r}: scales must be distinct")
  weights = config.loss.scale_weights
  if weights is not None and len(weights) != len(scales):
    problems.append(f"config.loss.scale_weights={weights!r}: expected one weight per scale ({len(scales)})")

  crop = config.input.crop_size
  if crop < OUTPUT_STRIDE:
    problems.append(f"config.input.crop_size={crop}: expected at least the output stride {OUTPUT_STRIDE}")
  if config.input.eval_size < OUTPUT_STRIDE:
    problems.append(f"config.input.eval_size={config.input.eval_size}: expected at least {OUTPUT_STRIDE}")
  lo, hi = config.input.random_scale
  if not 0 < lo <= hi:
    problems.append(f"config.input.random_scale={(lo, hi)}: expected 0 < min <= max")
  if config.model.num_classes < 2:
    problems.append(f"config.model.num_classes={config.model.num_classes}: expected at least 2")

  for field in ("train.batch_size", "eval.batch_size"):
    size = _get(config, field)
    if size < 1 or size % num_data_devices or size % process_count:
      problems.append(f"config.{field}={size}: expected a positive multiple of the {num_data_devices} "
                      f"data-parallel devices and of the {process_count} processes")
  for field in ("train.num_steps", "train.log_every_steps", "train.eval_every_steps",
                "train.checkpoint_every_steps", "train.keep_checkpoints"):
    if _get(config, field) < 1:
      problems.append(f"config.{field}={_get(config, field)}: expected a positive integer")
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


def check_num_classes(config: ml_collections.ConfigDict, class_names: Sequence[str]) -> None:
  if config.model.num_classes != len(class_names):
    raise ConfigError(f"config.model.num_classes={config.model.num_classes} disagrees with dataset "
                      f"{config.dataset.name!r}, which has {len(class_names)} classes {tuple(class_names)}")
