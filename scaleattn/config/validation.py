"""Checks a run's config before anything is built or compiled, so a typo costs one clear message, not a stack
trace ten minutes into a run. The choices come from the modules that own them."""
from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from scaleattn.models import layers, multiscale, registry
from scaleattn.training import losses, optimizers

ON_NONFINITE = ("raise", "skip")
ON_BAD_RECORD = ("raise", "skip")


def _choices() -> dict[str, tuple]:
  """Each field's allowed values, read when validating (a backbone or fusion registered after import counts)."""
  return {
      "model.backbone.name": tuple(registry.BACKBONES),
      "model.fusion.name": tuple(registry.FUSIONS),
      "model.fusion_input": multiscale.FUSION_INPUTS,
      "model.scale_execution": multiscale.SCALE_EXECUTIONS,
      "model.dtype": tuple(registry.DTYPES),
      "model.conv_impl": layers.CONV_IMPLS,
      "model.remat": tuple(multiscale.REMAT_POLICIES),
      "loss.per_scale_grid": losses.PER_SCALE_GRIDS,
      "optim.name": optimizers.OPTIMIZERS,
      "optim.schedule": optimizers.SCHEDULES,
      "train.on_nonfinite": ON_NONFINITE,
      "input.on_bad_record": ON_BAD_RECORD,
  }


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field, the value and what was expected."""


def _get(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def _module_settings(sub: ml_collections.ConfigDict, field: str, factories: dict) -> list[str]:
  """Problems with the keywords a registry sub-config passes to its factory."""
  if sub.name not in factories:
    return []
  allowed = registry.options(factories[sub.name])
  return [f"config.{field}.{key}: not a setting of {field.split('.')[-1]} {sub.name!r} (it takes {allowed})"
          for key in sub if key != "name" and key not in allowed]


def _scale_problems(field: str, scales: Sequence[float], execution: str) -> list[str]:
  if not scales or any(not s > 0 for s in scales):
    return [f"config.{field}={scales!r}: expected a non-empty tuple of positive scales"]
  if 1.0 not in scales:
    return [f"config.{field}={scales!r}: 1.0 must be among the scales (it sets the output grid)"]
  if len(set(scales)) != len(scales):
    return [f"config.{field}={scales!r}: scales must be distinct"]
  if execution == "vmap" and max(scales) > 1.0:
    return [f"config.{field}={scales!r}: config.model.scale_execution='vmap' needs every scale <= 1; use 'loop'"]
  return []


def _output_stride(model: ml_collections.ConfigDict) -> int:
  """The configured backbone's output stride (8 where the backbone cannot be built: its problems are listed
  apart)."""
  try:
    return registry.build_backbone(model).output_stride
  except (KeyError, TypeError, ValueError):
    return 8


def _divisors(n: int) -> tuple[int, ...]:
  return tuple(d for d in range(1, n + 1) if n % d == 0)


def validate(config: ml_collections.ConfigDict, *, num_data_devices: int, process_count: int = 1) -> None:
  """Raises ConfigError listing every problem found in `config` for a run over `num_data_devices` devices."""
  problems = []
  for field, choices in _choices().items():
    if _get(config, field) not in choices:
      problems.append(f"config.{field}={_get(config, field)!r}: expected one of {choices}")
  problems += _module_settings(config.model.backbone, "model.backbone", registry.BACKBONES)
  problems += _module_settings(config.model.fusion, "model.fusion", registry.FUSIONS)

  scales: Sequence[float] = tuple(config.model.scales)
  problems += _scale_problems("model.scales", scales, config.model.scale_execution)
  eval_scales = tuple(config.eval.scales)
  if eval_scales:
    problems += _scale_problems("eval.scales", eval_scales, config.model.scale_execution)
    fusion = config.model.fusion.name
    parameter_free = tuple(n for n, cls in registry.FUSIONS.items() if cls.parameter_free)
    scale_agnostic = tuple(n for n, cls in registry.FUSIONS.items() if cls.scale_agnostic)
    single = len(scales) == 1 and fusion not in parameter_free
    if len(eval_scales) > 1 and (single or (fusion not in scale_agnostic and eval_scales != scales)):
      can = parameter_free if single else scale_agnostic
      problems.append(f"config.eval.scales={eval_scales!r}: a model trained on config.model.scales={scales!r} with "
                      f"fusion {fusion!r} runs only on those scales; fusions that run on another set: {can}")
  weights = config.loss.scale_weights
  if weights is not None and len(weights) != len(scales):
    problems.append(f"config.loss.scale_weights={weights!r}: expected one weight per scale ({len(scales)})")

  stride = _output_stride(config.model)
  crop = config.input.crop_size
  if crop < stride:
    problems.append(f"config.input.crop_size={crop}: expected at least the output stride {stride}")
  if config.input.eval_size < stride:
    problems.append(f"config.input.eval_size={config.input.eval_size}: expected at least {stride}")
  lo, hi = config.input.random_scale
  if not 0 < lo <= hi:
    problems.append(f"config.input.random_scale={(lo, hi)}: expected 0 < min <= max")
  if config.model.num_classes is None:  # configs/folder.py reads it from the folder
    problems.append("config.model.num_classes=None: expected at least 2; a folder dataset counts its classes in "
                    "config.dataset.manual_dir, which is not set")
  elif config.model.num_classes < 2:
    problems.append(f"config.model.num_classes={config.model.num_classes}: expected at least 2")

  tile, overlap = config.eval.tile_size, config.eval.tile_overlap
  if tile and tile < stride:
    problems.append(f"config.eval.tile_size={tile}: expected 0 (whole images) or at least the output stride "
                    f"{stride}")
  if overlap is not None and (overlap < 0 or (tile and overlap >= tile)):
    problems.append(f"config.eval.tile_overlap={overlap}: expected 0 <= overlap < config.eval.tile_size={tile}")
  if config.eval.tiles_per_step < 1:
    problems.append(f"config.eval.tiles_per_step={config.eval.tiles_per_step}: expected a positive integer")
  step_s, first_s = config.train.step_timeout_seconds, config.train.first_steps_timeout_seconds
  if step_s < 0 or first_s < step_s:
    problems.append(f"config.train.step_timeout_seconds={step_s}, first_steps_timeout_seconds={first_s}: expected "
                    "0 <= step_timeout_seconds <= first_steps_timeout_seconds (0: no watchdog)")
  if config.eval.memory_budget_gb < 0:
    problems.append(f"config.eval.memory_budget_gb={config.eval.memory_budget_gb}: expected 0 (no budget) or a "
                    "positive number of GB per device")
  for field in ("train.batch_size", "eval.batch_size"):
    if _get(config, field) < 1:
      problems.append(f"config.{field}={_get(config, field)}: expected a positive integer")
  batch, k = config.train.batch_size, config.train.microbatches
  if batch >= 1 and (k < 1 or batch % k):
    problems.append(f"config.train.microbatches={k}: expected a divisor of config.train.batch_size={batch}, one "
                    f"of {_divisors(batch)}")
  if num_data_devices % process_count:
    problems.append(f"config.mesh.data={config.mesh.data}: {num_data_devices} data-parallel devices cannot be split "
                    f"evenly over {process_count} processes")
  for field in ("train.num_steps", "train.log_every_steps", "train.eval_every_steps",
                "train.checkpoint_every_steps", "train.keep_checkpoints"):
    if _get(config, field) < 1:
      problems.append(f"config.{field}={_get(config, field)}: expected a positive integer")
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


def check_num_classes(config: ml_collections.ConfigDict, class_names: Sequence[str]) -> None:
  """The model and the dataset config count the dataset's classes."""
  for field in ("dataset.num_classes", "model.num_classes"):
    if _get(config, field) != len(class_names):
      raise ConfigError(f"config.{field}={_get(config, field)} disagrees with dataset {config.dataset.name!r}, "
                        f"which has {len(class_names)} classes {tuple(class_names)}")
