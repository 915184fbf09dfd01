"""The training loop: data, the jitted steps, clu metrics and hooks, periodic evaluation, Orbax checkpoints.

`train_and_evaluate(config, workdir)` is the whole training run; tests and notebooks call it directly.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from scaleattn import checkpointing, convert, evaluate, input_pipeline, losses, predict, sharding, steps
from scaleattn.state import Experiment, TrainState, build_experiment


class SigtermFlag:
  """Turns SIGTERM into a flag the loop polls, so the current step can be checkpointed before exiting."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread (e.g. a notebook worker): rely on Orbax's policy only.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class NonFiniteError(FloatingPointError):
  """A training step produced a non-finite loss or gradient."""


class Preempted(Exception):
  """SIGTERM (or the cluster's preemption notice) stopped training after checkpointing `step`; rerun to resume."""

  def __init__(self, step: int):
    super().__init__(f"preempted: checkpoint at step {step} written; run again to resume")
    self.step = step


def raise_nonfinite(step: int, window: Mapping[str, float]) -> None:
  """The error for a withheld update at `step`; `window` holds the logged averages over the steps around it."""
  bad = sorted(k for k, v in window.items() if k.startswith("loss") and not np.isfinite(v))
  what = ", ".join(bad) if bad else "the gradient (grad_norm)"
  raise NonFiniteError(f"Non-finite values at step {step}: {what}. The update was not applied; the last checkpoint "
                       "is intact. Set config.train.on_nonfinite='skip' to skip such steps instead.")


def initial_state(exp: Experiment, ckpts: checkpointing.Checkpoints) -> TrainState:
  """Resume from the workdir if it has a checkpoint, else start from `init_from` (converted VGG-16) or scratch."""
  state = ckpts.restore(exp.abstract_state, resume=True)
  if state is not None:
    logging.info("Resumed from step %d in %s.", int(state.step), ckpts.directory)
    return state
  state = exp.init_state(jax.random.key(exp.config.seed))
  path = exp.config.init_from
  if path:
    params = convert.merge_pretrained(jax.device_get(state.params), convert.load_pretrained(path), source=path)
    params = jax.device_put(params, sharding.replicated(exp.mesh))
    state = TrainState(step=state.step, params=params, opt_state=exp.tx.init(params))
    logging.info("Initialised the backbone from %s.", path)
  return state


def summed_over_processes(count: int) -> int:
  """The sum of a per-process count (a collective: every process calls it at the same step)."""
  if jax.process_count() == 1:
    return count
  return int(np.sum(multihost_utils.process_allgather(np.asarray(count, np.int64))))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def warn_if_padded(layout: input_pipeline.BatchLayout, devices: int) -> None:
  if layout.padding_fraction:
    logging.warning("config.train.batch_size=%d in %d microbatch(es) over %d data-parallel devices: each microbatch "
                    "is padded from %d to %d rows with ignored examples, %.0f%% of the step's compute.",
                    layout.real, layout.microbatches, devices, layout.real_per_microbatch, layout.rows,
                    100 * layout.padding_fraction)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains with periodic evaluation and checkpoints; resumes from `workdir`; returns the last eval metrics.

  Raises `Preempted` when stopped early by SIGTERM, so a caller never takes a stopped run for a finished one.
  """
  exp = build_experiment(config)
  data = input_pipeline.create_datasets(config, data_devices=exp.mesh.size)
  warn_if_padded(data.train_layout, exp.mesh.size)
  write_config(config, workdir)
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), config.train)
  state = initial_state(exp, ckpts)
  start = int(state.step)
  num_steps = config.train.num_steps
  train_fn, eval_fn = steps.jit_train_step(exp), steps.jit_eval_step(exp)
  term_names = losses.term_names(config.loss, exp.scales)
  dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  hooks = []
  if is_main:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_secs=None,
                                                 every_steps=config.train.log_every_steps))
    if config.train.profile_steps:
      hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.train.profile_steps))
  eval_result: dict[str, Any] = {}
  window = None  # train metrics merged on device since the last log
  skipped = 0
  batches = data.train_batches(start)
  tick, tick_step = time.perf_counter(), start
  try:
    with metric_writers.ensure_flushes(writer), SigtermFlag() as sigterm:
      for step in range(start, num_steps):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, m = train_fn(state, sharding.global_batch(exp.mesh, next(batches), batch_axis=1), dropout_rng)
        window = m if window is None else window.merge(m)
        done = step + 1
        for hook in hooks:
          hook(done)
        eval_now = done % config.train.eval_every_steps == 0 or done == num_steps
        # One process: our SIGTERM flag. Several: Orbax's policy, which agrees on the step across hosts.
        preempted = (sigterm.requested and jax.process_count() == 1) or ckpts.reached_preemption(done)
        save_now = eval_now or preempted or done % config.train.checkpoint_every_steps == 0
        if done % config.train.log_every_steps == 0 or save_now:  # the host looks at the metrics only here
          scalars = steps.log_names({k: float(v) for k, v in window.compute().items()}, term_names)
          first_bad = int(scalars.pop("first_nonfinite_step"))
          if first_bad >= 0 and config.train.on_nonfinite == "raise":
            raise_nonfinite(first_bad, scalars)
          newly_skipped = round(float(window.nonfinite_fraction.total))
          if newly_skipped:
            skipped += newly_skipped
            logging.warning("Steps %d..%d: %d non-finite loss or gradient, update skipped (%d so far).",
                            tick_step, step, newly_skipped, skipped)
          elapsed = time.perf_counter() - tick
          scalars["images_per_s"] = (done - tick_step) * config.train.batch_size / elapsed
          scalars["step_time_s"] = elapsed / (done - tick_step)
          scalars["skipped_steps"] = skipped
          if config.input.on_bad_record == "skip":
            scalars["skipped_records"] = summed_over_processes(data.skipped_records)
          writer.write_scalars(done, scalars)
          window, tick, tick_step = None, time.perf_counter(), done
        if eval_now:
          eval_result = evaluate.evaluate_split(eval_fn, state.params, exp,
                                                data.eval_batches(config.dataset.eval_split),
                                                data.num_eval_batches(config.dataset.eval_split), data.class_names)
          writer.write_scalars(done, {f"{config.dataset.eval_split}/{k}": v for k, v in eval_result.items()
                                      if np.isscalar(v)})
          if is_main and config.eval.num_examples:  # panels of the first validation images, in TensorBoard
            split = config.dataset.eval_split
            writer.write_images(done, predict.eval_panels(exp, state.params, next(iter(data.eval_batches(split))),
                                                          config.eval.num_examples, split))
        ckpts.save(done, state, metrics={checkpointing.BEST_METRIC: eval_result["miou"]} if eval_now else None,
                   force=eval_now or preempted)
        if preempted:
          break
  finally:  # an async save in flight completes whatever ends the loop
    ckpts.wait_until_finished()
    ckpts.close()
  if int(state.step) < num_steps:
    raise Preempted(int(state.step))
  if is_main and config.eval.num_examples:
    batch = next(iter(data.eval_batches(config.dataset.eval_split)))
    predict.save_eval_examples(exp, jax.device_get(state.params), batch, os.path.join(workdir, "examples"),
                               config.eval.num_examples)
  return eval_result
