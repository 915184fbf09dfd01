"""Align-corners geometry (Caffe's Interp) as small interpolation matrices applied with einsum."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def scaled_size(n: int, scale: float) -> int:
  """Caffe Interp's size for a scale: floor((n - 1) * s) + 1 (321 -> 241 at 0.75, 161 at 0.5)."""
  return int(math.floor((n - 1) * scale + 1e-9)) + 1


def output_size(n: int) -> int:
  """LargeFOV's output size: three ceil-mode 3x3 stride-2 pad-1 pools (321 -> 41, 513 -> 65)."""
  for _ in range(3):
    n = pool_size(n)
  return n


def pool_size(n: int) -> int:
  """Caffe's ceil-mode 3x3 stride-2 pad-1 pool: ceil((n - 1) / 2) + 1."""
  return n // 2 + 1


def interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] bilinear weights with align-corners sampling positions."""
  m = np.zeros((n_out, n_in), np.float32)
  if n_in == 1 or n_out == 1:
    m[:, 0] = 1.0
    return m
  pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
  frac = (pos - lo).astype(np.float32)
  m[np.arange(n_out), lo] = 1.0 - frac
  m[np.arange(n_out), lo + 1] += frac
  return m


def resize_bilinear(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """Resizes [B, H, W, ...] to [B, h, w, ...] (bilinear, align corners)."""
  h, w = size
  if x.shape[1:3] == (h, w):
    return x
  rows = jnp.asarray(interpolation_matrix(h, x.shape[1]), x.dtype)
  cols = jnp.asarray(interpolation_matrix(w, x.shape[2]), x.dtype)
  return jnp.einsum("hH,bHW...,wW->bhw...", rows, x, cols)


def nearest_indices(n_out: int, n_in: int) -> np.ndarray:
  """Nearest source index of each align-corners sample (321 -> 41 picks 0, 8, ..., 320)."""
  if n_out == 1:
    return np.zeros(1, int)
  return np.floor(np.arange(n_out) * (n_in - 1) / (n_out - 1) + 0.5).astype(int)
