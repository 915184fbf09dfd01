"""DeepLab v2 ResNet + ASPP: sizes and parameter count of the full network, and every part (stem with its ceil-mode
pool, bottlenecks in both stride layouts, ASPP, a reduced-depth network end to end) against a NumPy transcription;
BatchNorm frozen out of the gradients."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import resnet_reference as rref

from scaleattn.config import validation
from scaleattn.models import registry
from scaleattn.models.resnet import ASPP, BLOCK_DEPTHS, Bottleneck, DeepLabV2, Stem

TINY = dict(block_depths=(1, 2, 1, 2), width=4)


def to_flax(units):
  """Reference units -> DeepLabV2 variables, in the model's names (HWIO kernels; BN as mean, var, scale, bias)."""
  params, stats = {}, {}
  for key, u in units.items():
    if key[0] == "aspp":
      params.setdefault("aspp", {})[f"c{key[1]}"] = {"kernel": u["weight"].transpose(2, 3, 1, 0), "bias": u["bias"]}
      continue
    path = ("stem", "conv1") if key == ("conv1",) else (f"res{key[0]}_{key[1]}", key[2])
    params.setdefault(path[0], {})[path[1]] = {"kernel": u["weight"].transpose(2, 3, 1, 0)}
    bn = u["bn"]
    stats.setdefault(path[0], {})[path[1]] = {"mean": bn["mean"], "var": bn["var"], "scale": bn["gamma"],
                                              "bias": bn["beta"]}
  return jax.tree.map(lambda v: np.asarray(v, np.float32), {"params": params, "batch_stats": stats})


def _shapes(model, size):
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return variables, jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)


def test_resnet101_aspp_has_torchvisions_convolutions_plus_aspp():
  """torchvision's ResNet-101 has 44,549,160 parameters: minus fc (2048 x 1000 + 1000) and the BatchNorm affines
  (2 x 52,672 channels) leaves the convolutions; ASPP adds 4 x (3 x 3 x 2048 x 21 + 21)."""
  variables, _ = _shapes(DeepLabV2(21), 65)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(variables["params"]) == 44_549_160 - 2_049_000 - 2 * 52_672 + 4 * (9 * 2048 * 21 + 21)
  assert count(variables["batch_stats"]) == 4 * 52_672
  assert set(variables) == {"params", "batch_stats"} and set(DeepLabV2.state_collections) == {"batch_stats"}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  assert variables["params"]["res4_23"]["conv3x3"]["kernel"].shape == (3, 3, 256, 256)
  assert "res4_24" not in variables["params"] and "shortcut" not in variables["params"]["res4_2"]


@pytest.mark.parametrize("output_stride, size, expected", [(8, 321, 41), (8, 513, 65), (16, 321, 21), (16, 513, 33)])
def test_output_grid_of_the_full_network(output_stride, size, expected):
  model = DeepLabV2(21, output_stride=output_stride)
  _, (scores, features) = _shapes(model, size)
  assert scores.shape == (1, expected, expected, 21) and features.shape == (1, expected, expected, 2048)
  assert model.output_size(size) == expected
  assert model.output_stride == output_stride


