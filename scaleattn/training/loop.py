"""The training loop: data, the jitted steps, clu metrics and hooks, periodic evaluation, Orbax checkpoints.

`train_and_evaluate(config, workdir)` is the whole training run; tests and notebooks call it directly.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from scaleattn import checkpointing, sharding
from scaleattn.data import input_pipeline
from scaleattn.evaluation import evaluators as evaluators_lib
from scaleattn.experiment import Experiment, TrainState, build_experiment, initial_state
from scaleattn.training import losses, train_step, watchdog
from scaleattn.training.preemption import Preempted, SigtermFlag


class NonFiniteError(FloatingPointError):
  """A training step produced a non-finite loss or gradient."""


def raise_nonfinite(step: int, window: Mapping[str, float]) -> None:
  """The error for a withheld update at `step`; `window` holds the logged averages over the steps around it."""
  bad = sorted(k for k, v in window.items() if k.startswith("loss") and not np.isfinite(v))
  what = ", ".join(bad) if bad else "the gradient (grad_norm)"
  raise NonFiniteError(f"Non-finite values at step {step}: {what}. The update was not applied; the last checkpoint "
                       "is intact. Set config.train.on_nonfinite='skip' to skip such steps instead.")


def start_state(exp: Experiment, ckpts: checkpointing.Checkpoints) -> TrainState:
  """Resume from the workdir if it has a checkpoint, else a fresh state (from config.init_from when set)."""
  state = ckpts.restore(exp.abstract_state, resume=True)
  if state is not None:
    logging.info("Resumed from step %d in %s.", int(state.step), ckpts.directory)
    return state
  return initial_state(exp)


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


def log_window(window, *, config: ml_collections.ConfigDict, term_names: tuple[str, ...], steps: tuple[int, int],
               elapsed: float, skipped: int, data: input_pipeline.Datasets) -> tuple[dict[str, Any], int]:
  """The scalars of the metric window over `steps` (first, end): averages, speed, skipped steps and records; applies
  the non-finite policy (config.train.on_nonfinite). Returns them and the running count of skipped steps."""
  first, end = steps
  scalars = train_step.log_names({k: float(v) for k, v in window.compute().items()}, term_names)
  first_bad = int(scalars.pop("first_nonfinite_step"))
  if first_bad >= 0 and config.train.on_nonfinite == "raise":
    raise_nonfinite(first_bad, scalars)
  newly_skipped = round(float(window.nonfinite_fraction.total))
  if newly_skipped:
    skipped += newly_skipped
    logging.warning("Steps %d..%d: %d non-finite loss or gradient, update skipped (%d so far).", first, end - 1,
                    newly_skipped, skipped)
  scalars["images_per_s"] = (end - first) * config.train.batch_size / elapsed
  scalars["step_time_s"] = elapsed / (end - first)
  scalars["skipped_steps"] = skipped
  if config.input.on_bad_record == "skip":
    scalars["skipped_records"] = summed_over_processes(data.skipped_records)
  return scalars, skipped


def progress_hooks(config: ml_collections.ConfigDict, writer: metric_writers.MetricWriter, workdir: str) -> list:
  """clu's progress report (and the profiler when config.train.profile_steps asks), on process 0."""
  if jax.process_index() != 0:
    return []
  hooks = [periodic_actions.ReportProgress(num_train_steps=config.train.num_steps, writer=writer, every_secs=None,
                                           every_steps=config.train.log_every_steps)]
  if config.train.profile_steps:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.train.profile_steps))
  return hooks


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains with periodic evaluation and checkpoints; resumes from `workdir`; returns the last evaluation's results.

  Raises `Preempted` when stopped early by SIGTERM, so a caller never takes a stopped run for a finished one. A
  phase that stalls (a step, an evaluation batch, a checkpoint save past config.train.step_timeout_seconds) ends
  the process with `watchdog.STALL_EXIT_CODE` and every thread's stack in the log.
  """
  exp = build_experiment(config)
  data = input_pipeline.create_datasets(config, data_devices=exp.mesh.size)
  warn_if_padded(data.train_layout, exp.mesh.size)
  write_config(config, workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() != 0)
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), config.train)
  with watchdog.Watchdog(config.train.step_timeout_seconds, config.train.first_steps_timeout_seconds) as dog:
    with dog.phase("restore", 0):
      state = start_state(exp, ckpts)
    start, num_steps = int(state.step), config.train.num_steps
    train_fn = train_step.jit_train_step(exp)
    merge = jax.jit(lambda window, m: window.merge(m), donate_argnums=0)  # on device: no host work per step
    evaluators = evaluators_lib.build(exp, data)
    term_names = losses.term_names(config.loss, exp.scales)
    dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    hooks = progress_hooks(config, writer, workdir)
    eval_result: dict[str, Any] = {}
    window = None  # train metrics merged on device since the last log
    skipped = 0
    batches = data.train_batches(start)
    tick, tick_step = time.perf_counter(), start
    try:
      with metric_writers.ensure_flushes(writer), SigtermFlag() as sigterm:
        for step in range(start, num_steps):
          dog.beat("train_step", step)
          with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, m = train_fn(state, sharding.global_batch(exp.mesh, next(batches), batch_axis=1), dropout_rng)
          window = m if window is None else merge(window, m)
          done = step + 1
          for hook in hooks:
            hook(done)
          eval_now = done % config.train.eval_every_steps == 0 or done == num_steps
          # One process: our SIGTERM flag. Several: Orbax's policy, which agrees on the step across hosts.
          preempted = (sigterm.requested if jax.process_count() == 1 else ckpts.reached_preemption(done))
          save_now = eval_now or preempted or done % config.train.checkpoint_every_steps == 0
          if done % config.train.log_every_steps == 0 or save_now:  # the host looks at the metrics only here
            scalars, skipped = log_window(window, config=config, term_names=term_names, steps=(tick_step, done),
                                          elapsed=time.perf_counter() - tick, skipped=skipped, data=data)
            writer.write_scalars(done, scalars)
            window, tick, tick_step = None, time.perf_counter(), done
          if eval_now:
            eval_result = {}
            for evaluator in evaluators:
              eval_result.update(evaluator(state.weights, done, writer,
                                           watch=lambda items, step=done: dog.beats(items, "evaluation", step)))
          best = {checkpointing.BEST_METRIC: eval_result["miou"]} if eval_now and "miou" in eval_result else None
          with dog.phase("checkpoint_save", done):
            ckpts.save(done, state, metrics=best, force=eval_now or preempted)
          if preempted:
            break
    finally:  # an async save in flight completes whatever ends the loop
      with dog.phase("checkpoint_wait", int(state.step)):
        ckpts.wait_until_finished()
        ckpts.close()
  if int(state.step) < num_steps:
    raise Preempted(int(state.step))
  for evaluator in evaluators:
    evaluator.finish(state.weights, workdir)
  return eval_result
