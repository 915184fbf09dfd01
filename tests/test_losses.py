"""Losses against hand computations."""
import jax.numpy as jnp
import ml_collections
import numpy as np

from scaleattn import losses
from scaleattn.models import MultiScaleOutput


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(extra_supervision=True, scale_weights=None, per_scale_grid="output",
                                        ignore_label=255) | kw)


def test_cross_entropy_ignores_void_pixels():
  logits = np.array([[[[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [5.0, -5.0]]]], np.float32)  # [1, 2, 2, 2]
  labels = np.array([[[0, 1], [255, 255]]])
  expected = (np.log(1 + np.exp(-2.0)) + np.log(1 + np.exp(-1.0))) / 2
  np.testing.assert_allclose(losses.pixel_cross_entropy(logits, labels), expected, rtol=1e-6)
  assert float(losses.pixel_cross_entropy(logits, np.full((1, 2, 2), 255))) == 0.0


def test_downsample_picks_exact_label_pixels():
  labels = np.arange(321 * 321).reshape(1, 321, 321)
  out = np.asarray(losses.downsample_labels(jnp.asarray(labels), (41, 41)))
  np.testing.assert_array_equal(out[0], labels[0][::8, ::8])


def _output(rng, scales=2, grid=(3, 3)):
  per_scale = rng.normal(size=(1, *grid, scales, 4)).astype(np.float32)
  native = tuple(per_scale[:, :2, :2, s] * 2 for s in range(scales))  # distinct, smaller native grids
  return MultiScaleOutput(fused=per_scale.mean(3), per_scale=per_scale, weights=np.zeros((1, *grid, scales)),
                          native=native)


def test_extra_supervision_sums_terms():
  rng = np.random.default_rng(0)
  out = _output(rng)
  labels = rng.integers(0, 4, size=(1, 9, 9))
  small = labels[:, ::4, ::4]
  ce = lambda logits, lab: float(losses.pixel_cross_entropy(logits, lab))
  total, terms = losses.multiscale_loss(out, labels, _cfg(scale_weights=(1.0, 0.5)), (1.0, 0.5))
  assert set(terms) == {"fused", "scale_1", "scale_0.5"}
  np.testing.assert_allclose(terms["scale_0.5"], ce(out.per_scale[:, :, :, 1], small), rtol=1e-6)
  np.testing.assert_allclose(total, ce(out.fused, small) + ce(out.per_scale[:, :, :, 0], small)
                             + 0.5 * ce(out.per_scale[:, :, :, 1], small), rtol=1e-6)
  alone, terms = losses.multiscale_loss(out, labels, _cfg(extra_supervision=False), (1.0, 0.5))
  assert set(terms) == {"fused"}
  np.testing.assert_allclose(alone, ce(out.fused, small), rtol=1e-6)


def test_native_grid_option():
  rng = np.random.default_rng(1)
  out = _output(rng)
  labels = rng.integers(0, 4, size=(1, 9, 9))
  _, terms = losses.multiscale_loss(out, labels, _cfg(per_scale_grid="native"), (1.0, 0.5))
  np.testing.assert_allclose(terms["scale_0.5"],
                             float(losses.pixel_cross_entropy(out.native[1], labels[:, ::8, ::8])), rtol=1e-6)
