"""The backbone, the share-net over scales and their geometry, against hand-made references."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from scaleattn.models import DeepLabLargeFOV, MultiScaleNet, build_model, output_size, resize, scaled_size
from scaleattn.models.backbone import max_pool_3x3

TINY = dict(num_classes=5, block_widths=(4, 8, 8, 8, 8), block_depths=(1, 1, 2, 1, 1), fc_width=16,
            fc6_dilation=2, attention_hidden=8)


def test_vgg16_largefov_parameter_count_and_sizes():
  model = DeepLabLargeFOV(21)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 321, 321, 3)), train=False))
  assert sum(x.size for x in jax.tree.leaves(variables)) == 20_505_429
  assert variables["params"]["fc6"]["kernel"].shape == (3, 3, 512, 1024)
  for (h, w), (oh, ow) in {(321, 321): (41, 41), (513, 513): (65, 65), (353, 497): (45, 63)}.items():
    scores, fc7 = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                                 jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
    assert scores.shape == (1, oh, ow, 21) and fc7.shape == (1, oh, ow, 1024)
    assert (output_size(h), output_size(w)) == (oh, ow)


def test_caffe_sizes():
  assert [scaled_size(321, s) for s in (1, 0.75, 0.5)] == [321, 241, 161]
  assert [output_size(n) for n in (321, 241, 161)] == [41, 31, 21]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 7), (8, 5)])
def test_max_pool_is_caffe_ceil_mode(stride, size):
  x = np.random.default_rng(0).normal(size=(1,) + size + (2,)).astype(np.float32)
  h, w = size
  oh, ow = (-(-(h - 1) // stride) + 1, -(-(w - 1) // stride) + 1) if stride == 2 else (h, w)
  ref = np.full((1, oh, ow, 2), -np.inf, np.float32)
  for i, j in itertools.product(range(oh), range(ow)):
    r0, c0 = i * stride - 1, j * stride - 1
    window = x[:, max(r0, 0):min(r0 + 3, h), max(c0, 0):min(c0 + 3, w)]
    ref[:, i, j] = window.max(axis=(1, 2))
  np.testing.assert_array_equal(max_pool_3x3(jnp.asarray(x), stride), ref)


def test_bilinear_align_corners():
  x = np.random.default_rng(1).normal(size=(1, 5, 4, 1)).astype(np.float32)
  out = np.asarray(resize.resize_bilinear(jnp.asarray(x), (9, 7)))
  for i, j in itertools.product(range(9), range(7)):
    r, c = i * 4 / 8, j * 3 / 6  # align corners: first and last samples on first and last pixels
    r0, c0 = min(int(r), 3), min(int(c), 2)
    fr, fc = r - r0, c - c0
    v = ((1 - fr) * (1 - fc) * x[0, r0, c0] + (1 - fr) * fc * x[0, r0, c0 + 1]
         + fr * (1 - fc) * x[0, r0 + 1, c0] + fr * fc * x[0, r0 + 1, c0 + 1])
    np.testing.assert_allclose(out[0, i, j], v, rtol=1e-5, atol=1e-6)


def test_vmap_path_equals_loop_path():
  x = jax.random.normal(jax.random.key(1), (2, 65, 57, 3))
  loop = MultiScaleNet(scales=(1.0, 0.75, 0.5), scale_execution="loop", **TINY)
  vmap = MultiScaleNet(scales=(1.0, 0.75, 0.5), scale_execution="vmap", **TINY)
  variables = loop.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(vmap.init(jax.random.key(0), x, train=False))
  a, b = loop.apply(variables, x, train=False), vmap.apply(variables, x, train=False)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
  assert [n.shape[1:3] for n in a.native] == [(9, 8), (7, 7), (5, 5)]
  assert a.per_scale.shape == (2, 9, 8, 3, 5) and a.weights.shape == (2, 9, 8, 3)


def test_one_set_of_parameters_serves_all_scales():
  x = jnp.ones((1, 33, 33, 3))
  single = MultiScaleNet(scales=(1.0,), fusion="average", **TINY).init(jax.random.key(0), x, train=False)
  multi = MultiScaleNet(scales=(1.0, 0.5), fusion="average", **TINY).init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(single) == jax.tree.structure(multi)


def test_gradients_reach_head_and_backbone():
  x = jax.random.normal(jax.random.key(1), (1, 33, 33, 3))
  model = MultiScaleNet(scales=(1.0, 0.5), fusion="attention", **TINY)
  params = model.init(jax.random.key(0), x, train=False)["params"]
  grads = jax.grad(lambda p: model.apply({"params": p}, x, train=True,
                                         rngs={"dropout": jax.random.key(2)}).fused.sum())(params)
  for name in ("hidden", "logits"):
    assert np.abs(grads["fusion"][name]["kernel"]).sum() > 0
  assert np.abs(grads["backbone"]["conv1_1"]["kernel"]).sum() > 0


def test_build_model_from_config_and_bfloat16():
  cfg = ml_collections.ConfigDict(dict(base.get_config().model))
  cfg.update(dict(TINY, scales=(1.0, 0.5), dtype="bfloat16"))
  model = build_model(cfg)
  x = jnp.ones((1, 33, 33, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  out = model.apply(variables, x, train=False)
  assert out.fused.dtype == jnp.bfloat16 and out.weights.shape == (1, 5, 5, 2)
