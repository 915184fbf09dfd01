"""Training and evaluation: pure jitted steps over a data-parallel mesh, clu metrics and hooks, Orbax checkpoints.

`train_and_evaluate(config, workdir)` is the whole training run; tests and notebooks call it directly.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from clu import metrics as clu_metrics
from tqdm import tqdm

from scaleattn import checkpointing, config_validation, convert, input_pipeline, losses, metrics, predict, sharding
from scaleattn.models import resize
from scaleattn.state import Setup, TrainState, build, predict_scores


def _field(term: str) -> str:
  """The Collection field of a loss term ('scale_0.5' -> 'loss_scale_0p5'): fields must be identifiers."""
  return "loss_" + term.replace(".", "p")


def train_metrics_class(term_names: tuple[str, ...]) -> type[clu_metrics.Collection]:
  """A clu Collection averaging every loss term, the gradient norm and the skipped-step count."""
  fields = {_field(name): clu_metrics.Average.from_output(_field(name)) for name in term_names}
  fields.update(loss=clu_metrics.Average.from_output("loss"),
                grad_norm=clu_metrics.Average.from_output("grad_norm"),
                learning_rate=clu_metrics.LastValue.from_output("learning_rate"),
                nonfinite_steps=clu_metrics.Average.from_output("nonfinite"))
  return clu_metrics.Collection.create(**fields)


def readable(scalars: Mapping[str, float], term_names: tuple[str, ...]) -> dict[str, float]:
  """Collection fields -> the names written to logs and TensorBoard ('loss/scale_0.5')."""
  names = {_field(t): f"loss/{t}" for t in term_names}
  return {names.get(k, k): v for k, v in scalars.items()}


def loss_term_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return losses.term_names(config.loss, tuple(config.model.scales))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *, setup: Setup,
               metrics_class: type[clu_metrics.Collection]) -> tuple[TrainState, clu_metrics.Collection]:
  """One SGD step. Pure: the dropout key is fold_in(rng, step), so a resumed run repeats the same randomness.

  A step whose loss or gradients are not finite leaves parameters and optimizer state unchanged (the loop
  then raises or counts the skip, per config.train.on_nonfinite).
  """
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    out = setup.model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
    return losses.multiscale_loss(out, batch["label"], setup.config.loss, tuple(setup.config.model.scales))

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state))
  outputs = {_field(k): v for k, v in terms.items()}
  return new_state, metrics_class.single_from_model_output(
      loss=loss, grad_norm=grad_norm, learning_rate=setup.schedule(state.step),
      nonfinite=(~finite).astype(jnp.float32), **outputs)


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, setup: Setup) -> dict[str, jax.Array]:
  """Mergeable statistics of one batch: the confusion matrix and, where the data has per-pixel object sizes, per
  size bin the fusion weights and the correct pixels of the fused and of every scale's own prediction."""
  cfg = setup.config
  out = predict_scores(params, batch["image"], setup=setup, flip=cfg.eval.flip)
  size = batch["image"].shape[1:3]
  pred = jnp.argmax(resize.resize_bilinear(out.fused.astype(jnp.float32), size), axis=-1)
  label = batch["label"]
  stats = {"confusion": metrics.confusion_matrix(pred, label, setup.num_classes, mask=batch["mask"])}
  if "instance_size" in batch:
    bins = tuple(cfg.eval.size_bins)
    counted = batch["mask"] & (label != cfg.loss.ignore_label)
    size_map = jnp.where(counted, batch["instance_size"], -1.0)
    weights = resize.resize_bilinear(out.weights.astype(jnp.float32), size)
    per_scale = jnp.argmax(resize.resize_bilinear(out.per_scale.astype(jnp.float32), size), axis=-1)  # [B,H,W,S]
    correct = jnp.concatenate([pred[..., None], per_scale], axis=-1) == label[..., None]
    stats["weight_sum"], stats["pixel_count"] = metrics.sum_by_size(weights, size_map, bins)
    stats["correct_sum"], _ = metrics.sum_by_size(correct, size_map, bins)
  return stats


