"""Fully connected CRF post-processing: batched, jitted mean-field inference (Kraehenbuehl & Koltun 2011).

The model (the paper's Eq. 1-4): unary psi_u(l) = -log softmax(scores)(l); Potts pairwise terms
mu(l, l') = [l != l'] weighted by two Gaussian kernels over all pixel pairs i != j,

  k_bilateral(i, j) = exp(-|p_i - p_j|^2 / (2 bilateral_xy_std^2) - |I_i - I_j|^2 / (2 bilateral_rgb_std^2))
  k_gaussian(i, j)  = exp(-|p_i - p_j|^2 / (2 gaussian_xy_std^2))

(p: pixel position (x = column, y = row), I: RGB in 0..255). One parallel mean-field update is

  Q_i(l) = softmax_l(-psi_u_i(l) + m_i(l)),   m_i(l) = sum_k w_k sum_{j != i} k(i, j) Q_j(l),

which equals the paper's exp(-psi_u_i(l) - sum_{l'} mu(l, l') m_i(l')) / Z_i: under Potts the other labels'
message is sum_{l'} m_i(l') - m_i(l), and the sum over l' is the same for every l so it cancels in the softmax.
The exclusion j != i subtracts the self-contribution k(i, i) Q_i = Q_i: k(i, i) = 1 for the exact kernels, and the
bilateral grid is rescaled to make its own self-weight exactly 1 too. Q starts at softmax(scores).

`normalize=True` switches to the convention of Kraehenbuehl's released densecrf code (PottsPotential, which the
CRF of DeepLab's release, `run_densecrf.sh`, is built on): each kernel's message is divided by the kernel's row
sum, self included,
m_i(l) = sum_k w_k sum_j k(i, j) Q_j(l) / sum_j k(i, j), so a message is at most w_k. DeepLab's weights were tuned
for that normalized message (config.eval.crf sets normalize=True): with the paper's unnormalized kernels (this
function's default) the message grows with the
number of similar pixels (up to 2 pi 121^2 ~ 9e4 times w in a uniform region at xy std 121), so the same weights
make a much stronger CRF. The normalized update is not a mean-field step of a symmetric pairwise energy.

Parameters (defaults): DeepLab-LargeFOV's released PASCAL VOC CRF settings, bi_w=4, bi_xy_std=121, bi_rgb_std=5,
pos_w=3, pos_xy_std=3, 10 mean-field iterations (DeepLab v1, Chen et al. 2015, released `run_densecrf.sh`). The
Attention-to-Scale paper's text (Chen et al. 2016) quotes bilateral w=4, xy 49, rgb 5; Gaussian w=3, xy 3: it
gives 49 where DeepLab-LargeFOV's release uses 121.

Filtering. filter='exact' sums over all pixel pairs (O(N^2) memory and time: small images, tests, measurement).
filter='grid' (the default) scales to 513x513 and beyond:
- the appearance kernel with a 5-D bilateral grid over (x, y, r, g, b) with cells one std wide (Paris & Durand
  2006; Chen, Paris & Durand 2007): splat each pixel onto its 32 surrounding cells with multilinear weights, blur
  every grid axis with a 5-tap sampled Gaussian exp(-2 d^2 / 3) (variance 0.73 cell^2; with the splat's and the
  slice's multilinear weights, 1/6 each, the effective kernel has about the unit variance of the target), slice back
  with the same weights, and rescale symmetrically so that k(i, i) = 1 (see bilateral_filter). Grid sizes are static:
  floor((W - 1) / xy_std) + 2, floor((H - 1) / xy_std) + 2 and floor(255 / rgb_std) + 2 cells per axis (6 x 6 x 53^3
  = 5.4M cells per class at 513x513 with DeepLab's stds: ~0.45 GB of float32 for 21 classes, per image; the batch
  is mapped sequentially to keep that per image). On GPU the splat's scatter-add sums in no fixed order, so results
  may differ from run to run at float32 rounding level;
- the position-only kernel exactly, as two [n, n] Gaussian matrices applied along rows and columns (separable).

Padding: pixels where `valid` is False are absent: their Q is zeroed before every filtering (they send nothing),
they are not counted in the normalization, and their output is softmax(scores) unchanged.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

FILTERS = ("grid", "exact")
COLOUR_MAX = 255.0  # the colour range the grid covers: images are RGB in 0..255 (values outside are clipped)
# The grid blur, per axis: exp(-2 d^2 / 3), d = -2..2, normalized (variance 0.73 cell^2). Among [1, 2, 1] / 4 and
# 5-tap sampled Gaussians of variance 0.45 to 0.92 it gave the smallest error against the exact kernel on random
# images (off-diagonal relative error 5-8%, against 6-11% for [1, 2, 1] / 4, over three image and std settings).
_BLUR_TAPS = np.exp(-2.0 * np.arange(-2, 3) ** 2 / 3.0) / np.exp(-2.0 * np.arange(-2, 3) ** 2 / 3.0).sum()
_HIGHEST = jax.lax.Precision.HIGHEST  # GPUs would otherwise run float32 matmuls at TF32 precision


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
  return jnp.matmul(jnp.exp(-0.5 * d2), values.astype(jnp.float32), precision=_HIGHEST)


def _grid_shape(h: int, w: int, xy_std: float, rgb_std: float) -> tuple[int, ...]:
  """Cells per grid axis (x, y, r, g, b): every position's floor cell and the next one fit in the grid."""
  return (int(math.floor((w - 1) / xy_std)) + 2, int(math.floor((h - 1) / xy_std)) + 2,
          *(int(math.floor(COLOUR_MAX / rgb_std)) + 2,) * 3)


