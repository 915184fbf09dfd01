"""ScaleFusion: merges per-scale score maps into one (Chen et al., "Attention to Scale", CVPR 2016).

Self-contained (jax, flax and numpy only), so it can be copied into any Flax model::

    fusion = ScaleFusion("attention", num_scales=2, hidden=512)
    fused, weights = fusion(scores, features, train=True)  # scores [B,H,W,S,C], features [B,H,W,S,D]

'attention': a head (3x3 conv + ReLU + dropout, 1x1 conv to S) over the features concatenated across scales
gives a softmax over scales per pixel; fused = sum_s w_s * scores_s. 'average': w_s = 1/S. 'max': the per-class
maximum over scales; its weights are the one-hot of the scale holding the maximum of the winning class.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

METHODS = ("attention", "average", "max")


class ScaleFusion(nn.Module):
  """Fuses [B, H, W, S, C] scores over S scales; returns (fused [B, H, W, C], weights [B, H, W, S])."""
  method: str
  num_scales: int
  hidden: int = 512
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, scores: jax.Array, features: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    if self.method not in METHODS:
      raise ValueError(f"ScaleFusion.method={self.method!r}: expected one of {METHODS}")
    b, h, w, s, c = scores.shape
    if s != self.num_scales or features.shape[:4] != (b, h, w, s):
      raise ValueError(f"ScaleFusion: scores {scores.shape} and features {features.shape} must be [B, H, W, S, ...] "
                       f"with S = num_scales = {self.num_scales}")
    if self.method == "average":
      weights = jnp.full((b, h, w, s), 1.0 / s, scores.dtype)
      return scores.mean(axis=3), weights
    if self.method == "max":
      fused = scores.max(axis=3)
      winner = jnp.argmax(fused, axis=-1)  # [B, H, W]
      at_winner = jnp.take_along_axis(scores, winner[..., None, None], axis=-1)[..., 0]  # [B, H, W, S]
      return fused, jax.nn.one_hot(jnp.argmax(at_winner, axis=-1), s, dtype=scores.dtype)
    x = features.reshape(b, h, w, s * features.shape[-1]).astype(self.dtype)
    x = nn.Conv(self.hidden, (3, 3), padding="SAME", dtype=self.dtype, name="hidden",
                kernel_init=nn.initializers.normal(0.005), bias_init=nn.initializers.zeros)(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
    logits = nn.Conv(s, (1, 1), dtype=self.dtype, name="logits",
                     kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)(x)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    fused = jnp.einsum("bhws,bhwsc->bhwc", weights.astype(scores.dtype), scores)
    return fused, weights.astype(scores.dtype)
