"""Caffe's align-corners geometry: scale and output sizes, and bilinear resizes as small interpolation matrices.

A resize is two einsums with [out, in] weight matrices built in NumPy at trace time: cheaper to run and to
differentiate than a gather, and the same on CPU, GPU and TPU.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def scaled_size(n: int, scale: float) -> int:
  """Caffe Interp's size for a scale: floor((n - 1) * s) + 1 (321 -> 241 at 0.75, 161 at 0.5)."""
  if not scale > 0:
    raise ValueError(f"scaled_size: scale={scale!r}, expected a positive number")
  return int(math.floor((n - 1) * scale + 1e-9)) + 1  # the epsilon absorbs float error such as 320 * 0.3


def pool_size(n: int) -> int:
  """Caffe's ceil-mode 3x3, stride 2, pad 1 max-pool: ceil((n - 1) / 2) + 1."""
  return n // 2 + 1


def output_size(n: int) -> int:
  """DeepLab-LargeFOV's output size: three stride-2 pools (321 -> 41, 513 -> 65, 241 -> 31, 161 -> 21)."""
  for _ in range(3):
    n = pool_size(n)
  return n


def interpolation_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
  """Per output position, at align-corners position i * (n_in - 1) / (n_out - 1): its first input tap and the
  second tap's weight (the first has 1 minus it; the second tap is the next input position)."""
  if n_in == 1 or n_out == 1:
    return np.zeros(n_out, int), np.zeros(n_out, np.float32)
  pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
  return lo, (pos - lo).astype(np.float32)


def interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] bilinear weights at align-corners positions i * (n_in - 1) / (n_out - 1)."""
  m = np.zeros((n_out, n_in), np.float32)
  lo, frac = interpolation_taps(n_out, n_in)
  m[np.arange(n_out), lo] = 1.0 - frac
  if n_in > 1:
    m[np.arange(n_out), lo + 1] += frac
  return m


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes [B, H, W, ...] to [B, h, w, ...] (bilinear, align corners), in x's dtype."""
  h, w = size
  if x.shape[1:3] == (h, w):
    return x
  return apply_matrices(x, interpolation_matrix(h, x.shape[1]), interpolation_matrix(w, x.shape[2]))


def resizer(size: tuple[int, int]) -> Callable[[jax.Array], jax.Array]:
  """`resize_bilinear` to `size`, as a function of the map alone (how a map is brought to a fusion grid by
  default)."""
  return lambda x: resize_bilinear(x, size)


def apply_matrices(x: jax.Array, rows: jax.Array | np.ndarray, cols: jax.Array | np.ndarray) -> jax.Array:
  """[B, H, W, ...] -> [B, h, w, ...] with interpolation matrices rows [h, H] and cols [w, W], in x's dtype."""
  return jnp.einsum("hH,bHW...,wW->bhw...", jnp.asarray(rows, x.dtype), x, jnp.asarray(cols, x.dtype))


def nearest_indices(n_out: int, n_in: int) -> np.ndarray:
  """Source index nearest to each align-corners sample (321 -> 41 picks 0, 8, ..., 320 exactly)."""
  if n_out == 1:
    return np.zeros(1, int)
  return np.floor(np.arange(n_out) * (n_in - 1) / (n_out - 1) + 0.5).astype(int)
