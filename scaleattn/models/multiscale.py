"""The share-net: one DeepLab-LargeFOV run on every rescaled copy of the image, fused over scales.

Two ways to run the scales, chosen by `scale_execution`, with identical parameters and results (eval mode):
'loop' runs each scale at its own size; 'vmap' pads every scale onto the scale-1 canvas and runs one vmapped
backbone whose layers mask each scale's padding.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from scaleattn.models import resize
from scaleattn.models.backbone import DeepLabLargeFOV
from scaleattn.models.fusion import ScaleFusion


@flax.struct.dataclass
class MultiScaleOutput:
  fused: jax.Array  # [B, h, w, C] on the scale-1 output grid
  per_scale: jax.Array  # [B, h, w, S, C], every scale resized to the scale-1 grid
  weights: jax.Array  # [B, h, w, S] fusion weights
  native: tuple[jax.Array, ...]  # each scale's scores on its own grid


class _PaddedBackbone(DeepLabLargeFOV):
  """The backbone with `train` fixed, so nn.vmap maps only (images, valid_size)."""
  train: bool = False

  def __call__(self, images, valid_size):  # noqa: D102
    return super().__call__(images, train=self.train, valid_size=valid_size)


class MultiScaleNet(nn.Module):
  num_classes: int
  scales: Sequence[float] = (1.0, 0.75, 0.5)
  fusion: str = "attention"
  block_widths: Sequence[int] = (64, 128, 256, 512, 512)
  block_depths: Sequence[int] = (2, 2, 3, 3, 3)
  fc_width: int = 1024
  fc6_dilation: int = 12
  dropout_rate: float = 0.5
  attention_hidden: int = 512
  attention_dropout: float = 0.5
  scale_execution: str = "loop"
  dtype: Any = jnp.float32

  def _backbone_kwargs(self) -> dict[str, Any]:
    return dict(num_classes=self.num_classes, block_widths=tuple(self.block_widths),
                block_depths=tuple(self.block_depths), fc_width=self.fc_width, fc6_dilation=self.fc6_dilation,
                dropout_rate=self.dropout_rate, dtype=self.dtype, name="backbone")

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> MultiScaleOutput:
    b, height, width, _ = images.shape
    sizes = [(resize.scaled_size(height, s), resize.scaled_size(width, s)) for s in self.scales]
    out_sizes = [(resize.output_size(h), resize.output_size(w)) for h, w in sizes]
    inputs = [resize.resize_bilinear(images, hw) for hw in sizes]
    if self.scale_execution == "loop":
      backbone = DeepLabLargeFOV(**self._backbone_kwargs())
      outs = [backbone(x, train=train) for x in inputs]
    elif self.scale_execution == "vmap":
      canvas = jnp.stack([jnp.pad(x, ((0, 0), (0, height - x.shape[1]), (0, width - x.shape[2]), (0, 0)))
                          for x in inputs])
      vbackbone = nn.vmap(_PaddedBackbone, in_axes=(0, 0), out_axes=0, variable_axes={"params": None},
                          split_rngs={"params": False, "dropout": True})(train=train, **self._backbone_kwargs())
      scores, feats = vbackbone(canvas, jnp.asarray(sizes, jnp.int32))
      outs = [(scores[i, :, :h, :w], feats[i, :, :h, :w]) for i, (h, w) in enumerate(out_sizes)]
    else:
      raise ValueError(f"MultiScaleNet.scale_execution={self.scale_execution!r}: expected 'loop' or 'vmap'")
    grid = out_sizes[0]
    per_scale = jnp.stack([resize.resize_bilinear(s, grid) for s, _ in outs], axis=3)
    features = jnp.stack([resize.resize_bilinear(f, grid) for _, f in outs], axis=3)
    fused, weights = ScaleFusion(self.fusion, len(self.scales), hidden=self.attention_hidden,
                                 dropout_rate=self.attention_dropout, dtype=self.dtype, name="fusion")(
                                     per_scale, features, train=train)
    return MultiScaleOutput(fused=fused, per_scale=per_scale, weights=weights, native=tuple(s for s, _ in outs))


def build_model(cfg: ml_collections.ConfigDict) -> MultiScaleNet:
  """MultiScaleNet from `config.model`."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  return MultiScaleNet(
      num_classes=cfg.num_classes, scales=tuple(float(s) for s in cfg.scales), fusion=cfg.fusion,
      block_widths=tuple(cfg.block_widths), block_depths=tuple(cfg.block_depths), fc_width=cfg.fc_width,
      fc6_dilation=cfg.fc6_dilation, dropout_rate=cfg.dropout_rate, attention_hidden=cfg.attention_hidden,
      attention_dropout=cfg.attention_dropout, scale_execution=cfg.scale_execution, dtype=dtypes[cfg.dtype])
