"""A second backbone plugged in through the backbone contract alone: a tiny network with eval-mode BatchNorm (its
statistics a non-parameter collection) trains, evaluates, predicts tiled and exports through the normal paths, and
its statistics reach every forward pass (checked against a NumPy forward that uses them)."""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import numpy_reference as ref
import pytest
from jax.ad_checkpoint import checkpoint_name

from configs import shapes
from scaleattn import checkpointing
from scaleattn.evaluation import segmentation
from scaleattn.experiment import build_experiment
from scaleattn.inference import export, predict, tiling
from scaleattn.models import registry, resize
from scaleattn.models.layers import Conv, max_pool_3x3
from scaleattn.training import loop

EPS = 1e-5  # nn.BatchNorm's default


class TinyBatchNormNet(nn.Module):
  """conv 3x3 -> BatchNorm (running statistics, never updated) -> ReLU -> three stride-2 pools -> 1x1 scores,
  confined to `valid_size` as the contract asks of a backbone that tiles exactly (-inf before each pool)."""
  num_classes: int
  width: int = 6
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  supports_valid_size: ClassVar[bool] = True
  remat_names: ClassVar[tuple[str, ...]] = ("tiny_block",)
  state_collections: ClassVar[tuple[str, ...]] = ("batch_stats",)

  @property
  def output_stride(self) -> int:
    return 8

  def output_size(self, n: int) -> int:
    return resize.output_size(n)

  def receptive_radius(self) -> int:
    return 1 + 1 + 2 + 4  # the conv, then each pool's one tap at strides 1, 2 and 4

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, valid_size: jax.Array | None = None):
    del train
    valid = None if valid_size is None else jnp.asarray(valid_size, jnp.int32)

    def confine(x: jax.Array, fill: float) -> jax.Array:
      if valid is None:
        return x
      inside = (jnp.arange(x.shape[1])[:, None] < valid[0]) & (jnp.arange(x.shape[2])[None, :] < valid[1])
      return jnp.where(inside[None, :, :, None], x, fill)

    x = Conv(self.width, 3, name="conv")(images)
    x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=EPS, name="bn")(x))
    for _ in range(3):
      x = max_pool_3x3(confine(x, -jnp.inf), 2, "xla")
      valid = None if valid is None else resize.pool_size(valid)
    x = checkpoint_name(confine(x, 0.0), "tiny_block")
    return Conv(self.num_classes, 1, name="scores")(x), x


def numpy_forward(variables: dict, images: np.ndarray) -> np.ndarray:
  """Scores of TinyBatchNormNet in float64, BatchNorm written out from its statistics."""
  p, s = variables["params"]["backbone"], variables["batch_stats"]["backbone"]["bn"]
  x = ref.conv(images, p["conv"]["kernel"], p["conv"]["bias"])
  x = (x - s["mean"]) / np.sqrt(s["var"] + EPS) * p["bn"]["scale"] + p["bn"]["bias"]
  x = np.maximum(x, 0)
  for _ in range(3):
    x = ref.max_pool(x, 2)
  return ref.conv(x, p["scores"]["kernel"], p["scores"]["bias"])


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
  monkeypatch.setitem(registry.BACKBONES, "tiny_bn", TinyBatchNormNet)


def _config(data_dir, scales=(1.0, 0.5), **eval_settings):
  config = shapes.get_config("smoke")
  config.dataset.data_dir = data_dir
  config.model.backbone = ml_collections.ConfigDict({"name": "tiny_bn", "width": 6})
  config.model.scales = scales
  config.model.fusion.name = "attention"
  config.model.remat = "per_block"
  config.train.num_steps, config.train.checkpoint_every_steps, config.train.eval_every_steps = 3, 3, 3
  config.optim.warmup_steps = 0
  config.eval.num_examples = 1
  for key, value in eval_settings.items():
    config.eval[key] = value
  return config


def test_train_eval_export_keep_the_statistics_and_use_them(smoke_data_dir, tmp_path):
  config = _config(smoke_data_dir)
  exp = build_experiment(config)
  init = exp.init_state(jax.random.key(config.seed))
  assert set(init.model_state) == {"batch_stats"}
  loop.train_and_evaluate(config, str(tmp_path))
  weights, step = checkpointing.restore_params(str(tmp_path), config.train, exp.abstract_state)
  assert step == 3 and set(weights) == {"params", "batch_stats"}
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(weights["params"]),
                                                         jax.tree.leaves(init.params), strict=True))
  assert moved > 1e-3  # training changed the parameters...
  for a, b in zip(jax.tree.leaves(weights["batch_stats"]), jax.tree.leaves(init.model_state["batch_stats"]),
                  strict=True):
    np.testing.assert_array_equal(a, b)  # ... and never the statistics
  assert segmentation.evaluate(config, str(tmp_path))[config.dataset.eval_split]["miou"] >= 0

  path = str(tmp_path / "model.msgpack")
  export.export_model(path, weights, config)
  loaded, _ = export.load_exported(path)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(jax.device_get(weights)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_tiled_prediction_applies_the_statistics(smoke_data_dir):
  config = _config(smoke_data_dir, scales=(1.0,), tile_size=33)
  exp = build_experiment(config)
  state = jax.device_get(exp.init_state(jax.random.key(1)))
  rng = np.random.default_rng(0)
  stats = jax.tree.map(lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32), state.model_state)
  weights = {"params": state.params, **stats}
  images = rng.normal(0, 40, (1, 50, 70, 3)).astype(np.float32)
  predictor = predict.Predictor(exp, weights)
  assert predictor.plan.tile_all and predictor.plan.tiled.overlap == tiling.exact_overlap(exp.eval_model) == 16
  labels, _ = predictor(images, np.ones(images.shape[:3], bool))
  x = images.astype(np.float64) * config.model.input_scale  # as MultiScaleNet feeds its backbone
  want = ref.bilinear(numpy_forward(jax.tree.map(np.float64, weights), x), (50, 70))
  assert (labels[0] == want[0].argmax(-1)).mean() > 0.999
  plain = ref.bilinear(numpy_forward(jax.tree.map(np.float64, {"params": state.params, **state.model_state}), x),
                       (50, 70))
  assert (plain[0].argmax(-1) != want[0].argmax(-1)).mean() > 0.05  # the statistics change the labels
