"""The training state, and the static pieces of an experiment (model, optimizer, mesh) built once from a config."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from scaleattn import models, sharding, weights
from scaleattn.config import validation
from scaleattn.models import layers
from scaleattn.training import optimizers


def as_variables(weights: Mapping[str, Any]) -> dict[str, Any]:
  """Flax variables from what inference is given: a parameter tree ({'backbone': ..., 'fusion': ...}), or variables
  already ({'params': ..., 'batch_stats': ...}) for a model with non-parameter state."""
  return dict(weights) if "params" in weights else {"params": weights}


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the data position is `step` itself. `model_state`: the model's
  variables besides its parameters (e.g. a backbone's BatchNorm statistics, by collection), which training keeps
  as they are; empty for models without any."""
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, **self.model_state}

  @property
  def weights(self) -> Any:
    """What inference takes: the parameters, as variables when the model has non-parameter state."""
    return self.variables if self.model_state else self.params

  def to_checkpoint(self) -> dict[str, Any]:
    """The tree a checkpoint holds: model_state only when there is some, so checkpoints of stateless models keep
    the layout they always had."""
    tree = {"step": self.step, "params": self.params, "opt_state": self.opt_state}
    return {**tree, "model_state": self.model_state} if self.model_state else tree

  @classmethod
  def from_checkpoint(cls, tree: Mapping[str, Any]) -> TrainState:
    return cls(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
               model_state=tree.get("model_state", {}))


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
  validation.validate(config, num_data_devices=mesh.size, process_count=jax.process_count())
  conv_impl = layers.resolve_conv_impl(config.model.conv_impl, platform or mesh_platform(mesh))
  model = models.build_model(config.model, conv_impl)
  eval_model = models.build_model(config.model, conv_impl, scales=tuple(config.eval.scales) or None)
  crop = config.input.crop_size
  dummy = jnp.zeros((1, crop, crop, 3), jnp.float32)
  abstract_params = jax.eval_shape(lambda r: model.init(r, dummy, train=False)["params"], jax.random.key(0))
  tx, schedule = optimizers.create_optimizer(config.optim, abstract_params, config.train.num_steps)

  def init(rng: jax.Array) -> TrainState:
    variables = dict(model.init(rng, dummy, train=False))
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), model_state=variables)

  init_state = jax.jit(init, out_shardings=sharding.replicated(mesh))
  abstract = jax.eval_shape(init_state, jax.random.key(0))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), abstract)
  return Experiment(config, mesh, model, eval_model, tx, schedule, init_state, abstract)


def initial_state(exp: Experiment) -> TrainState:
  """A fresh state: config.seed's initialisation with config.init_from's weights put in (`weights.load_init`:
  any recognised file or named weights; the fusion head keeps its initialiser unless the source has one)."""
  state = exp.init_state(jax.random.key(exp.config.seed))
  source = exp.config.init_from
  if not source:
    if exp.config.expects_pretrained:
      logging.warning("config.init_from='': training from scratch. This recipe's published numbers start from "
                      "ImageNet weights (e.g. init_from='imagenet:vgg16').")
    return state
  loaded = weights.load_init(source, jax.device_get(state.variables), mean_rgb=exp.config.input.mean_rgb,
                             options=exp.model.backbone.weight_options())
  loaded = jax.device_put(loaded, sharding.replicated(exp.mesh))
  params = loaded.pop("params")
  logging.info("Initialised from %s.", source)
  return state.replace(params=params, opt_state=exp.tx.init(params), model_state=loaded)