def jit_steps(setup: Setup) -> tuple[Callable, Callable]:
  """train_step and eval_step jitted once with explicit shardings; the state buffer is donated."""
  repl, data = sharding.replicated(setup.mesh), sharding.data_sharding(setup.mesh)
  metrics_class = train_metrics_class(loss_term_names(setup.config))
  p_train = jax.jit(functools.partial(train_step, setup=setup, metrics_class=metrics_class),
                    in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=0)
  p_eval = jax.jit(functools.partial(eval_step, setup=setup), in_shardings=(repl, data), out_shardings=repl)
  return p_train, p_eval


def evaluate_split(p_eval: Callable, params: Any, setup: Setup, batches: Iterator[Mapping[str, np.ndarray]],
                   num_batches: int, class_names: tuple[str, ...], desc: str = "eval") -> dict[str, Any]:
  """Runs the whole split once (padded, masked, static shapes) and reduces the merged statistics."""
  totals: dict[str, jax.Array] | None = None
  show = jax.process_index() == 0 and logging.get_verbosity() >= logging.INFO
  for local in tqdm(batches, total=num_batches, desc=desc, disable=not show, mininterval=5):
    stats = p_eval(params, sharding.global_batch(setup.mesh, local))
    totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
  if totals is None:
    raise ValueError(f"evaluation split {desc!r} produced no batches")
  totals = jax.device_get(totals)
  result = metrics.summarize(metrics.compute_iou(totals["confusion"]), class_names)
  if "weight_sum" in totals:
    scales = tuple(f"scale_{s:g}" for s in setup.config.model.scales)
    bins = tuple(setup.config.eval.size_bins)
    result.update(metrics.summarize_by_size(totals["weight_sum"], totals["pixel_count"], "attention", scales, bins))
    result.update(metrics.summarize_by_size(totals["correct_sum"], totals["pixel_count"], "accuracy",
                                            ("fused",) + scales, bins))
  return result


class _Preemption:
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


def raise_nonfinite(step: int, m: Mapping[str, float]) -> None:
  bad = sorted(k for k, v in m.items() if k.startswith("loss") and not np.isfinite(v))
  what = ", ".join(bad) if bad else "the gradient (grad_norm)"
  raise NonFiniteError(f"Non-finite values at step {step}: {what} (grad_norm={m['grad_norm']}). The update was "
                       "not applied; the last checkpoint is intact. Set config.train.on_nonfinite='skip' to skip "
                       "such steps instead.")


def initial_state(setup: Setup, ckpts: checkpointing.Checkpoints) -> TrainState:
  """Resume from the workdir if it has a checkpoint, else start from `init_from` (converted VGG-16) or scratch."""
  state = ckpts.restore(setup.abstract_state)
  if state is not None:
    logging.info("Resumed from step %d in %s.", int(state.step), ckpts.directory)
    return state
  state = setup.init_state(jax.random.key(setup.config.seed))
  path = setup.config.init_from
  if path:
    params = convert.merge_pretrained(jax.device_get(state.params), convert.load_pretrained(path), source=path)
    params = jax.device_put(params, sharding.replicated(setup.mesh))
    state = TrainState(step=state.step, params=params, opt_state=setup.tx.init(params))
    logging.info("Initialised the backbone from %s.", path)
  return state


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


