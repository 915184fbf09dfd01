"""The pure train and eval steps, and their jitted forms with explicit shardings (the state buffer donated).

A training batch is [microbatches, rows, ...] (`input_pipeline.BatchLayout`): the step scans over the
microbatches and applies one update whose loss terms are normalised by the whole batch's valid pixels, so any
number of microbatches computes the one-shot step's update (dropout masks aside: each microbatch draws its own).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging
from clu import metrics as clu_metrics

from scaleattn import inference, input_pipeline, losses, metrics, sharding, tiling
from scaleattn.compiled_memory import memory_analysis
from scaleattn.models import MultiScaleOutput
from scaleattn.preprocessing import IGNORE_LABEL
from scaleattn.state import Experiment, TrainState


def metric_field(term: str) -> str:
  """The Collection field of a loss term ('scale_0.5' -> 'loss_scale_0p5'): fields must be identifiers."""
  return "loss_" + term.replace(".", "p")


def log_names(scalars: Mapping[str, Any], term_names: tuple[str, ...]) -> dict[str, Any]:
  """Collection fields -> the names written to logs and TensorBoard ('loss/scale_0.5')."""
  names = {metric_field(t): f"loss/{t}" for t in term_names}
  return {names.get(k, k): v for k, v in scalars.items()}


@flax.struct.dataclass
class FirstNonFinite(clu_metrics.Metric):
  """The earliest step whose loss or gradient was not finite (-1: none)."""
  step: jax.Array

  @classmethod
  def from_model_output(cls, step: jax.Array, finite: jax.Array, **_) -> FirstNonFinite:
    return cls(step=jnp.where(finite, -1, step).astype(jnp.int32))

  def merge(self, other: FirstNonFinite) -> FirstNonFinite:
    a, b = self.step, other.step
    return type(self)(step=jnp.where(a < 0, b, jnp.where(b < 0, a, jnp.minimum(a, b))))

  def compute(self) -> jax.Array:
    return self.step


def train_metrics_class(term_names: tuple[str, ...]) -> type[clu_metrics.Collection]:
  """A clu Collection averaging every loss term, the norms of gradients, parameters and updates, and counting
  the steps whose update was withheld (non-finite loss or gradient)."""
  fields = {metric_field(name): clu_metrics.Average.from_output(metric_field(name)) for name in term_names}
  fields.update(loss=clu_metrics.Average.from_output("loss"),
                grad_norm=clu_metrics.Average.from_output("grad_norm"),
                param_norm=clu_metrics.LastValue.from_output("param_norm"),
                update_norm=clu_metrics.Average.from_output("update_norm"),
                learning_rate=clu_metrics.LastValue.from_output("learning_rate"),
                nonfinite_fraction=clu_metrics.Average.from_output("nonfinite"),
                first_nonfinite_step=FirstNonFinite)
  return clu_metrics.Collection.create(**fields)


def _loss_pixel_counts(exp: Experiment, params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Per loss term, the valid pixels of the whole [microbatches, rows] batch on that term's grid."""
  cfg = exp.config
  grids = jax.eval_shape(lambda p, x: losses.term_logits(exp.model.apply({"params": p}, x, train=False), cfg.loss,
                                                         exp.scales), params, batch["image"][0])
  labels = batch["label"].reshape(-1, *batch["label"].shape[2:])
  return {name: losses.valid_pixels(labels, x.shape[1:3]) for name, x in grids.items()}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *, exp: Experiment,
               metrics_class: type[clu_metrics.Collection]) -> tuple[TrainState, clu_metrics.Collection]:
  """One update from a [microbatches, rows] batch. Pure: the dropout key is fold_in(rng, step) (and the
  microbatch's index), so a resumed run repeats the same randomness.

  A step whose loss or gradients are not finite leaves parameters and optimizer state unchanged; the loop looks at
  the count on log steps (config.train.on_nonfinite).
  """
  rng = jax.random.fold_in(rng, state.step)
  num_micro = batch["image"].shape[0]

  def loss_fn(params, images, labels, key, counts):
    out = exp.model.apply({"params": params}, images, train=True, rngs={"dropout": key})
    return losses.multiscale_loss(out, labels, exp.config.loss, exp.scales, pixel_counts=counts)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    (loss, terms), grads = grad_fn(state.params, batch["image"][0], batch["label"][0], rng, None)
  else:
    counts = _loss_pixel_counts(exp, state.params, batch)

    def accumulate(carry, micro):
      index, images, labels = micro
      (loss, terms), grads = grad_fn(state.params, images, labels, jax.random.fold_in(rng, index), counts)
      return jax.tree.map(jnp.add, carry, (loss, terms, grads)), None

    (zero_loss, zero_terms), zero_grads = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
        grad_fn, state.params, batch["image"][0], batch["label"][0], rng, counts))
    (loss, terms, grads), _ = jax.lax.scan(accumulate, (zero_loss, zero_terms, zero_grads),
                                           (jnp.arange(num_micro), batch["image"], batch["label"]))
  grad_norm = optax.global_norm(grads)
  updates, opt_state = exp.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state))
  outputs = {metric_field(k): v for k, v in terms.items()}
  return new_state, metrics_class.single_from_model_output(
      loss=loss, grad_norm=grad_norm, param_norm=optax.global_norm(new_state.params),
      update_norm=optax.global_norm(updates), learning_rate=exp.schedule(state.step),
      nonfinite=(~finite).astype(jnp.float32), step=state.step, finite=finite, **outputs)


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, exp: Experiment) -> dict[str, jax.Array]:
  """`eval_statistics` of the whole images' outputs."""
  return eval_statistics(inference.predict_scores(params, batch["image"], exp=exp, flip=exp.config.eval.flip),
                         batch, exp=exp)


