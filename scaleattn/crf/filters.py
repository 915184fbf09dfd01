"""Pixel features and the exact Gaussian filters: the all-pairs reference and the separable position kernel."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

COLOUR_MAX = 255.0  # images are RGB in 0..255: the grid and the lattice cover that range (values outside are clipped)
HIGHEST = jax.lax.Precision.HIGHEST  # GPUs would otherwise run float32 matmuls at TF32 precision


def pixel_features(image: jax.Array) -> jax.Array:
  """image [H, W, 3] -> [H, W, 5] features (x, y, r, g, b) in pixels and colour units (x is the column)."""
  h, w = image.shape[:2]
  y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  return jnp.concatenate([x[..., None], y[..., None], image.astype(jnp.float32)], axis=-1)


@jax.jit
def gaussian_filter_exact(values: jax.Array, features: jax.Array) -> jax.Array:
  """out_i = sum_j exp(-|f_i - f_j|^2 / 2) values_j over all pairs, self included (k(i, i) = 1).

  values [N, C], features [N, D] already divided by the stds. O(N^2): the reference the approximations are
  measured against, for small images only."""
  f = features.astype(jnp.float32)
  d2 = jnp.sum(jnp.square(f[:, None, :] - f[None, :, :]), axis=-1)
  return jnp.matmul(jnp.exp(-0.5 * d2), values.astype(jnp.float32), precision=HIGHEST)


def _gaussian_matrix(n: int, std: float) -> np.ndarray:
  """[n, n] exp(-(i - j)^2 / (2 std^2)): one axis of the separable position kernel, exact."""
  d = np.arange(n, dtype=np.float64)
  return np.exp(-0.5 * np.square((d[:, None] - d[None, :]) / std)).astype(np.float32)


@functools.partial(jax.jit, static_argnames="xy_std")
def spatial_filter(values: jax.Array, xy_std: float) -> jax.Array:
  """out_i = sum_j exp(-|p_i - p_j|^2 / (2 xy_std^2)) values_j over all pixels of the [H, W, C] values, self
  included: exact, as the kernel is separable in rows and columns."""
  h, w = values.shape[:2]
  out = jnp.einsum("vh,hwc->vwc", _gaussian_matrix(h, xy_std), values.astype(jnp.float32), precision=HIGHEST)
  return jnp.einsum("uw,vwc->vuc", _gaussian_matrix(w, xy_std), out, precision=HIGHEST)
