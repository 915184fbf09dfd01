"""The CPU convolution kernels compute what a plain convolution computes: values against a NumPy tap-by-tap
convolution, gradients against a NumPy transcription of the convolution's adjoints; and each shape runs the form
meant for it."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from scaleattn.kernels import cpu_conv as conv
from scaleattn.models import layers


def _np_grads(x, w, g, dilation):
  """d<conv(x, w), g>/dx and /dw for a 'SAME' convolution, tap by tap."""
  kh, kw = w.shape[:2]
  ph, pw = dilation * (kh // 2), dilation * (kw // 2)
  h, wd = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  dxp, dw = np.zeros_like(xp), np.zeros_like(w)
  for i, j in itertools.product(range(kh), range(kw)):
    window = (slice(None), slice(i * dilation, i * dilation + h), slice(j * dilation, j * dilation + wd))
    dw[i, j] = np.einsum("bhwc,bhwo->co", xp[window], g)
    dxp[window] += g @ w[i, j].T
  return dxp[:, ph:ph + h, pw:pw + wd], dw


def _check(fn, shape, cout, dilation, kernel=3):
  rng = np.random.default_rng(sum(shape) + dilation)
  x = rng.normal(size=shape)
  w = rng.normal(size=(kernel, kernel, shape[-1], cout)) / np.sqrt(kernel * kernel * shape[-1])
  g = rng.normal(size=shape[:3] + (cout,))
  y, vjp = jax.vjp(lambda a, b: fn(a, b, dilation), jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  dx, dw = vjp(jnp.asarray(g, jnp.float32))
  ref_dx, ref_dw = _np_grads(x, w, g, dilation)
  np.testing.assert_allclose(y, ref.conv(x, w, 0.0, dilation), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape, dilation", [((1, 9, 11, 3), 3), ((2, 7, 7, 4), 4), ((1, 5, 6, 2), 1)])
def test_per_tap_matmuls_over_the_valid_overlap(shape, dilation):
  _check(jax.jit(conv.conv_by_taps, static_argnums=2), shape, 5, dilation)


@pytest.mark.parametrize("strips", [1, 2, 5])
@pytest.mark.parametrize("dilation", [1, 2])
def test_weight_gradient_in_row_strips(strips, dilation):
  _check(jax.jit(lambda x, w, d: conv._conv_strip_wgrad(x, w, d, strips), static_argnums=2), (2, 13, 8, 3), 4,
         dilation)


@pytest.mark.parametrize("shape, strips", [((1, 9, 11, 64), 0), ((2, 8, 5, 64), 0), ((2, 8, 5, 64), 3)])
def test_winograd_with_its_adjoints(shape, strips):
  """F(2x2, 3x3) tiles, odd and even sizes; input gradient from the permuted kernel transform; weight gradient
  from the tiles' products (strips=0) or XLA's in row strips."""
  _check(jax.jit(lambda x, w, d: conv._conv_winograd(x, w, strips), static_argnums=2), shape, 6, 1)


@pytest.mark.parametrize("shape, cout, dilation, kernel, form", [
    ((1, 130, 121, 2), 3, 1, 3, "strips"),  # >= 120 x 120
    ((1, 21, 21, 3), 3, 12, 3, "taps"),  # most taps read padding
    ((1, 20, 20, 3), 3, 2, 3, "xla"),  # few channels, small map
    ((1, 11, 9, 128), 128, 1, 3, "winograd"),
    ((1, 24, 22, 128), 128, 2, 3, "winograd_phases"),  # as conv5 (dilation 2)
    ((1, 6, 5, 3), 3, 1, 1, "matmul")])  # 1x1
def test_conv2d_picks_its_form_and_stays_exact(shape, cout, dilation, kernel, form):
  assert conv.choose(shape, (kernel, kernel, shape[-1], cout), dilation, jnp.float32) == form
  _check(jax.jit(conv.conv2d, static_argnums=2), shape, cout, dilation, kernel)


@pytest.mark.parametrize("size, conv5, fc6", [(41, 41, 41), (31, 31, 31), (21, 21, 21)])
def test_voc_conv5_runs_winograd_on_its_dilation_phases_at_every_scale(size, conv5, fc6):
  """VGG-16 LargeFOV at scales 1, 0.75, 0.5 (321, 241, 161 px crops) has conv5 (512 -> 512, dilation 2) and fc6
  (512 -> 1024, dilation 12) on these maps: conv5 runs Winograd on its phases, fc6 per-tap matmuls, in float32;
  bfloat16 keeps XLA's convolution for conv5."""
  assert conv.choose((1, conv5, conv5, 512), (3, 3, 512, 512), 2, jnp.float32) == "winograd_phases"
  assert conv.choose((1, conv5, conv5, 512), (3, 3, 512, 512), 2, jnp.bfloat16) == "xla"
  assert conv.choose((1, fc6, fc6, 512), (3, 3, 512, 1024), 12, jnp.float32) == "taps"
  assert size == conv5


def test_winograd_under_vmap():
  """The vmap scale-execution path batches the custom VJPs: per-example values and input gradients, and the weight
  gradient summed over the mapped axis."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 1, 7, 6, 128))
  w = rng.normal(size=(3, 3, 128, 128)) / 34
  g = rng.normal(size=(2, 1, 7, 6, 128))
  for dilation in (1, 2):
    def loss(a, b, d=dilation):
      return jnp.sum(jax.vmap(lambda xi: conv.conv2d(xi, b, d))(a) * g)
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    refs = [_np_grads(x[i], w, g[i], dilation) for i in range(2)]
    np.testing.assert_allclose(dx, np.stack([r[0] for r in refs]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, sum(r[1] for r in refs), rtol=1e-4, atol=1e-3)


def test_valid_fraction():
  assert conv.valid_fraction(41, 41, 3, 1) == pytest.approx(((40 + 41 + 40) / 123) ** 2)
  assert conv.valid_fraction(21, 21, 3, 12) == pytest.approx(((9 + 21 + 9) / 63) ** 2)
  assert conv.valid_fraction(5, 5, 3, 12) == pytest.approx(1 / 9)


@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_conv_module_has_nn_conv_parameters(impl):
  x = jnp.ones((1, 6, 6, 3))
  ours = layers.Conv(4, 3, 2, impl=impl).init(jax.random.key(0), x)["params"]
  flax_conv = nn.Conv(4, (3, 3), kernel_dilation=2).init(jax.random.key(0), x)["params"]
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(lambda a: (a.shape, a.dtype), flax_conv)
