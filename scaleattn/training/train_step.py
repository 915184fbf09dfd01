"""The pure train step, and its jitted form with explicit shardings (the state buffer donated).

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
from clu import metrics as clu_metrics

from scaleattn import sharding
from scaleattn.experiment import Experiment, TrainState
from scaleattn.training import losses


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


def _loss_pixel_counts(exp: Experiment, variables: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Per loss term, the valid pixels of the whole [microbatches, rows] batch on that term's grid."""
  cfg = exp.config
  grids = jax.eval_shape(lambda v, x: losses.term_logits(exp.model.apply(v, x, train=False), cfg.loss,
                                                         exp.scales), variables, batch["image"][0])
  labels = batch["label"].reshape(-1, *batch["label"].shape[2:])
  return {name: losses.valid_pixels(labels, x.shape[1:3]) for name, x in grids.items()}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *, exp: Experiment,
               metrics_class: type[clu_metrics.Collection]) -> tuple[TrainState, clu_metrics.Collection]:
  """One update from a [microbatches, rows] batch. Pure: the dropout key is fold_in(rng, step) (and the
  microbatch's index), so a resumed run repeats the same randomness.

  A step whose loss or gradients are not finite leaves parameters and optimizer state unchanged; the loop looks at
  the count on log steps (config.train.on_nonfinite). The model's non-parameter state (`state.model_state`, e.g.
  frozen BatchNorm statistics) is read, never updated.
  """
  rng = jax.random.fold_in(rng, state.step)
  num_micro = batch["image"].shape[0]

  def loss_fn(params, images, labels, key, counts):
    out = exp.model.apply({"params": params, **state.model_state}, images, train=True, rngs={"dropout": key})
    return losses.multiscale_loss(out, labels, exp.config.loss, exp.scales, pixel_counts=counts)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    (loss, terms), grads = grad_fn(state.params, batch["image"][0], batch["label"][0], rng, None)
  else:
    counts = _loss_pixel_counts(exp, state.variables, batch)

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
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state))
  outputs = {metric_field(k): v for k, v in terms.items()}
  return new_state, metrics_class.single_from_model_output(
      loss=loss, grad_norm=grad_norm, param_norm=optax.global_norm(new_state.params),
      update_norm=optax.global_norm(updates), learning_rate=exp.schedule(state.step),
      nonfinite=(~finite).astype(jnp.float32), step=state.step, finite=finite, **outputs)


def jit_train_step(exp: Experiment) -> Callable:
  """`train_step` jitted once: state replicated (and donated), batch split over the mesh along its rows."""
  repl = sharding.replicated(exp.mesh)
  metrics_class = train_metrics_class(losses.term_names(exp.config.loss, exp.scales))
  return jax.jit(functools.partial(train_step, exp=exp, metrics_class=metrics_class),
                 in_shardings=(repl, sharding.data_sharding(exp.mesh, batch_axis=1), repl),
                 out_shardings=(repl, repl), donate_argnums=0)
