"""ScaleFusion: merges per-scale score maps into one (Chen et al., "Attention to Scale", CVPR 2016).

Depends on jax, flax and its sibling `resize.py` only, so the two files can be copied into any Flax model. Scores
of every scale must already be on one grid; features may be too, or may stay at each scale's own resolution::

    import jax, jax.numpy as jnp
    fusion = ScaleFusion("attention", num_scales=2, hidden=64)
    scores, feats = jnp.zeros((1, 41, 41, 2, 21)), jnp.zeros((1, 41, 41, 2, 128))  # [B, H, W, S, C|D]
    variables = fusion.init(jax.random.key(0), scores, feats, train=False)
    fused, weights = fusion.apply(variables, scores, feats, train=True, rngs={"dropout": jax.random.key(1)})
    # fused [1, 41, 41, 21], weights [1, 41, 41, 2]: one weight per pixel and scale, summing to 1
    native = [jnp.zeros((1, 41, 41, 128)), jnp.zeros((1, 21, 21, 128))]  # the same features before resizing
    fused, weights = fusion.apply(variables, scores, native, train=False)

Methods, per pixel i and class c:
  'attention': h = head(concat_s features_s), a 3x3 conv (`hidden` channels) + ReLU + dropout and a 1x1 conv to
               S channels; w_i^s = softmax_s(h_i^s); fused_{i,c} = sum_s w_i^s * scores_{i,c}^s.
  'average':   w_i^s = 1 / S.
  'max':       fused_{i,c} = max_s scores_{i,c}^s; the weights are the one-hot of the scale holding the maximum
               of the winning class (what the paper shows for max pooling). No parameters for these two.

Features given at their own resolutions are resized (bilinear, align corners) inside the head's first layer, after
its per-tap channel projection: resizing is linear and acts on each channel alike, so resize-then-project equals
project-then-resize, and the projection runs on the small maps (for VGG-16 LargeFOV at scales 1, 0.75, 0.5 the
head's cost falls by a third). The result is the same as for features resized first.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from .resize import resize_bilinear  # relative: the two files travel together

METHODS = ("attention", "average", "max")


def _shift(x: jax.Array, dy: int, dx: int) -> jax.Array:
  """out[:, i, j] = x[:, i + dy, j + dx], zero where that falls outside x."""
  h, w = x.shape[1:3]
  r0, r1, c0, c1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
  return jnp.pad(x[:, r0 + dy:r1 + dy, c0 + dx:c1 + dx], ((0, 0), (r0, h - r1), (c0, w - c1), (0, 0)))


class _ConcatConv3x3(nn.Module):
  """3x3 'SAME' conv of the per-scale feature maps concatenated on channels, each map resized to `grid` first.

  Parameters as nn.Conv(features, (3, 3)) over S * D channels. A map already on the grid goes through one
  convolution with its block of the kernel; a smaller map is projected per tap at its own resolution, then
  resized and shifted into place.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], grid: tuple[int, int]) -> jax.Array:
    d = maps[0].shape[-1]
    kernel = self.param("kernel", nn.initializers.normal(0.005), (3, 3, len(maps) * d, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    out = bias
    for i, x in enumerate(maps):
      block = kernel[:, :, i * d:(i + 1) * d]
      x = x.astype(self.dtype)
      if x.shape[1:3] == tuple(grid):
        out = out + lax.conv_general_dilated(x, block, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        continue
      for ky in range(3):
        for kx in range(3):
          projected = resize_bilinear(jnp.einsum("bhwd,do->bhwo", x, block[ky, kx]), grid)
          out = out + _shift(projected, ky - 1, kx - 1)
    return out


class ScaleFusion(nn.Module):
  """Fuses scores [B, H, W, S, C] over S scales; returns (fused [B, H, W, C], weights [B, H, W, S]).

  Attention parameters: 'hidden' (3x3 conv, init normal std 0.005) and 'logits' (1x1 conv, std 0.01), zero
  biases, float32; `dtype` is the compute dtype (the softmax over scales is always float32).
  """
  method: str
  num_scales: int
  hidden: int = 512
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, scores: jax.Array, features: jax.Array | Sequence[jax.Array], *, train: bool
               ) -> tuple[jax.Array, jax.Array]:
    """scores [B, H, W, S, C]; features [B, H, W, S, D] on the same grid, or a sequence of S maps [B, h_s, w_s, D]
    at the scales' own resolutions (the attention head brings them to the grid; other methods ignore them)."""
    if self.method not in METHODS:
      raise ValueError(f"ScaleFusion.method={self.method!r}: expected one of {METHODS}")
    maps = list(features) if isinstance(features, (list, tuple)) else [
        features[:, :, :, i] for i in range(features.shape[3])]
    shapes = [m.shape for m in maps]
    if (scores.ndim != 5 or scores.shape[3] != self.num_scales or len(maps) != self.num_scales
        or any(len(sh) != 4 or sh[0] != scores.shape[0] or sh[3] != shapes[0][3] for sh in shapes)):
      raise ValueError(f"ScaleFusion: scores {scores.shape} and features {shapes}: expected scores [B, H, W, S, C] "
                       f"and features [B, H, W, S, D] or S maps [B, h_s, w_s, D], S = num_scales = {self.num_scales}")
    b, h, w, s, _ = scores.shape
    if self.method == "average":
      return scores.mean(axis=3), jnp.full((b, h, w, s), 1.0 / s, scores.dtype)
    if self.method == "max":
      fused = scores.max(axis=3)
      winner = jnp.argmax(fused, axis=-1)[..., None, None]  # [B, H, W, 1, 1]
      at_winner = jnp.take_along_axis(scores, winner, axis=-1)[..., 0]  # [B, H, W, S]
      return fused, jax.nn.one_hot(jnp.argmax(at_winner, axis=-1), s, dtype=scores.dtype)
    x = nn.relu(_ConcatConv3x3(self.hidden, dtype=self.dtype, name="hidden")(maps, (h, w)))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Conv(s, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="logits",
                     kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)(x)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(scores.dtype)
    return jnp.einsum("bhws,bhwsc->bhwc", weights, scores), weights
