"""The training state and the static pieces of a run (model, optimizer, mesh), built once from a config."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from scaleattn import config_validation, models, optimizers, sharding


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the data position is `step` itself."""
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Setup:
  """The static pieces of a run, built once from its config."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: models.MultiScaleNet
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_state: Callable[[jax.Array], TrainState]  # jitted, replicated output
  abstract_state: TrainState  # shapes, dtypes and shardings: the restore target

  @property
  def num_classes(self) -> int:
    return self.config.model.num_classes


def build(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Setup:
  """Validates the config and builds model, optimizer and state initialiser without computing anything."""
  mesh = mesh or sharding.make_mesh(config.mesh)
  config_validation.validate(config, num_data_devices=mesh.size, process_count=jax.process_count())
  model = models.build_model(config.model)
  crop = config.input.crop_size
  dummy = jnp.zeros((1, crop, crop, 3), jnp.float32)
  abstract_params = jax.eval_shape(lambda r: model.init(r, dummy, train=False)["params"], jax.random.key(0))
  tx, schedule = optimizers.create_optimizer(config.optim, abstract_params, config.train.num_steps)

  def init(rng: jax.Array) -> TrainState:
    params = model.init(rng, dummy, train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  init_state = jax.jit(init, out_shardings=sharding.replicated(mesh))
  abstract = jax.eval_shape(init_state, jax.random.key(0))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), abstract)
  return Setup(config, mesh, model, tx, schedule, init_state, abstract)


def predict_scores(params: Any, images: jax.Array, *, setup: Setup, flip: bool) -> models.MultiScaleOutput:
  """Eval-mode forward pass; with `flip`, fused and per-scale scores and weights average the image and its mirror."""
  out = setup.model.apply({"params": params}, images, train=False)
  if not flip:
    return out
  mirrored = setup.model.apply({"params": params}, images[:, :, ::-1], train=False)
  return out.replace(fused=(out.fused + mirrored.fused[:, :, ::-1]) / 2,
                     per_scale=(out.per_scale + mirrored.per_scale[:, :, ::-1]) / 2,
                     weights=(out.weights + mirrored.weights[:, :, ::-1]) / 2)