def _blur_axis(grid: jax.Array, axis: int) -> jax.Array:
  """One axis of the separable grid blur; zero padding, as cells outside the grid hold nothing."""
  r = len(_BLUR_TAPS) // 2
  n = grid.shape[axis]
  pad = [(0, 0)] * grid.ndim
  pad[axis] = (r, r)
  padded = jnp.pad(grid, pad)
  return sum(float(c) * jax.lax.slice_in_dim(padded, k, k + n, axis=axis) for k, c in enumerate(_BLUR_TAPS))


def _bilateral_grid(positions_rgb: jax.Array, xy_std: float, rgb_std: float) -> Callable[[jax.Array], jax.Array]:
  """The grid filter for fixed positions [H, W, 5]: the corners and weights are computed once, outside the
  mean-field loop; the returned function filters [H, W, C] values."""
  h, w = positions_rgb.shape[:2]
  shape = _grid_shape(h, w, xy_std, rgb_std)
  if math.prod(shape) >= 2 ** 31:
    raise ValueError(f"bilateral grid of {shape} cells for a {h}x{w} image at xy std {xy_std}, rgb std {rgb_std}: "
                     "too large to index")
  scale = jnp.asarray([xy_std, xy_std, rgb_std, rgb_std, rgb_std], jnp.float32)
  upper = jnp.asarray(shape, jnp.float32) - 1.0
  u = jnp.clip(positions_rgb.reshape(h * w, 5).astype(jnp.float32) / scale, 0.0, upper)
  base = jnp.minimum(jnp.floor(u), upper - 1.0)
  t = u - base  # the offset in the lower cell, in [0, 1]
  base = base.astype(jnp.int32)
  strides = np.cumprod((1,) + shape[::-1])[:-1][::-1].astype(np.int32)  # row-major strides of the flat grid
  corners = []
  for bits in itertools.product((0, 1), repeat=5):
    b = np.asarray(bits, np.int32)
    corners.append((jnp.sum((base + b) * strides, axis=-1), jnp.prod(jnp.where(b == 1, t, 1.0 - t), axis=-1)))
  # The grid kernel's diagonal, splat-blur-slice at distance 0, per axis b0 ((1 - t)^2 + t^2) + 2 b1 t (1 - t).
  r = len(_BLUR_TAPS) // 2
  b0, b1 = float(_BLUR_TAPS[r]), float(_BLUR_TAPS[r + 1])
  diagonal = jnp.prod(b0 * (jnp.square(1.0 - t) + jnp.square(t)) + 2.0 * b1 * t * (1.0 - t), axis=-1)
  rescale = jax.lax.rsqrt(diagonal)[:, None]

  def apply(values: jax.Array) -> jax.Array:
    c = values.shape[-1]
    v = rescale * values.reshape(h * w, c).astype(jnp.float32)
    grid = jnp.zeros((math.prod(shape), c), jnp.float32)
    for index, weight in corners:  # one corner at a time: no [N, 32, C] intermediate at 513x513
      grid = grid.at[index].add(weight[:, None] * v)
    grid = grid.reshape(*shape, c)
    for axis in range(5):
      grid = _blur_axis(grid, axis)
    grid = grid.reshape(-1, c)
    sliced = sum(weight[:, None] * grid[index] for index, weight in corners)
    return (rescale * sliced).reshape(h, w, c)

  return apply


