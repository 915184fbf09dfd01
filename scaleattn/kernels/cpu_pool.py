"""Caffe's 3x3 ceil-mode max-pool as maxima of shifted slices: XLA:CPU runs this and its gradient faster than
`lax.reduce_window` (figures in the README's performance section). Chosen with the CPU convolutions."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def max_pool_3x3(x: jax.Array, stride: int, out_h: int, out_w: int) -> jax.Array:
  """[B, H, W, C] -> [B, out_h, out_w, C], the max over the 9 strided taps of the -inf-padded input (the caller
  gives the output size: ceil mode for Caffe), as 3 row taps then 3 column taps."""
  h, w = x.shape[1:3]
  span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1  # rows/columns one tap covers
  x = jnp.pad(x, ((0, 0), (1, span_h + 1 - h), (1, span_w + 1 - w), (0, 0)), constant_values=-jnp.inf)
  rows = functools.reduce(jnp.maximum, [x[:, i:i + span_h:stride] for i in range(3)])
  return functools.reduce(jnp.maximum, [rows[:, :, j:j + span_w:stride] for j in range(3)])
