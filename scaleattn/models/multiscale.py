"""The share-net: one DeepLab-LargeFOV applied to every rescaled copy of the image, fused over scales.

Two ways to run the scales, chosen by `scale_execution`, with the same parameters and the same results:
'loop' runs each scale at its own size through the one backbone; 'vmap' pads every scale onto the scale-1
canvas and runs one vmapped backbone that confines each scale to its valid region (exact, but every scale then
costs as much as scale 1: on CPU 'loop' is about twice as fast, hence the default).
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

SCALE_EXECUTIONS = ("loop", "vmap")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class MultiScaleOutput:
  """The share-net's outputs; `scales` (static) names the S axis."""
  fused: jax.Array  # [B, h, w, C] on the scale-1 output grid
  per_scale: jax.Array  # [B, h, w, S, C], every scale's scores resized to the scale-1 grid
  weights: jax.Array  # [B, h, w, S] fusion weights
  native: tuple[jax.Array, ...]  # [B, h_s, w_s, C], each scale's scores on its own grid
  scales: tuple[float, ...] = flax.struct.field(pytree_node=False, default=())


class MultiScaleNet(nn.Module):
  """DeepLab-LargeFOV shared by all `scales` (the first must be 1.0: it sets the output grid) + ScaleFusion.

  Parameters: {'backbone': DeepLabLargeFOV's, 'fusion': ScaleFusion's (attention over 2+ scales only)}, float32.
  With one scale there is nothing to fuse: fused = that scale's scores, weights = 1.
  """
  num_classes: int
  scales: Sequence[float] = (1.0, 0.75, 0.5)
  fusion: str = "attention"
  block_widths: Sequence[int] = (64, 128, 256, 512, 512)
  block_depths: Sequence[int] = (2, 2, 3, 3, 3)
  fc_width: int = 1024
  conv5_dilation: int = 2
  fc6_dilation: int = 12
  dropout_rate: float = 0.5
  attention_hidden: int = 512
  attention_dropout: float = 0.5
  scale_execution: str = "loop"
  input_scale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> MultiScaleOutput:
    """images [B, H, W, 3] (mean-subtracted, then multiplied by input_scale) -> MultiScaleOutput; dropout uses the
    'dropout' rng when training."""
    scales = tuple(float(s) for s in self.scales)
    if not scales or scales[0] != 1.0:
      raise ValueError(f"MultiScaleNet.scales={scales}: expected the first scale to be 1.0 (it sets the output grid)")
    if self.scale_execution not in SCALE_EXECUTIONS:
      raise ValueError(f"MultiScaleNet.scale_execution={self.scale_execution!r}: expected one of {SCALE_EXECUTIONS}")
    images = images * self.input_scale if self.input_scale != 1.0 else images
    height, width = images.shape[1:3]
    sizes = [(resize.scaled_size(height, s), resize.scaled_size(width, s)) for s in scales]
    out_sizes = [(resize.output_size(h), resize.output_size(w)) for h, w in sizes]
    inputs = [resize.resize_bilinear(images, size) for size in sizes]
    backbone = DeepLabLargeFOV(self.num_classes, block_widths=tuple(self.block_widths),
                               block_depths=tuple(self.block_depths), fc_width=self.fc_width,
                               conv5_dilation=self.conv5_dilation, fc6_dilation=self.fc6_dilation,
                               dropout_rate=self.dropout_rate, dtype=self.dtype, name="backbone")
    if self.scale_execution == "loop":
      outs = [backbone(x, train=train) for x in inputs]
    else:
      if max(scales) > 1.0:
        raise ValueError(f"MultiScaleNet.scales={scales}: scale_execution='vmap' pads onto the scale-1 canvas, so "
                         "it needs every scale <= 1; use 'loop'")
      canvas = jnp.stack([jnp.pad(x, ((0, 0), (0, height - x.shape[1]), (0, width - x.shape[2]), (0, 0)))
                          for x in inputs])  # [S, B, H, W, 3], zeros outside each scale
      run = nn.vmap(lambda module, x, valid: module(x, train=train, valid_size=valid), in_axes=(0, 0),
                    out_axes=0, variable_axes={"params": None}, split_rngs={"params": False, "dropout": True})
      all_scores, all_feats = run(backbone, canvas, jnp.asarray(sizes, jnp.int32))
      outs = [(all_scores[i, :, :h, :w], all_feats[i, :, :h, :w]) for i, (h, w) in enumerate(out_sizes)]
    grid = out_sizes[0]
    per_scale = jnp.stack([resize.resize_bilinear(scores, grid) for scores, _ in outs], axis=3)
    native = tuple(scores for scores, _ in outs)
    if len(scales) == 1:  # the single-scale baseline is plain DeepLab-LargeFOV: nothing to fuse
      return MultiScaleOutput(fused=native[0], per_scale=per_scale, weights=jnp.ones(per_scale.shape[:4], self.dtype),
                              native=native, scales=scales)
    fused, weights = ScaleFusion(self.fusion, len(scales), hidden=self.attention_hidden,
                                 dropout_rate=self.attention_dropout, dtype=self.dtype, name="fusion")(
                                     per_scale, [feats for _, feats in outs], train=train)
    return MultiScaleOutput(fused=fused, per_scale=per_scale, weights=weights, native=native, scales=scales)


def build_model(cfg: ml_collections.ConfigDict) -> MultiScaleNet:
  """MultiScaleNet from `config.model`; dtype 'bfloat16' computes in bfloat16 with float32 parameters."""
  if cfg.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={cfg.dtype!r}: expected one of {tuple(DTYPES)}")
  return MultiScaleNet(
      num_classes=cfg.num_classes, scales=tuple(float(s) for s in cfg.scales), fusion=cfg.fusion,
      block_widths=tuple(cfg.block_widths), block_depths=tuple(cfg.block_depths), fc_width=cfg.fc_width,
      conv5_dilation=cfg.conv5_dilation, fc6_dilation=cfg.fc6_dilation, dropout_rate=cfg.dropout_rate,
      attention_hidden=cfg.attention_hidden, attention_dropout=cfg.attention_dropout,
      scale_execution=cfg.scale_execution, input_scale=cfg.input_scale, dtype=DTYPES[cfg.dtype])
