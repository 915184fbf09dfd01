"""DeepLab-LargeFOV (VGG-16, output stride 8), with an optional valid region for padded inputs.

With `valid_size`, activations outside the top-left valid region are zeroed after every convolution and set
to -inf before every max-pool, so a scale padded onto a larger canvas computes exactly what it would alone
(the padded, vmapped scale-execution path relies on this).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  """Caffe's ceil-mode 3x3 max-pool with pad 1, as a max over 9 shifted slices (cheaper to differentiate
  than reduce_window here)."""
  h, w = x.shape[1:3]
  out_h, out_w = (h // 2 + 1, w // 2 + 1) if stride == 2 else (h, w)
  pad_h, pad_w = stride * (out_h - 1) + 3 - h - 1, stride * (out_w - 1) + 3 - w - 1
  x = jnp.pad(x, ((0, 0), (1, pad_h), (1, pad_w), (0, 0)), constant_values=-jnp.inf)
  span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
  out = None
  for i in range(3):
    for j in range(3):
      tap = x[:, i:i + span_h:stride, j:j + span_w:stride]
      out = tap if out is None else jnp.maximum(out, tap)
  return out


def _mask(valid: jax.Array | None, h: int, w: int) -> jax.Array | None:
  if valid is None:
    return None
  return ((jnp.arange(h)[:, None] < valid[0]) & (jnp.arange(w)[None, :] < valid[1]))[None, :, :, None]


class DeepLabLargeFOV(nn.Module):
  """VGG-16 DeepLab-LargeFOV; widths and depths configurable for small models. Returns (scores, fc7)."""
  num_classes: int
  block_widths: Sequence[int] = (64, 128, 256, 512, 512)
  block_depths: Sequence[int] = (2, 2, 3, 3, 3)
  fc_width: int = 1024
  fc6_dilation: int = 12
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, valid_size: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] -> (scores [B, h, w, C], fc7 [B, h, w, fc_width]); h = ceil-mode H / 8.

    valid_size: optional int [2], rows and columns of the real image at the top-left of `images`.
    """
    if len(self.block_widths) != 5 or len(self.block_depths) != 5:
      raise ValueError(f"DeepLabLargeFOV: block_widths {self.block_widths} and block_depths {self.block_depths} "
                       "must have 5 entries (conv1..conv5)")
    conv = lambda f, k, d, name: nn.Conv(f, (k, k), kernel_dilation=d, padding="SAME", dtype=self.dtype,
                                         name=name)
    valid = None if valid_size is None else jnp.asarray(valid_size, jnp.int32)
    x = images.astype(self.dtype)

    def masked(x, fill):
      m = _mask(valid, *x.shape[1:3])
      return x if m is None else jnp.where(m, x, jnp.asarray(fill, x.dtype))

    for block, (width, depth) in enumerate(zip(self.block_widths, self.block_depths, strict=True), start=1):
      for i in range(1, depth + 1):
        x = masked(nn.relu(conv(width, 3, 2 if block == 5 else 1, f"conv{block}_{i}")(x)), 0.0)
      stride = 2 if block <= 3 else 1
      x = max_pool_3x3(masked(x, -jnp.inf), stride)
      if valid is not None and stride == 2:
        valid = valid // 2 + 1
      x = masked(x, 0.0)
    x = masked(nn.relu(conv(self.fc_width, 3, self.fc6_dilation, "fc6")(x)), 0.0)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = masked(nn.relu(conv(self.fc_width, 1, 1, "fc7")(x)), 0.0)
    fc7 = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    scores = conv(self.num_classes, 1, 1, "fc8")(fc7)
    return scores, fc7
