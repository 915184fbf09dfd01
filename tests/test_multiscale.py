"""The share-net over scales: geometry against NumPy, the two scale-execution paths, gradients, config."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import numpy_reference as ref
import pytest

from configs import base
from scaleattn.models import DeepLabLargeFOV, MultiScaleNet, build_model
from scaleattn.models.resize import resize_bilinear

BACKBONE = dict(num_classes=5, block_widths=(4, 8, 8, 8, 8), block_depths=(1, 1, 2, 1, 1), fc_width=16,
                fc6_dilation=2)
TINY = dict(BACKBONE, attention_hidden=8)


def _apply(model):
  return jax.jit(model.apply, static_argnames="train")


def test_bilinear_align_corners_matches_numpy():
  x = np.random.default_rng(1).normal(size=(2, 5, 4, 3)).astype(np.float32)
  for size in [(9, 7), (3, 2), (5, 4), (1, 6)]:
    np.testing.assert_allclose(resize_bilinear(jnp.asarray(x), size), ref.bilinear(x, size), rtol=1e-5, atol=1e-6)


def test_share_net_runs_one_backbone_on_every_resized_image():
  """Each scale's scores are the backbone's on the align-corners-resized image, brought to the scale-1 grid."""
  x = np.random.default_rng(0).normal(size=(1, 41, 33, 3)).astype(np.float32)
  model = MultiScaleNet(scales=(1.0, 0.75, 0.5), fusion="average", **TINY)
  variables = ref.random_variables(model, x, train=False)
  out = _apply(model)(variables, x, train=False)
  assert set(variables["params"]) == {"backbone"}
  backbone = _apply(DeepLabLargeFOV(**BACKBONE))
  bb_vars = {"params": variables["params"]["backbone"]}
  grid = (6, 5)  # 41 -> 21 -> 11 -> 6, 33 -> 17 -> 9 -> 5
  for i, size in enumerate([(41, 33), (31, 25), (21, 17)]):  # floor(40 s) + 1, floor(32 s) + 1
    scores, _ = backbone(bb_vars, ref.bilinear(x, size).astype(np.float32), train=False)
    np.testing.assert_allclose(out.native[i], scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.per_scale[:, :, :, i], ref.bilinear(np.asarray(scores, np.float64), grid),
                               rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.fused, np.asarray(out.per_scale).mean(3), rtol=1e-5, atol=1e-6)
  assert out.scales == (1.0, 0.75, 0.5)


def test_sizes_at_321():
  model = MultiScaleNet(scales=(1.0, 0.75, 0.5), **TINY)
  images = jax.ShapeDtypeStruct((2, 321, 321, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert [n.shape for n in out.native] == [(2, 41, 41, 5), (2, 31, 31, 5), (2, 21, 21, 5)]
  assert out.fused.shape == (2, 41, 41, 5) and out.per_scale.shape == (2, 41, 41, 3, 5)
  assert out.weights.shape == (2, 41, 41, 3)


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.75, 0.5)])
def test_vmap_path_equals_loop_path(scales):
  x = np.random.default_rng(1).normal(size=(2, 65, 57, 3)).astype(np.float32)
  loop = MultiScaleNet(scales=scales, scale_execution="loop", **TINY)
  vmap = MultiScaleNet(scales=scales, scale_execution="vmap", **TINY)
  variables = ref.random_variables(loop, x, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(jax.eval_shape(
      lambda: vmap.init(jax.random.key(0), x, train=False)))
  a, b = _apply(loop)(variables, x, train=False), _apply(vmap)(variables, x, train=False)
  assert [n.shape[1:3] for n in a.native] == [(9, 8), (7, 7), (5, 5)][:len(scales)]
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert u.shape == v.shape
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
  assert np.asarray(a.weights).std() > 0.01 or len(scales) == 1  # attention is not trivially uniform


def test_one_set_of_parameters_serves_all_scales():
  x = jnp.zeros((1, 33, 33, 3))
  shapes = lambda scales, fusion: jax.tree.map(jnp.shape, jax.eval_shape(
      lambda: MultiScaleNet(scales=scales, fusion=fusion, **TINY).init(jax.random.key(0), x, train=False)))
  assert shapes((1.0,), "average") == shapes((1.0, 0.75, 0.5), "max") == {"params": {"backbone": shapes(
      (1.0,), "average")["params"]["backbone"]}}
  attention = shapes((1.0, 0.5), "attention")["params"]
  assert attention["backbone"] == shapes((1.0,), "average")["params"]["backbone"]
  assert attention["fusion"]["hidden"]["kernel"] == (3, 3, 2 * 16, 8)  # concat of 2 fc7 maps


@pytest.mark.parametrize("fusion, scale_execution", [("attention", "loop"), ("max", "vmap")])
def test_gradients_reach_every_layer(fusion, scale_execution):
  x = np.random.default_rng(2).normal(size=(1, 33, 33, 3)).astype(np.float32)
  model = MultiScaleNet(scales=(1.0, 0.5), fusion=fusion, scale_execution=scale_execution, **TINY)
  params = ref.random_variables(model, x, train=False)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=True, rngs={"dropout": ref.dropout_key(3)}).fused ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert set(grads) == ({"backbone", "fusion"} if fusion == "attention" else {"backbone"})
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, jax.tree_util.keystr(path)


def test_build_model_from_config_and_bfloat16():
  cfg = ml_collections.ConfigDict(dict(base.get_config().model))
  cfg.update(dict(TINY, scales=(1.0, 0.5), dtype="float32"))
  x = np.random.default_rng(4).normal(size=(1, 33, 33, 3)).astype(np.float32)
  model = build_model(cfg)
  assert isinstance(model, MultiScaleNet) and model.scales == (1.0, 0.5) and model.dtype == jnp.float32
  variables = ref.random_variables(model, x, train=False)
  cfg.dtype = "bfloat16"
  bf16 = build_model(cfg)
  abstract = jax.eval_shape(lambda: bf16.init(jax.random.key(0), x, train=False))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(abstract))
  out32, out16 = _apply(model)(variables, x, train=False), _apply(bf16)(variables, x, train=False)
  assert out16.fused.dtype == jnp.bfloat16 and out16.weights.shape == (1, 5, 5, 2)
  scale = np.abs(np.asarray(out32.fused)).max()
  np.testing.assert_allclose(np.asarray(out16.fused, np.float32), out32.fused, atol=0.05 * scale)


def test_bad_settings_are_reported():
  x = jnp.zeros((1, 17, 17, 3))
  init = lambda **kw: jax.eval_shape(lambda: MultiScaleNet(**dict(TINY, **kw)).init(jax.random.key(0), x,
                                                                                     train=False))
  with pytest.raises(ValueError, match="first scale to be 1.0"):
    init(scales=(0.5, 1.0))
  with pytest.raises(ValueError, match="scale_execution='pmap'"):
    init(scale_execution="pmap")
  with pytest.raises(ValueError, match="every scale <= 1"):
    init(scales=(1.0, 1.5), scale_execution="vmap")
  cfg = ml_collections.ConfigDict(dict(base.get_config().model))
  cfg.dtype = "float16"
  with pytest.raises(ValueError, match="config.model.dtype='float16'"):
    build_model(cfg)