class Preempted(Exception):
  """SIGTERM (or the cluster's preemption notice) stopped training after checkpointing `step`; rerun to resume."""

  def __init__(self, step: int):
    super().__init__(f"preempted: checkpoint at step {step} written; run again to resume")
    self.step = step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains with periodic evaluation and checkpoints; resumes from `workdir`; returns the last eval metrics.

  Raises `Preempted` when stopped early by SIGTERM, so a caller never takes a stopped run for a finished one.
  """
  setup = build(config)
  data = input_pipeline.create_datasets(config)
  config_validation.check_num_classes(config, data.class_names)
  write_config(config, workdir)
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), config.train)
  state = initial_state(setup, ckpts)
  start = int(state.step)
  num_steps = config.train.num_steps
  p_train, p_eval = jit_steps(setup)
  dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  hooks = []
  if is_main:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_secs=None,
                                                 every_steps=config.train.log_every_steps))
    if config.train.profile_steps:
      hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.train.profile_steps))
  eval_result: dict[str, Any] = {}
  acc = None
  skipped = 0
  batches = data.train_batches(start)
  tick, tick_step = time.perf_counter(), start
  try:
    with metric_writers.ensure_flushes(writer), _Preemption() as preemption:
      for step in range(start, num_steps):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, m = p_train(state, sharding.global_batch(setup.mesh, next(batches)), dropout_rng)
        acc = m if acc is None else acc.merge(m)
        done = step + 1
        for hook in hooks:
          hook(done)
        if float(m.nonfinite_steps.compute()):  # one scalar per step: the update was withheld.
          if config.train.on_nonfinite == "raise":
            raise_nonfinite(step, readable({k: float(v) for k, v in m.compute().items()}, loss_term_names(config)))
          skipped += 1
          logging.warning("Step %d: non-finite loss or gradient; update skipped (%d so far).", step, skipped)
        if done % config.train.log_every_steps == 0 or done == num_steps:
          scalars = readable({k: float(v) for k, v in acc.compute().items()}, loss_term_names(config))
          elapsed = time.perf_counter() - tick
          scalars["images_per_s"] = (done - tick_step) * config.train.batch_size / elapsed
          scalars["step_time_s"] = elapsed / (done - tick_step)
          scalars["skipped_steps"] = skipped
          writer.write_scalars(done, scalars)
          acc, tick, tick_step = None, time.perf_counter(), done
        eval_now = done % config.train.eval_every_steps == 0 or done == num_steps
        if eval_now:
          eval_result = evaluate_split(p_eval, state.params, setup, data.eval_batches(config.dataset.eval_split),
                                       data.num_eval_batches(config.dataset.eval_split), data.class_names)
          writer.write_scalars(done, {f"{config.dataset.eval_split}/{k}": v for k, v in eval_result.items()
                                      if np.isscalar(v)})
        # One process: our SIGTERM flag. Several: Orbax's policy, which agrees on the step across hosts.
        preempted = (preemption.requested and jax.process_count() == 1) or ckpts.reached_preemption(done)
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
    predict.save_eval_examples(setup, jax.device_get(state.params), batch, os.path.join(workdir, "examples"),
                               config.eval.num_examples)
  return eval_result


def evaluate(config: ml_collections.ConfigDict, workdir: str, params: Any | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint in `workdir` (or `params`) on the eval split (and test split if set);
  writes `eval_results.json` to the workdir."""
  setup = build(config)
  data = input_pipeline.create_datasets(config)
  config_validation.check_num_classes(config, data.class_names)
  if params is None:
    ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), config.train)
    state = ckpts.restore(setup.abstract_state)
    if state is None:
      raise FileNotFoundError(f"no checkpoint to evaluate in {os.path.join(workdir, 'checkpoints')}")
    params = state.params
  else:
    params = jax.device_put(params, sharding.replicated(setup.mesh))
  _, p_eval = jit_steps(setup)
  results = {}
  for split in filter(None, (config.dataset.eval_split, config.dataset.test_split)):
    result = evaluate_split(p_eval, params, setup, data.eval_batches(split), data.num_eval_batches(split),
                            data.class_names, desc=split)
    results[split] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
    logging.info("%s: mIoU %.4f, pixel accuracy %.4f", split, result["miou"], result["pixel_accuracy"])
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results
