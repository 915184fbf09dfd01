"""The evaluators a run lists in `config.eval.evaluators`, registered by name: the training loop calls each one at
every evaluation step and once at the end, without knowing what it measures (big_vision's evaluator list)."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import jax
import numpy as np
from clu import metric_writers

from scaleattn.config.validation import ConfigError
from scaleattn.data.input_pipeline import Datasets
from scaleattn.evaluation import panels, segmentation
from scaleattn.experiment import Experiment

Watch = Callable[[Iterable], Iterable]  # wraps the batches of an evaluation (the loop's watchdog beats on each)


def unwatched(items: Iterable) -> Iterable:
  return items


class Evaluator(Protocol):
  def __call__(self, params: Any, step: int, writer: metric_writers.MetricWriter, watch: Watch = unwatched
               ) -> dict[str, Any]:
    """Evaluates `params` at `step`, writes what it measured, returns the scalars and arrays it measured."""

  def finish(self, params: Any, workdir: str) -> None:
    """Once, after the last step: files for the workdir."""


class Segmentation:
  """mIoU, per-class IoU, pixel accuracy and the by-size statistics on config.dataset.eval_split."""

  def __init__(self, exp: Experiment, data: Datasets):
    self.exp, self.data, self.split = exp, data, exp.config.dataset.eval_split
    self.step_fn = segmentation.jit_eval_step(exp)

  def __call__(self, params: Any, step: int, writer: metric_writers.MetricWriter, watch: Watch = unwatched
               ) -> dict[str, Any]:
    result = segmentation.evaluate_split(self.step_fn, params, self.exp, watch(self.data.eval_batches(self.split)),
                                         self.data.num_eval_batches(self.split), self.data.class_names,
                                         desc=self.split)
    writer.write_scalars(step, {f"{self.split}/{k}": v for k, v in result.items() if np.isscalar(v)})
    return result

  def finish(self, params: Any, workdir: str) -> None:
    del params, workdir


class Panels:
  """The first config.eval.num_examples validation images as panels: TensorBoard images at every evaluation, and
  files in WORKDIR/examples at the end (process 0 only)."""

  def __init__(self, exp: Experiment, data: Datasets):
    self.exp, self.data, self.split = exp, data, exp.config.dataset.eval_split
    self.count = exp.config.eval.num_examples if jax.process_index() == 0 else 0

  def _batch(self) -> dict[str, np.ndarray]:
    return next(iter(self.data.eval_batches(self.split)))

  def __call__(self, params: Any, step: int, writer: metric_writers.MetricWriter, watch: Watch = unwatched
               ) -> dict[str, Any]:
    del watch  # one batch
    if self.count:
      writer.write_images(step, panels.eval_panels(self.exp, params, self._batch(), self.count, self.split))
    return {}

  def finish(self, params: Any, workdir: str) -> None:
    if self.count:
      panels.save_eval_examples(self.exp, jax.device_get(params), self._batch(), os.path.join(workdir, "examples"),
                                self.count)


EVALUATORS: dict[str, type] = {"segmentation": Segmentation, "panels": Panels}


def build(exp: Experiment, data: Datasets) -> list[Evaluator]:
  """The evaluators config.eval.evaluators names, in order."""
  names = tuple(exp.config.eval.evaluators)
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown:
    raise ConfigError(f"config.eval.evaluators={names!r}: unknown {unknown}; expected names from "
                      f"{tuple(EVALUATORS)}")
  return [EVALUATORS[n](exp, data) for n in names]