@functools.partial(jax.jit, static_argnames=("xy_std", "rgb_std"))
def bilateral_filter(values: jax.Array, positions_rgb: jax.Array, xy_std: float, rgb_std: float) -> jax.Array:
  """Bilateral-grid approximation of out_i = sum_j k(i, j) values_j (self included, k(i, i) = 1), k the
  unnormalized appearance kernel exp(-|p_i - p_j|^2 / (2 xy_std^2) - |I_i - I_j|^2 / (2 rgb_std^2)).

  values [H, W, C]; positions_rgb [H, W, 5] = (x, y, r, g, b) in pixels and 0..255 colour (pixel_features(image)):
  positions must lie in the image ([0, W - 1] x [0, H - 1]), colours are clipped to 0..255. xy_std and rgb_std are
  static: they set the grid's shape. Compare with gaussian_filter_exact(values, positions_rgb / stds).

  The grid kernel S_ij (splat-blur-slice) is not shift-invariant with one-std cells: its value at distance 0 runs
  from 0.35 to 0.46 per axis, depending on where the pixel falls in its cell (a factor of up to 4 in 5-D). It is
  rescaled symmetrically, k_ij = S_ij / sqrt(S_ii S_jj), which makes k(i, i) = 1 as for the exact kernel, keeps it
  symmetric and removes most of the error of the j != i sums (tests/test_crf.py bounds what is left)."""
  return _bilateral_grid(positions_rgb, xy_std, rgb_std)(values)


def _gaussian_matrix(n: int, std: float) -> np.ndarray:
  """[n, n] exp(-(i - j)^2 / (2 std^2)): one axis of the separable position kernel, exact."""
  d = np.arange(n, dtype=np.float64)
  return np.exp(-0.5 * np.square((d[:, None] - d[None, :]) / std)).astype(np.float32)


@functools.partial(jax.jit, static_argnames="xy_std")
def spatial_filter(values: jax.Array, xy_std: float) -> jax.Array:
  """out_i = sum_j exp(-|p_i - p_j|^2 / (2 xy_std^2)) values_j over all pixels of the [H, W, C] values, self
  included: exact, as the kernel is separable in rows and columns."""
  h, w = values.shape[:2]
  out = jnp.einsum("vh,hwc->vwc", _gaussian_matrix(h, xy_std), values.astype(jnp.float32), precision=_HIGHEST)
  return jnp.einsum("uw,vwc->vuc", _gaussian_matrix(w, xy_std), out, precision=_HIGHEST)


def _flat_exact(values: jax.Array, features: jax.Array) -> jax.Array:
  """gaussian_filter_exact on [H, W, C] values with [H * W, D] features."""
  h, w, c = values.shape
  return gaussian_filter_exact(values.reshape(h * w, c), features).reshape(h, w, c)


