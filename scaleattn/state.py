"""The training state, and the static pieces of an experiment (model, optimizer, mesh) built once from a config."""
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
from scaleattn.models import layers


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the data position is `step` itself."""
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Experiment:
  """The static pieces of a run, built once from its config: the mesh, the model with its kernels chosen for the
  mesh's platform, the optimizer, and the state's initialiser and abstract shape (the restore target)."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: models.MultiScaleNet
  eval_model: models.MultiScaleNet  # the same parameters on config.eval.scales
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_state: Callable[[jax.Array], TrainState]  # jitted, replicated output
  abstract_state: TrainState

  @property
  def num_classes(self) -> int:
    return self.config.model.num_classes

  @property
  def scales(self) -> tuple[float, ...]:
    return tuple(float(s) for s in self.config.model.scales)

  @property
  def eval_scales(self) -> tuple[float, ...]:
    return tuple(float(s) for s in self.config.eval.scales) or self.scales


def mesh_platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices; an abstract mesh has none, so its builder must name one."""
  if not hasattr(mesh, "devices"):
    raise ValueError("build_experiment: an abstract mesh has no devices to take the platform from; pass platform=")
  return mesh.devices.flat[0].platform


def build_experiment(config: ml_collections.ConfigDict, mesh: Mesh | None = None, platform: str | None = None
                     ) -> Experiment:
  """Validates the config and builds model, optimizer and state initialiser without computing anything.

  platform: where the programs will run (default: the mesh's devices' platform); it resolves
  config.model.conv_impl='auto', so a program lowered on this host for 'cuda' or 'tpu' carries no CPU kernels.
  """
  mesh = mesh or sharding.make_mesh(config.mesh)
  config_validation.validate(config, num_data_devices=mesh.size, process_count=jax.process_count())
  conv_impl = layers.resolve_conv_impl(config.model.conv_impl, platform or mesh_platform(mesh))
  model = models.build_model(config.model, conv_impl)
  eval_model = models.build_model(config.model, conv_impl, scales=tuple(config.eval.scales) or None)
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
  return Experiment(config, mesh, model, eval_model, tx, schedule, init_state, abstract)
