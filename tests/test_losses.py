"""Losses against hand computations."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scaleattn.models import MultiScaleOutput
from scaleattn.training import losses


def _cfg(**overrides):
  return ml_collections.ConfigDict(dict(extra_supervision=True, scale_weights=None, per_scale_grid="output")
                                   | overrides)


def _ce(logits, labels):
  """Mean -log softmax(logits)[label] over pixels whose label is not 255, in float64."""
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  valid = labels != 255
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  return -picked[valid].mean()


def test_cross_entropy_ignores_void_pixels():
  logits = np.array([[[[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [5.0, -5.0]]]], np.float32)  # [1, 2, 2, 2]
  labels = np.array([[[0, 1], [255, 255]]])
  expected = (np.log(1 + np.exp(-2.0)) + np.log(1 + np.exp(-1.0))) / 2  # the two labelled pixels only
  np.testing.assert_allclose(losses.pixel_cross_entropy(logits, labels), expected, rtol=1e-6)


def test_no_valid_pixel_gives_zero_loss_and_zero_gradient():
  logits = jnp.ones((2, 3, 3, 4))
  labels = jnp.full((2, 3, 3), 255)
  loss, grad = jax.value_and_grad(losses.pixel_cross_entropy)(logits, labels)
  assert float(loss) == 0.0 and not np.any(grad) and np.isfinite(grad).all()


def test_cross_entropy_of_bfloat16_logits_is_float32():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(1, 4, 4))
  loss = losses.pixel_cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, _ce(jnp.asarray(logits, jnp.bfloat16).astype(np.float32), labels), rtol=1e-5)


@pytest.mark.parametrize("out, step", [(41, 8), (21, 16), (321, 1)])
def test_downsample_picks_exact_label_pixels(out, step):
  labels = np.arange(321 * 321).reshape(1, 321, 321)
  result = np.asarray(losses.downsample_labels(jnp.asarray(labels), (out, out)))
  np.testing.assert_array_equal(result[0], labels[0][::step, ::step])


def test_downsample_takes_the_nearest_label():
  labels = np.arange(7 * 5).reshape(1, 7, 5)
  # align corners: rows 0, 1.5, 3, 4.5, 6 -> nearest 0, 2, 3, 5, 6 (halves round up); columns 0, 2, 4
  np.testing.assert_array_equal(losses.downsample_labels(jnp.asarray(labels), (5, 3))[0],
                                labels[0][[0, 2, 3, 5, 6]][:, [0, 2, 4]])


def _output(rng, scales=(1.0, 0.5), grid=(3, 3), batch=1):
  per_scale = rng.normal(size=(batch, *grid, len(scales), 4)).astype(np.float32)
  native = tuple(rng.normal(size=(batch, grid[0] - i, grid[1] - i, 4)).astype(np.float32)
                 for i in range(len(scales)))
  return MultiScaleOutput(fused=per_scale.mean(3), per_scale=per_scale, weights=np.zeros((batch, *grid, len(scales))),
                          own_grid=native, scales=scales)


def test_extra_supervision_adds_weighted_per_scale_terms():
  rng = np.random.default_rng(0)
  out = _output(rng)
  labels = rng.integers(0, 4, size=(1, 9, 9))
  labels[0, 0, 0] = 255  # an ignored pixel on the 3x3 grid
  small = labels[:, ::4, ::4]
  total, terms = losses.multiscale_loss(out, labels, _cfg(scale_weights=(1.0, 0.5)))
  assert set(terms) == {"fused", "scale_1", "scale_0.5"}
  np.testing.assert_allclose(terms["fused"], _ce(out.fused, small), rtol=1e-5)
  np.testing.assert_allclose(terms["scale_1"], _ce(out.per_scale[:, :, :, 0], small), rtol=1e-5)
  np.testing.assert_allclose(terms["scale_0.5"], _ce(out.per_scale[:, :, :, 1], small), rtol=1e-5)
  np.testing.assert_allclose(total, _ce(out.fused, small) + _ce(out.per_scale[:, :, :, 0], small)
                             + 0.5 * _ce(out.per_scale[:, :, :, 1], small), rtol=1e-5)


def test_extra_supervision_off_is_the_fused_loss_alone():
  rng = np.random.default_rng(1)
  out = _output(rng)
  labels = rng.integers(0, 4, size=(1, 9, 9))
  total, terms = losses.multiscale_loss(out, labels, _cfg(extra_supervision=False))
  assert set(terms) == {"fused"}
  np.testing.assert_allclose(total, _ce(out.fused, labels[:, ::4, ::4]), rtol=1e-5)


def test_native_grid_option_uses_each_scales_own_map():
  rng = np.random.default_rng(2)
  out = _output(rng, scales=(1.0, 0.75, 0.5), grid=(4, 4))
  labels = rng.integers(0, 4, size=(1, 7, 7))
  total, terms = losses.multiscale_loss(out, labels, _cfg(per_scale_grid="native"))
  assert set(terms) == {"fused", "scale_1", "scale_0.75", "scale_0.5"}
  # 7 -> 4: rows 0, 2, 4, 6; 7 -> 3: 0, 3, 6; 7 -> 2: 0, 6
  for name, native, idx in [("scale_1", out.own_grid[0], [0, 2, 4, 6]), ("scale_0.75", out.own_grid[1], [0, 3, 6]),
                            ("scale_0.5", out.own_grid[2], [0, 6])]:
    np.testing.assert_allclose(terms[name], _ce(native, labels[:, idx][:, :, idx]), rtol=1e-5)
  np.testing.assert_allclose(total, sum(float(t) for t in terms.values()), rtol=1e-5)


def test_authors_grid_takes_scales_from_075_on_the_output_grid_and_05_on_its_own():
  """The authors' configs: the 0.75 loss on its map upsampled to the scale-1 grid, the 0.5 loss on its own map."""
  rng = np.random.default_rng(5)
  out = _output(rng, scales=(1.0, 0.75, 0.5), grid=(4, 4))
  labels = rng.integers(0, 4, size=(1, 7, 7))
  _, terms = losses.multiscale_loss(out, labels, _cfg(per_scale_grid="authors"))
  on_grid = labels[:, [0, 2, 4, 6]][:, :, [0, 2, 4, 6]]
  np.testing.assert_allclose(terms["scale_1"], _ce(out.per_scale[:, :, :, 0], on_grid), rtol=1e-5)
  np.testing.assert_allclose(terms["scale_0.75"], _ce(out.per_scale[:, :, :, 1], on_grid), rtol=1e-5)
  np.testing.assert_allclose(terms["scale_0.5"], _ce(out.own_grid[2], labels[:, [0, 6]][:, :, [0, 6]]), rtol=1e-5)