def eval_statistics(out: MultiScaleOutput, batch: Mapping[str, jax.Array], *, exp: Experiment
                    ) -> dict[str, jax.Array]:
  """Mergeable statistics of one batch's outputs: the confusion matrix and, where the data has per-pixel object
  sizes, per size bin the fusion weights and the correct pixels of the fused and of every scale's own prediction."""
  cfg = exp.config
  images, label = batch["image"], batch["label"]
  pred = inference.predict_labels(out.fused, images, batch["mask"], exp=exp)
  stats = {"confusion": metrics.confusion_matrix(pred, label, exp.num_classes, mask=batch["mask"])}
  if "instance_size" in batch:
    bins = tuple(cfg.eval.size_bins)
    counted = batch["mask"] & (label != IGNORE_LABEL)
    size_map = jnp.where(counted, batch["instance_size"], -1.0)
    weights = inference.to_input_size(out.weights, images)
    per_scale = jnp.argmax(inference.to_input_size(out.per_scale, images), axis=-1)  # [B, H, W, S]
    correct = jnp.concatenate([pred[..., None], per_scale], axis=-1) == label[..., None]
    stats["weight_sum"], stats["pixel_count"] = metrics.sum_by_size(weights, size_map, bins)
    stats["correct_sum"], _ = metrics.sum_by_size(correct, size_map, bins)
  return stats


def jit_train_step(exp: Experiment) -> Callable:
  """`train_step` jitted once: state replicated (and donated), batch split over the mesh along its rows."""
  repl = sharding.replicated(exp.mesh)
  metrics_class = train_metrics_class(losses.term_names(exp.config.loss, exp.scales))
  return jax.jit(functools.partial(train_step, exp=exp, metrics_class=metrics_class),
                 in_shardings=(repl, sharding.data_sharding(exp.mesh, batch_axis=1), repl),
                 out_shardings=(repl, repl), donate_argnums=0)


def jit_eval_step(exp: Experiment) -> Callable:
  """`eval_step` jitted once (parameters replicated, batch split over the mesh); or, when config.eval tiles (its
  `tile_size`, or a `memory_budget_gb` the whole images exceed), a plain function running tiled inference on
  each process's rows, then the jitted statistics of the whole batch (it has no `.lower`:
  `tiling.TiledForward.program_bytes` compiles its steps)."""
  repl, data = sharding.replicated(exp.mesh), sharding.data_sharding(exp.mesh)
  whole = jax.jit(functools.partial(eval_step, exp=exp), in_shardings=(repl, data), out_shardings=repl)
  cfg = exp.config
  size = cfg.input.eval_size
  rows = input_pipeline.batch_layout(cfg.eval.batch_size, 1, exp.mesh.size, jax.process_count()).rows

  def whole_bytes() -> int:
    image = jax.ShapeDtypeStruct((rows, size, size, 3), jnp.float32)
    abstract = {"image": image, "label": jax.ShapeDtypeStruct(image.shape[:3], jnp.int32),
                "mask": jax.ShapeDtypeStruct(image.shape[:3], jnp.bool_)}
    return memory_analysis(whole.lower(exp.abstract_state.params, abstract).compile())["total_bytes"]

  choice = tiling.choose(exp.eval_model, exp.abstract_state.params, cfg.eval, batch=rows // exp.mesh.size,
                         longest=size, whole_bytes=whole_bytes)
  if not choice.tile:
    return whole
  logging.info("Evaluation tiled: %s (measured bytes: %s)", tiling.describe(cfg.model, choice.tile, choice.overlap),
               choice.measured)
  local = [d for d in exp.mesh.devices.flat if d.process_index == jax.process_index()]
  forward = tiling.TiledForward(exp.eval_model, choice.tile, choice.overlap, devices=local)
  statistics = jax.jit(functools.partial(eval_statistics, exp=exp), out_shardings=repl)

  def tiled_step(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    out = inference.predict_scores(params, sharding.local_rows(batch["image"]), exp=exp, flip=cfg.eval.flip,
                                   forward=forward)
    rows = sharding.global_batch(exp.mesh, {"fused": out.fused, "per_scale": out.per_scale, "weights": out.weights})
    return statistics(out.replace(own_grid=(), **rows), batch)
  return tiled_step
