"""Mean-field inference of the fully connected CRF, batched and jitted; see the package docstring for the model."""
from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from scaleattn.crf import lattice
from scaleattn.crf.filters import COLOUR_MAX, gaussian_filter_exact, pixel_features, spatial_filter
from scaleattn.crf.grid import bilateral_grid

FILTERS = ("lattice", "grid", "exact")
Kernel = Callable[[jax.Array], jax.Array]  # [H, W, C] -> [H, W, C]


def _flat_exact(values: jax.Array, features: jax.Array) -> jax.Array:
  """gaussian_filter_exact on [H, W, C] values with [H * W, D] features."""
  h, w, c = values.shape
  return gaussian_filter_exact(values.reshape(h * w, c), features).reshape(h, w, c)


def _flat_lattice(values: jax.Array, lat: lattice.Lattice) -> jax.Array:
  """lattice.apply on [H, W, C] values."""
  h, w, c = values.shape
  return lattice.apply(lat, values.reshape(h * w, c)).reshape(h, w, c)


BOUNDED_MESSAGE_LIMIT = 50.0  # float32 exp(x) for |x| <= 50 + log(classes) neither overflows nor underflows


def _softmax_of_bounded(x: jax.Array) -> jax.Array:
  """softmax over the last axis of logits whose largest entry per pixel lies within +-BOUNDED_MESSAGE_LIMIT: no
  max subtraction, and the sum over classes as a dot, which XLA CPU computes once on its own; as a reduction it
  was fused with the lattice's slice that produces x, and the whole iteration ran 1.6x slower."""
  e = jnp.exp(x)
  total = jnp.dot(e, jnp.ones((x.shape[-1], 1), x.dtype), precision=jax.lax.Precision.HIGHEST)
  return e * (1.0 / total)


def _iterate(log_p: jax.Array, mask: jax.Array, kernels: Sequence[Kernel], weights: Sequence[float], *,
             iterations: int, normalize: bool) -> jax.Array:
  """The parallel updates from Q = softmax(log_p); the kernels are built once, outside the loop."""
  bounded = normalize and sum(abs(w) for w in weights) <= BOUNDED_MESSAGE_LIMIT
  softmax = functools.partial(jax.nn.softmax, axis=-1)
  # A normalized message is within +-sum |w| (Q in [0, 1], and every filter's weights are >= 0, so K(Q m) / K(m)
  # lies in [0, 1]); with max log_p 0, so is the logits' max.
  if bounded:
    log_p, softmax = log_p - jnp.max(log_p, axis=-1, keepdims=True), _softmax_of_bounded
  if normalize:  # densecrf: divide by the kernel's row sum over present pixels, self included
    weights = [weight / jnp.maximum(kernel(mask), 1e-20) for weight, kernel in zip(weights, kernels, strict=True)]

  def step(_, q: jax.Array) -> jax.Array:
    q = q * mask
    message = sum(weight * kernel(q) for weight, kernel in zip(weights, kernels, strict=True))
    if not normalize:
      message = message - sum(weights) * q  # j != i: both kernels are 1 at distance 0
    return softmax(log_p + message)

  return jax.lax.fori_loop(0, iterations, step, jax.nn.softmax(log_p, axis=-1))


