"""ScaleFusion: merges per-scale score maps into one (Chen et al., "Attention to Scale", CVPR 2016).

Self-contained (jax and flax only), so the file can be copied into any Flax model. Scores and features of every
scale must already be on one grid::

    import jax, jax.numpy as jnp
    fusion = ScaleFusion("attention", num_scales=2, hidden=64)
    scores, feats = jnp.zeros((1, 41, 41, 2, 21)), jnp.zeros((1, 41, 41, 2, 128))  # [B, H, W, S, C|D]
    variables = fusion.init(jax.random.key(0), scores, feats, train=False)
    fused, weights = fusion.apply(variables, scores, feats, train=True, rngs={"dropout": jax.random.key(1)})
    # fused [1, 41, 41, 21], weights [1, 41, 41, 2]: one weight per pixel and scale, summing to 1

Methods, per pixel i and class c:
  'attention': h = head(concat_s features_s), a 3x3 conv (`hidden` channels) + ReLU + dropout and a 1x1 conv to
               S channels; w_i^s = softmax_s(h_i^s); fused_{i,c} = sum_s w_i^s * scores_{i,c}^s.
  'average':   w_i^s = 1 / S.
  'max':       fused_{i,c} = max_s scores_{i,c}^s; the weights are the one-hot of the scale holding the maximum
               of the winning class (what the paper shows for max pooling). No parameters for these two.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

METHODS = ("attention", "average", "max")


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
  def __call__(self, scores: jax.Array, features: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    if self.method not in METHODS:
      raise ValueError(f"ScaleFusion.method={self.method!r}: expected one of {METHODS}")
    if scores.ndim != 5 or scores.shape[3] != self.num_scales or features.shape[:4] != scores.shape[:4]:
      raise ValueError(f"ScaleFusion: scores {scores.shape} and features {features.shape}: expected "
                       f"[B, H, W, S, C] and [B, H, W, S, D] with S = num_scales = {self.num_scales}")
    b, h, w, s, _ = scores.shape
    if self.method == "average":
      return scores.mean(axis=3), jnp.full((b, h, w, s), 1.0 / s, scores.dtype)
    if self.method == "max":
      fused = scores.max(axis=3)
      winner = jnp.argmax(fused, axis=-1)[..., None, None]  # [B, H, W, 1, 1]
      at_winner = jnp.take_along_axis(scores, winner, axis=-1)[..., 0]  # [B, H, W, S]
      return fused, jax.nn.one_hot(jnp.argmax(at_winner, axis=-1), s, dtype=scores.dtype)
    conv = lambda features, kernel, std, name: nn.Conv(
        features, (kernel, kernel), padding="SAME", dtype=self.dtype, param_dtype=jnp.float32, name=name,
        kernel_init=nn.initializers.normal(std), bias_init=nn.initializers.zeros)
    x = features.reshape(b, h, w, s * features.shape[-1])  # scale-major channel blocks
    x = nn.relu(conv(self.hidden, 3, 0.005, "hidden")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = conv(s, 1, 0.01, "logits")(x)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(scores.dtype)
    return jnp.einsum("bhws,bhwsc->bhwc", weights, scores), weights
