"""A 'SAME' convolution for the backbone that computes exactly what `lax.conv_general_dilated` computes, in the
pieces that XLA's CPU kernels run fastest (measured on a 2-core x86 CPU; on other backends it is plain lax.conv).

- Weight gradient in row strips: XLA:CPU computes the weight gradient of a large feature map (conv1, conv2 at
  321 px) at a third of its forward speed; summing the weight gradients of ~20-row strips (each with its halo)
  is 1.3-2x faster.
- Dilated convolutions as per-tap matmuls over the valid overlap only: with dilation 12 on a 41x41 map (fc6),
  a third of the taps' work multiplies the zero padding; skipping it makes fc6 1.3x (41x41) to 2.2x (21x21) faster.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

STRIP_ROWS = 20  # rows per weight-gradient strip
MIN_STRIP_PIXELS = 120 * 120  # maps smaller than this keep XLA's single weight-gradient convolution
MAX_VALID_FRACTION = 0.8  # per-tap matmuls when the taps' valid overlap is below this share of the full work


def _conv(x: jax.Array, w: jax.Array, dilation: int, padding) -> jax.Array:
  return lax.conv_general_dilated(x, w, (1, 1), padding, rhs_dilation=(dilation, dilation),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _tap_ranges(n: int, kernel: int, dilation: int) -> list[tuple[int, int, int]]:
  """(offset, first, end) per tap along one axis: output positions first..end-1 read input position + offset."""
  offsets = [(k - kernel // 2) * dilation for k in range(kernel)]
  return [(o, max(0, -o), min(n, n - o)) for o in offsets]


def valid_fraction(height: int, width: int, kernel: int, dilation: int) -> float:
  """Share of a 'SAME' convolution's multiply-adds that do not read the zero padding."""
  rows = sum(max(0, end - first) for _, first, end in _tap_ranges(height, kernel, dilation))
  cols = sum(max(0, end - first) for _, first, end in _tap_ranges(width, kernel, dilation))
  return rows * cols / (kernel * height * kernel * width)


def conv_by_taps(x: jax.Array, w: jax.Array, dilation: int) -> jax.Array:
  """'SAME' convolution as one matmul per kernel tap over the output region whose input is in the image."""
  _, h, wd, _ = x.shape
  kh, kw = w.shape[:2]
  out = None
  for ky, (oy, r0, r1) in enumerate(_tap_ranges(h, kh, dilation)):
    for kx, (ox, c0, c1) in enumerate(_tap_ranges(wd, kw, dilation)):
      if r0 >= r1 or c0 >= c1:
        continue
      part = jnp.einsum("bhwc,co->bhwo", x[:, r0 + oy:r1 + oy, c0 + ox:c1 + ox], w[ky, kx])
      part = jnp.pad(part, ((0, 0), (r0, h - r1), (c0, wd - c1), (0, 0)))
      out = part if out is None else out + part
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_strip_wgrad(x: jax.Array, w: jax.Array, dilation: int, strips: int) -> jax.Array:
  return _conv(x, w, dilation, "SAME")


def _strip_fwd(x, w, dilation, strips):
  return _conv(x, w, dilation, "SAME"), (x, w)


def _strip_bwd(dilation, strips, residuals, g):
  x, w = residuals
  pad = dilation * (w.shape[0] // 2)
  (dx,) = jax.vjp(lambda x_: _conv(x_, w, dilation, "SAME"), x)[1](g)
  rows = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0)))
  edges = np.linspace(0, x.shape[1], strips + 1).astype(int)
  dw = None
  for a, b in zip(edges[:-1], edges[1:], strict=True):
    strip = rows[:, a:b + 2 * pad]  # output rows a..b-1 read these input rows, halo included
    (part,) = jax.vjp(lambda w_, s=strip: _conv(s, w_, dilation, ((0, 0), (pad, pad))), w)[1](g[:, a:b])
    dw = part if dw is None else dw + part
  return dx, dw


_conv_strip_wgrad.defvjp(_strip_fwd, _strip_bwd)


def conv2d(x: jax.Array, w: jax.Array, dilation: int = 1) -> jax.Array:
  """x [B, H, W, Cin] * w [k, k, Cin, Cout] with 'SAME' padding and `dilation`, in the fastest form per backend."""
  if w.shape[:2] == (1, 1):
    return jnp.einsum("bhwc,co->bhwo", x, w[0, 0])
  if jax.default_backend() != "cpu":
    return _conv(x, w, dilation, "SAME")
  h, wd = x.shape[1:3]
  if valid_fraction(h, wd, w.shape[0], dilation) < MAX_VALID_FRACTION:
    return conv_by_taps(x, w, dilation)
  if h * wd >= MIN_STRIP_PIXELS:
    return _conv_strip_wgrad(x, w, dilation, max(1, h // STRIP_ROWS))
  return _conv(x, w, dilation, "SAME")


class Conv(nn.Module):
  """Drop-in for `nn.Conv(features, (k, k), kernel_dilation=d, padding='SAME')` (same parameter names, shapes and
  initialisers) running `conv2d`: float32 parameters, computed in `dtype`."""
  features: int
  kernel_size: int = 3
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return conv2d(x, kernel, self.dilation) + bias
