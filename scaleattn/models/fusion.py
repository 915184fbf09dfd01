"""ScaleFusion: merges per-scale score maps into one (Chen et al., "Attention to Scale", CVPR 2016, and two
scale-agnostic successors).

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

Methods, per pixel i and class c, with head(x) = a 3x3 conv (`hidden` channels) + ReLU + dropout + a 1x1 conv:
  'attention':        the paper's. h = head(concat_s features_s) with S output channels; w_i^s = softmax_s(h_i^s);
                      fused_{i,c} = sum_s w_i^s * scores_{i,c}^s. Its parameters fix S and the order of the scales.
  'shared_attention': one head with one output channel, shared by all scales, scores each scale from its own
                      features (brought to the grid): h^s = head(features_s); w^s = softmax_s(h^s) over the scales
                      present. The same parameters serve any set of scales; permuting scales permutes weights.
  'hierarchical':     Tao, Sapra, Catanzaro 2020 (arXiv 2005.10821). a_s = sigmoid(head(features_s)) on the scale's
                      own grid, resized to the common grid; from the highest scale down, each lower scale l takes
                      fused = a_l * p_l + (1 - a_l) * fused (the lowest scale has the last word, the highest scale's
                      attention is never used). The weights are the products this implies (they sum to 1).
                      Differences from NVIDIA/semantic-segmentation's `nscale_forward`: every term is combined on
                      the common (scale-1 output) grid, where theirs are combined at each scale's input
                      resolution, so up(a_l) * up(p_l) stands for their up(a_l * p_l), and a scale above 1 is
                      brought to the grid in one resize before combining instead of the running fusion being
                      brought down scale by scale (2 -> 1.5 -> 1); the two agree where a_l is constant over an
                      interpolation cell. The head is this module's (one 3x3 layer, no batch norm, dropout in
                      training) on the features it is given (fc7 here) rather than their two 3x3 conv-BN-ReLU
                      layers on the decoder's features.
  'average':          w_i^s = 1 / S.
  'max':              fused_{i,c} = max_s scores_{i,c}^s; the weights are the one-hot of the scale holding the
                      maximum of the winning class (what the paper shows for max pooling).
'average' and 'max' have no parameters; every method except 'attention' runs on scale sets it was not trained on.

For 'attention' and 'shared_attention', features given at their own resolutions are resized (bilinear, align
corners) inside the head's first layer, after its per-tap channel projection: resizing is linear and acts on each
channel alike, so resize-then-project equals project-then-resize, and the projection runs on the small maps (for
VGG-16 LargeFOV at scales 1, 0.75, 0.5 the head's cost falls by a third); the result is the same as for features
resized first. 'hierarchical' runs its head on each map as given (at its own resolution, as Tao et al.), so it
gives other weights for features resized first.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from .resize import resizer  # relative: the two files travel together

METHODS = ("attention", "shared_attention", "hierarchical", "average", "max")
# Methods whose parameters do not depend on the number or order of the scales.
SCALE_AGNOSTIC = ("shared_attention", "hierarchical", "average", "max")
PARAMETER_FREE = ("average", "max")


ToGrid = Callable[[jax.Array], jax.Array]


def _shift(x: jax.Array, dy: int, dx: int) -> jax.Array:
  """out[:, i, j] = x[:, i + dy, j + dx], zero where that falls outside x."""
  h, w = x.shape[1:3]
  r0, r1, c0, c1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
  return jnp.pad(x[:, r0 + dy:r1 + dy, c0 + dx:c1 + dx], ((0, 0), (r0, h - r1), (c0, w - c1), (0, 0)))


class _ConcatConv3x3(nn.Module):
  """3x3 'SAME' conv of the per-scale feature maps concatenated on channels, each map brought to `grid` first.

  Parameters as nn.Conv(features, (3, 3)) over S * D channels. A map already on the grid goes through one
  convolution with its block of the kernel; another is projected per tap at its own resolution, then brought to
  the grid (`to_grid`, default the bilinear resize) and shifted into place.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], grid: tuple[int, int],
               to_grid: Sequence[ToGrid] | None = None) -> jax.Array:
    d = maps[0].shape[-1]
    kernel = self.param("kernel", nn.initializers.normal(0.005), (3, 3, len(maps) * d, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    out = bias
    for i, x in enumerate(maps):
      block = kernel[:, :, i * d:(i + 1) * d]
      x = x.astype(self.dtype)
      if to_grid is None and x.shape[1:3] == tuple(grid):
        out = out + lax.conv_general_dilated(x, block, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        continue
      bring = resizer(grid) if to_grid is None else to_grid[i]
      for ky in range(3):
        for kx in range(3):
          out = out + _shift(bring(jnp.einsum("bhwd,do->bhwo", x, block[ky, kx])), ky - 1, kx - 1)
    return out


class ScaleFusion(nn.Module):
  """Fuses scores [B, H, W, S, C] over S scales; returns (fused [B, H, W, C], weights [B, H, W, S]).

  Head parameters: 'hidden' (3x3 conv, init normal std 0.005) and 'logits' (1x1 conv, std 0.01; S outputs for
  'attention', 1 for the shared heads), zero biases, float32; `dtype` is the compute dtype (softmax and sigmoid are
  always float32). `num_scales` is required by 'attention' and checked against the input when given.
  """
  method: str
  num_scales: int | None = None
  hidden: int = 512
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, scores: jax.Array, features: jax.Array | Sequence[jax.Array], *, train: bool,
               scales: Sequence[float] | None = None, to_grid: Sequence[ToGrid] | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """scores [B, H, W, S, C]; features [B, H, W, S, D] on the same grid, or a sequence of S maps [B, h_s, w_s, D]
    at the scales' own resolutions (the heads bring them to the grid; 'average' and 'max' ignore them).
    scales: the scale of each entry on the S axis; 'hierarchical' combines them from the highest down (default:
    the S axis is ordered from the highest scale to the lowest). to_grid: per map, how a map at its resolution is
    brought to the grid (default: the bilinear resize of the whole map; tiled inference passes the slice of that
    resize landing in a window)."""
    if self.method not in METHODS:
      raise ValueError(f"ScaleFusion.method={self.method!r}: expected one of {METHODS}")
    if self.method == "attention" and self.num_scales is None:
      raise ValueError("ScaleFusion('attention'): num_scales is required (the head has one output per scale)")
    maps = list(features) if isinstance(features, (list, tuple)) else [
        features[:, :, :, i] for i in range(features.shape[3])]
    shapes = [m.shape for m in maps]
    s = scores.shape[3] if scores.ndim == 5 else -1
    if (scores.ndim != 5 or self.num_scales not in (None, s) or len(maps) != s
        or any(len(sh) != 4 or sh[0] != scores.shape[0] or sh[3] != shapes[0][3] for sh in shapes)):
      raise ValueError(f"ScaleFusion: scores {scores.shape} and features {shapes}: expected scores [B, H, W, S, C] "
                       f"and features [B, H, W, S, D] or S maps [B, h_s, w_s, D], S = num_scales = {self.num_scales}")
    if scales is not None and len(scales) != s:
      raise ValueError(f"ScaleFusion: scales={tuple(scales)} for {s} score maps: expected one scale per map")
    b, h, w, _, _ = scores.shape
    if self.method == "average":
      return scores.mean(axis=3), jnp.full((b, h, w, s), 1.0 / s, scores.dtype)
    if self.method == "max":
      fused = scores.max(axis=3)
      winner = jnp.argmax(fused, axis=-1)[..., None, None]  # [B, H, W, 1, 1]
      at_winner = jnp.take_along_axis(scores, winner, axis=-1)[..., 0]  # [B, H, W, S]
      return fused, jax.nn.one_hot(jnp.argmax(at_winner, axis=-1), s, dtype=scores.dtype)

    hidden = _ConcatConv3x3(self.hidden, dtype=self.dtype, name="hidden")
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    logits = nn.Conv(s if self.method == "attention" else 1, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                     name="logits", kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)

    def head(inputs: Sequence[jax.Array], grid: tuple[int, int], bring: Sequence[ToGrid] | None) -> jax.Array:
      return logits(dropout(nn.relu(hidden(inputs, grid, bring)))).astype(jnp.float32)

    if self.method == "hierarchical":
      return self._hierarchical(scores, maps, scales, lambda m: head([m], m.shape[1:3], None), to_grid)
    if self.method == "attention":
      h_logits = head(maps, (h, w), to_grid)
    else:  # shared_attention
      h_logits = jnp.concatenate([head([m], (h, w), None if to_grid is None else [to_grid[i]])
                                  for i, m in enumerate(maps)], axis=-1)
    weights = jax.nn.softmax(h_logits, axis=-1).astype(scores.dtype)
    return jnp.einsum("bhws,bhwsc->bhwc", weights, scores), weights

  @staticmethod
  def _hierarchical(scores: jax.Array, maps: Sequence[jax.Array], scales: Sequence[float] | None,
                    attention_logit: Callable[[jax.Array], jax.Array], to_grid: Sequence[ToGrid] | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """Tao et al.'s pairwise combination from the highest scale down, and the per-scale weights it amounts to
    (each attention map brought to the scores' grid by `to_grid`, default the bilinear resize)."""
    s = scores.shape[3]
    to_grid = [resizer(scores.shape[1:3])] * s if to_grid is None else to_grid
    order = sorted(range(s), key=lambda i: -scales[i]) if scales is not None else list(range(s))
    fused = scores[:, :, :, order[0]]
    weights = jnp.zeros(scores.shape[:4], jnp.float32).at[..., order[0]].set(1.0)
    for i in order[1:]:
      a = to_grid[i](jax.nn.sigmoid(attention_logit(maps[i])))  # [B, H, W, 1], as Tao et al.
      fused = a.astype(scores.dtype) * scores[:, :, :, i] + (1 - a).astype(scores.dtype) * fused
      weights = (1 - a) * weights
      weights = weights.at[..., i].add(a[..., 0])
    return fused, weights.astype(scores.dtype)