def _mean_field(logits: jax.Array, image: jax.Array, valid: jax.Array, *, iterations: int, bilateral_weight: float,
                bilateral_xy_std: float, bilateral_rgb_std: float, gaussian_weight: float, gaussian_xy_std: float,
                filter: str, normalize: bool) -> jax.Array:
  """One image: logits [H, W, C], image [H, W, 3], valid [H, W] -> Q [H, W, C]."""
  h, w = logits.shape[:2]
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # -unary
  mask = valid.astype(jnp.float32)[..., None]
  feats = pixel_features(image)
  weights = [bilateral_weight, gaussian_weight]
  run = functools.partial(_iterate, log_p, mask, weights=weights, iterations=iterations, normalize=normalize)
  if filter == "exact":
    bi_feats = (feats / jnp.asarray([bilateral_xy_std] * 2 + [bilateral_rgb_std] * 3, jnp.float32)).reshape(h * w, 5)
    pos_feats = (feats[..., :2] / gaussian_xy_std).reshape(h * w, 2)
    q = run([functools.partial(_flat_exact, features=bi_feats), functools.partial(_flat_exact, features=pos_feats)])
  elif filter == "grid":
    q = run([bilateral_grid(feats, bilateral_xy_std, bilateral_rgb_std),
             functools.partial(spatial_filter, xy_std=gaussian_xy_std)])
  else:
    present = valid.reshape(h * w)
    stds = [(bilateral_xy_std,) * 2 + (bilateral_rgb_std,) * 3, (gaussian_xy_std,) * 2]
    highs = [(w - 1.0, h - 1.0) + (COLOUR_MAX,) * 3, (w - 1.0, h - 1.0)]
    built = []  # per kernel: (layout, keys, capacities)
    for std, high in zip(stds, highs, strict=True):
      f = jnp.clip(feats[..., :len(std)].reshape(h * w, len(std)), 0.0, jnp.asarray(high)) / jnp.asarray(std)
      layout = lattice.key_layout(tuple((0.0, hi / s) for hi, s in zip(high, std, strict=True)))
      built.append((layout, lattice.lattice_keys(f, present, layout), lattice.capacities(h * w, len(std), layout)))

    def branch(sizes: tuple[int, ...]) -> jax.Array:
      lattices = [lattice.with_capacity(keys, layout, k) for (layout, keys, _), k in zip(built, sizes, strict=True)]
      return run([functools.partial(_flat_lattice, lat=lat) for lat in lattices])

    options = list(itertools.product(*(caps for _, _, caps in built)))
    index = 0
    for _, keys, caps in built:  # row-major index of the chosen capacities in `options`
      index = index * len(caps) + lattice.switch_capacity(keys, caps)
    q = jax.lax.switch(index, [functools.partial(branch, sizes) for sizes in options])
  return jnp.where(mask > 0, q, jnp.exp(log_p))


@functools.partial(jax.jit, static_argnames=("iterations", "bilateral_weight", "bilateral_xy_std",
                                             "bilateral_rgb_std", "gaussian_weight", "gaussian_xy_std", "filter",
                                             "normalize"))
def dense_crf(unary_logits: jax.Array, image: jax.Array, valid: jax.Array | None = None, *, iterations: int = 10,
              bilateral_weight: float = 4.0, bilateral_xy_std: float = 121.0, bilateral_rgb_std: float = 5.0,
              gaussian_weight: float = 3.0, gaussian_xy_std: float = 3.0, filter: str = "lattice",
              normalize: bool = True) -> jax.Array:
  """Mean-field inference of the fully connected CRF; returns Q [B, H, W, C], probabilities over the last axis.

  unary_logits [B, H, W, C]: the network's scores at image resolution (the unary is -log softmax of them).
  image [B, H, W, 3]: RGB in 0..255, float or uint8. valid [B, H, W] bool (default all): padding is absent, see
  the package docstring, which also gives the update equations, the `normalize` convention and the defaults'
  sources (DeepLab-LargeFOV's VOC settings; the Attention-to-Scale paper's text gives bilateral xy std 49).
  filter: 'lattice' (permutohedral lattice for both kernels, as densecrf; normalize=True only), 'grid' (bilateral
  grid + exact separable position kernel) or 'exact' (all pairs, small images only).
  Examples run one after another (lax.map): one image's lattice or grid is already large."""
  if filter not in FILTERS:
    raise ValueError(f"dense_crf: filter={filter!r}, expected one of {FILTERS}")
  if filter == "lattice" and not normalize:
    raise ValueError("dense_crf: filter='lattice' with normalize=False: the sparse lattice's kernel is known only "
                     "up to a data-dependent scale (blur mass is lost where lattice points are missing), which the "
                     "normalized messages divide out; expected normalize=True, or filter='grid' or 'exact'")
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