@pytest.mark.parametrize("depth", [50, 152])
def test_other_depths_have_their_blocks(depth):
  variables, (scores, _) = _shapes(DeepLabV2(7, block_depths=BLOCK_DEPTHS[depth]), 97)
  stages = [sum(1 for k in variables["params"] if k.startswith(f"res{s}_")) for s in (2, 3, 4, 5)]
  assert tuple(stages) == BLOCK_DEPTHS[depth] and scores.shape == (1, 13, 13, 7)


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("size, expected", [((29, 22), (8, 6)), ((30, 17), (8, 5))])  # conv: ceil(n / 2); pool: n // 2 + 1
def test_stem_matches_numpy(size, expected, impl):
  units = rref.random_units((1, 1, 1, 1), 5, 3, seed=1)
  x = np.random.default_rng(0).normal(size=(2, *size, 3)) * 50
  variables = to_flax({("conv1",): units[("conv1",)]})
  out, valid = jax.jit(lambda v, x: Stem(5, impl=impl).apply({k: v[k]["stem"] for k in v}, x, None))(
      variables, x.astype(np.float32))
  assert valid is None and out.shape == rref.stem(x, units).shape == (2, *expected, 5)
  np.testing.assert_allclose(out, rref.stem(x, units), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("stride_in_3x3", [False, True])
@pytest.mark.parametrize("stride, dilation, projection", [(1, 1, True), (2, 1, True), (1, 2, False), (1, 4, True)])
def test_bottleneck_matches_numpy(stride, dilation, projection, stride_in_3x3, impl):
  """Both stride layouts, dilated, identity and projection shortcuts, frozen BatchNorm in eval form."""
  width, index = 16, 1 if projection else 2  # stage 3's first block has the projection, its second not
  units = rref.random_units((1, 2, 1, 1), width, 3, seed=2)
  block = {k: v for k, v in units.items() if k[:2] == (3, index)}
  x = np.random.default_rng(3).normal(size=(2, 11, 8, 4 * width if projection else 8 * width))
  variables = to_flax(block)
  module = Bottleneck(8 * width, stride, dilation, projection, stride_in_3x3, impl=impl)
  out, _ = jax.jit(lambda v, x: module.apply({k: v[k][f"res3_{index}"] for k in v}, x, None))(
      variables, x.astype(np.float32))
  expected = rref.bottleneck(x, block, 3, index, stride, dilation, stride_in_3x3)
  assert out.shape == expected.shape == (2, 6 if stride == 2 else 11, 4 if stride == 2 else 8, 8 * width)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_aspp_sums_four_dilated_convolutions_with_bias():
  units = rref.random_units((1, 1, 1, 1), 2, 5, seed=4)
  aspp = {k: v for k, v in units.items() if k[0] == "aspp"}
  x = np.random.default_rng(6).normal(size=(1, 30, 27, 64))
  params = to_flax(aspp)["params"]["aspp"]
  out = jax.jit(ASPP(5).apply)({"params": params}, x.astype(np.float32))
  np.testing.assert_allclose(out, rref.aspp(x, aspp, (6, 12, 18, 24)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("output_stride, stride_in_3x3", [(8, False), (8, True), (16, False)])
def test_reduced_depth_network_matches_numpy(output_stride, stride_in_3x3, impl):
  model = DeepLabV2(3, **TINY, output_stride=output_stride, stride_in_3x3=stride_in_3x3, conv_impl=impl)
  units = rref.random_units(TINY["block_depths"], TINY["width"], 3, seed=7)
  x = np.random.default_rng(8).normal(size=(2, 37, 30, 3)) * 50
  scores, features = jax.jit(model.apply, static_argnames="train")(to_flax(units), x.astype(np.float32), train=False)
  ref_scores, ref_features = rref.deeplab_v2(x, units, TINY["block_depths"], output_stride, stride_in_3x3)
  expected = (model.output_size(37), model.output_size(30))
  assert scores.shape[1:3] == ref_scores.shape[1:3] == expected == ((5, 4) if output_stride == 8 else (3, 2))
  np.testing.assert_allclose(features, ref_features, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride_in_3x3", [False, True])
def test_valid_size_makes_a_padded_image_compute_what_it_computes_alone(stride_in_3x3):
  model = DeepLabV2(3, **TINY, stride_in_3x3=stride_in_3x3)
  variables = to_flax(rref.random_units(TINY["block_depths"], TINY["width"], 3, seed=9))
  x = np.random.default_rng(10).normal(size=(1, 27, 22, 3)).astype(np.float32) * 50
  canvas = np.pad(x, ((0, 0), (0, 14), (0, 19), (0, 0)))
  apply = jax.jit(model.apply, static_argnames="train")
  alone, alone_features = apply(variables, x, train=False)
  padded, padded_features = apply(variables, canvas, train=False, valid_size=jnp.array([27, 22]))
  oh, ow = model.output_size(27), model.output_size(22)
  assert alone.shape[1:3] == (oh, ow)
  np.testing.assert_allclose(padded[:, :oh, :ow], alone, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(padded_features[:, :oh, :ow], alone_features, rtol=1e-4, atol=1e-4)
  unconfined, _ = apply(variables, canvas, train=False)
  assert not np.allclose(unconfined[:, :oh, :ow], alone, atol=1e-2)


@pytest.mark.parametrize("output_stride, stride_in_3x3", [(8, False), (8, True), (16, False)])
def test_receptive_radius_is_how_far_a_change_reaches(output_stride, stride_in_3x3):
  """A bright input row changes an output cell (centre output_stride * k) at receptive_radius from its centre, on
  either side, and not one row further (positive BatchNorm shifts keep the ReLUs open)."""
  model = DeepLabV2(2, block_depths=(1, 1, 1, 1), width=2, output_stride=output_stride, stride_in_3x3=stride_in_3x3,
                    aspp_dilations=(1, 3))
  units = rref.random_units((1, 1, 1, 1), 2, 2, seed=11, num_aspp=2)
  for u in units.values():
    if "bn" in u:
      u["bn"]["beta"] = u["bn"]["beta"] + 5.0
  variables = to_flax(units)
  radius, size, centre = model.receptive_radius(), 257, 128
  assert radius + 1 < centre and radius == {(8, False): 89, (8, True): 85, (16, False): 113}[
      (output_stride, stride_in_3x3)]
  x = np.random.default_rng(12).normal(size=(1, size, size, 3)).astype(np.float32)
  cell = lambda images: np.asarray(jax.jit(model.apply, static_argnames="train")(
      variables, images, train=False)[0][0, centre // output_stride, centre // output_stride])
  base = cell(x)

  def reaches(row):
    bright = x.copy()
    bright[:, row] = 1000.0
    return not np.array_equal(cell(bright), base)

  assert reaches(centre - radius) and reaches(centre + radius)
  assert not reaches(centre - radius - 1) and not reaches(centre + radius + 1)


def test_resnet101_receptive_radius():
  """By hand: stem 3 + pool 2 x 1; stage 2: 3 blocks x 4; stage 3 (after the stride): 4 x 8; stage 4: 23 x 2 x 8;
  stage 5: 3 x 4 x 8; ASPP 24 x 8."""
  assert DeepLabV2(21).receptive_radius() == 3 + 2 + 3 * 4 + 4 * 8 + 23 * 16 + 3 * 32 + 24 * 8 == 705


def test_frozen_batch_norm_is_state_without_gradient():
  """The statistics and affine are state, not parameters (what an optimizer updates holds only kernels and ASPP's
  biases): a gradient w.r.t. everything is zero there, and training mode normalises exactly as evaluation."""
  model = DeepLabV2(3, block_depths=(1, 1, 1, 1), width=2)
  variables = to_flax(rref.random_units((1, 1, 1, 1), 2, 3, seed=13))
  x = np.random.default_rng(14).normal(size=(2, 17, 17, 3)).astype(np.float32) * 50
  loss = lambda v, train: jnp.mean(model.apply(v, x, train=train)[0] ** 2)
  grads = jax.jit(jax.grad(loss), static_argnums=1)(variables, True)
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads["batch_stats"]))
  assert all(np.asarray(g).any() for g in jax.tree.leaves(grads["params"]))
  paths = ["/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])]
  assert all(p.endswith("/kernel") or p.startswith("aspp/") and p.endswith("/bias") for p in paths)
  np.testing.assert_array_equal(jax.jit(loss, static_argnums=1)(variables, True),
                                jax.jit(loss, static_argnums=1)(variables, False))


def test_aspp_starts_from_deeplabs_gaussian():
  params = jax.jit(lambda: ASPP(21).init(jax.random.key(0), jnp.zeros((1, 5, 5, 2048)))["params"])()
  kernels = np.stack([np.asarray(params[f"c{i}"]["kernel"]) for i in range(4)])
  assert kernels.shape == (4, 3, 3, 2048, 21)
  assert abs(kernels.std() - 0.01) < 0.0005 and abs(kernels.mean()) < 0.0005
  assert not any(np.asarray(params[f"c{i}"]["bias"]).any() for i in range(4))


@pytest.mark.parametrize("field, value", [("block_depths", (3, 4, 23)), ("output_stride", 32)])
def test_bad_geometry_is_named(field, value):
  with pytest.raises(ValueError, match=field):
    DeepLabV2(21, **{field: value}).output_size(321)


@pytest.mark.parametrize("config_name, classes, fusion", [("deeplab_v2", 21, "max"),
                                                           ("deeplab_v2_person_part", 7, "attention")])
def test_deeplab_v2_configs_validate_and_build(config_name, classes, fusion, monkeypatch):
  for depth, depths in BLOCK_DEPTHS.items():  # the registry's entries for the ResNet backbones
    monkeypatch.setitem(registry.BACKBONES, f"resnet{depth}", functools.partial(DeepLabV2, block_depths=depths))
  config = importlib.import_module(f"configs.{config_name}").get_config()
  config.model.fusion.name = fusion
  validation.validate(config, num_data_devices=1)
  model = registry.build_model(config.model)
  images = jax.ShapeDtypeStruct((1, 321, 321, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert out.fused.shape == (1, 41, 41, classes) and [s.shape[1] for s in out.own_grid] == [41, 31, 21]
  assert set(variables) == {"params", "batch_stats"} and ("fusion" in variables["params"]) == (fusion == "attention")
  assert variables["params"]["backbone"]["res4_23"]["conv3x3"]["kernel"].shape == (3, 3, 256, 256)
  assert (config.optim.learning_rate, config.optim.schedule, config.train.batch_size, config.train.num_steps) == (
      2.5e-4, "poly", 10, 20_000)


def test_bfloat16_compute_keeps_float32_variables():
  model = DeepLabV2(3, **TINY, dtype=jnp.bfloat16)
  images = jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  scores, features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  assert scores.dtype == features.dtype == jnp.bfloat16