def test_slices_normalised_by_the_whole_batch_sum_to_the_batch_loss():
  """Gradient accumulation: each slice's terms divided by the whole batch's valid pixels add up to the batch's."""
  rng = np.random.default_rng(6)
  out = _output(rng, grid=(3, 3), batch=2)
  labels = rng.integers(0, 4, size=(2, 9, 9))
  labels[0, :5] = 255  # the slices have different numbers of valid pixels
  cfg = _cfg(per_scale_grid="authors")
  whole, whole_terms = losses.multiscale_loss(out, labels, cfg)
  counts = {name: losses.valid_pixels(labels, x.shape[1:3])
            for name, x in losses.term_logits(out, cfg).items()}
  halves = [losses.multiscale_loss(jax.tree.map(lambda x, i=i: x[i:i + 1], out), labels[i:i + 1], cfg,
                                   pixel_counts=counts) for i in range(2)]
  np.testing.assert_allclose(halves[0][0] + halves[1][0], whole, rtol=1e-5)
  np.testing.assert_allclose(whole_terms["scale_0.5"], _ce(out.own_grid[1], labels[:, ::8, ::8]), rtol=1e-5)
  assert not np.isclose(halves[0][0], whole / 2, rtol=1e-3)  # each slice is not simply half the batch
  np.testing.assert_allclose(whole_terms["fused"], _ce(out.fused, labels[:, ::4, ::4]), rtol=1e-5)


def test_loss_is_jittable_and_scales_can_be_given_explicitly():
  rng = np.random.default_rng(3)
  out = _output(rng)
  labels = rng.integers(0, 4, size=(1, 9, 9))
  cfg = _cfg()
  total, terms = jax.jit(lambda o, y: losses.multiscale_loss(o, y, cfg))(out, labels)
  explicit, _ = losses.multiscale_loss(out.replace(scales=()), labels, cfg, scales=(1.0, 0.5))
  small = labels[:, ::4, ::4]
  want = _ce(out.fused, small) + _ce(out.per_scale[:, :, :, 0], small) + _ce(out.per_scale[:, :, :, 1], small)
  np.testing.assert_allclose(total, want, rtol=1e-5)  # the jitted loss against the hand computation
  np.testing.assert_allclose(explicit, want, rtol=1e-5)
  assert set(terms) == {"fused", "scale_1", "scale_0.5"}


def test_bad_loss_settings_are_reported():
  rng = np.random.default_rng(4)
  out, labels = _output(rng), rng.integers(0, 4, size=(1, 9, 9))
  with pytest.raises(ValueError, match="per_scale_grid='input'"):
    losses.multiscale_loss(out, labels, _cfg(per_scale_grid="input"))
  with pytest.raises(ValueError, match="one weight per scale"):
    losses.multiscale_loss(out, labels, _cfg(scale_weights=(1.0,)))
  with pytest.raises(ValueError, match="do not name the 2 scales"):
    losses.multiscale_loss(out.replace(scales=()), labels, _cfg())