def _mean_field(logits: jax.Array, image: jax.Array, valid: jax.Array, *, iterations: int, bilateral_weight: float,
                bilateral_xy_std: float, bilateral_rgb_std: float, gaussian_weight: float, gaussian_xy_std: float,
                filter: str, normalize: bool) -> jax.Array:
  """One image: logits [H, W, C], image [H, W, 3], valid [H, W] -> Q [H, W, C]."""
  h, w = logits.shape[:2]
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # -unary
  mask = valid.astype(jnp.float32)[..., None]
  feats = pixel_features(image)
  if filter == "exact":
    bi_feats = (feats / jnp.asarray([bilateral_xy_std] * 2 + [bilateral_rgb_std] * 3, jnp.float32)).reshape(h * w, 5)
    pos_feats = (feats[..., :2] / gaussian_xy_std).reshape(h * w, 2)
    kernels = [functools.partial(_flat_exact, features=bi_feats), functools.partial(_flat_exact, features=pos_feats)]
  else:
    kernels = [_bilateral_grid(feats, bilateral_xy_std, bilateral_rgb_std),
               functools.partial(spatial_filter, xy_std=gaussian_xy_std)]
  weights = [bilateral_weight, gaussian_weight]
  if normalize:  # densecrf: divide by the kernel's row sum over present pixels, self included
    weights = [weight / jnp.maximum(kernel(mask), 1e-20) for weight, kernel in zip(weights, kernels, strict=True)]

  def step(_, q: jax.Array) -> jax.Array:
    q = q * mask
    message = sum(weight * kernel(q) for weight, kernel in zip(weights, kernels, strict=True))
    if not normalize:
      message = message - sum(weights) * q  # j != i: both kernels are 1 at distance 0
    return jax.nn.softmax(log_p + message, axis=-1)

  q0 = jnp.exp(log_p)
  q = jax.lax.fori_loop(0, iterations, step, q0)
  return jnp.where(mask > 0, q, q0)


@functools.partial(jax.jit, static_argnames=("iterations", "bilateral_weight", "bilateral_xy_std",
                                             "bilateral_rgb_std", "gaussian_weight", "gaussian_xy_std", "filter",
                                             "normalize"))
def dense_crf(unary_logits: jax.Array, image: jax.Array, valid: jax.Array | None = None, *, iterations: int = 10,
              bilateral_weight: float = 4.0, bilateral_xy_std: float = 121.0, bilateral_rgb_std: float = 5.0,
              gaussian_weight: float = 3.0, gaussian_xy_std: float = 3.0, filter: str = "grid",
              normalize: bool = False) -> jax.Array:
  """Mean-field inference of the fully connected CRF; returns Q [B, H, W, C], probabilities over the last axis.

  unary_logits [B, H, W, C]: the network's scores at image resolution (the unary is -log softmax of them).
  image [B, H, W, 3]: RGB in 0..255, float or uint8. valid [B, H, W] bool (default all): padding is absent, see
  the module docstring, which also gives the update equations, the `normalize` convention and the defaults'
  sources (DeepLab-LargeFOV's VOC settings; the Attention-to-Scale paper's text gives bilateral xy std 49).
  filter: 'grid' (bilateral grid + exact separable position kernel) or 'exact' (all pairs, small images only).
  Examples run one after another (lax.map): the grid of one 513x513 image is already large."""
  if filter not in FILTERS:
    raise ValueError(f"dense_crf: filter={filter!r}, expected one of {FILTERS}")
  if unary_logits.ndim != 4 or image.shape != unary_logits.shape[:3] + (3,):
    raise ValueError(f"dense_crf: unary_logits {unary_logits.shape} and image {image.shape}: expected [B, H, W, C] "
                     "and [B, H, W, 3]")
  if valid is None:
    valid = jnp.ones(unary_logits.shape[:3], bool)
  run = functools.partial(_mean_field, iterations=iterations, bilateral_weight=bilateral_weight,
                          bilateral_xy_std=bilateral_xy_std, bilateral_rgb_std=bilateral_rgb_std,
                          gaussian_weight=gaussian_weight, gaussian_xy_std=gaussian_xy_std, filter=filter,
                          normalize=normalize)
  return jax.lax.map(lambda args: run(*args), (unary_logits, image, valid.astype(bool)))
