"""DeepLab-LargeFOV (VGG-16, output stride 8), optionally confined to a valid region of a padded input.

With `valid_size`, every activation that feeds a spatial operator is reset outside the image's top-left valid
region (0 before a convolution, -inf before a max-pool), so an image padded onto a larger canvas gives, inside
its region, exactly what it gives alone. The vmapped scale-execution path relies on this.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from scaleattn.models.layers import Conv, max_pool_3x3
from scaleattn.models.resize import output_size, pool_size

BLOCK_OUTPUT = "block_output"  # the name `per_block` rematerialisation saves (checkpoint_name)


def receptive_radius(block_depths: Sequence[int], conv5_dilation: int, fc6_dilation: int, fc6_kernel: int,
                     stride1_pools: bool) -> int:
  """Input pixels, each side of an output cell's centre, that its value depends on: every 3x3 layer (convolution or
  pool) adds its dilation times the stride accumulated before it, fc6 (fc6_kernel // 2) times that (209 for
  VGG-16 LargeFOV)."""
  radius, stride = 0, 1
  for block, depth in enumerate(block_depths, start=1):
    radius += depth * stride * (conv5_dilation if block == 5 else 1)
    radius += stride if block <= 3 or stride1_pools else 0  # the block's 3x3 pool
    stride *= 2 if block <= 3 else 1
  return radius + (fc6_kernel // 2) * fc6_dilation * stride


class DeepLabLargeFOV(nn.Module):
  """VGG-16 DeepLab-LargeFOV; widths and depths configurable for small models. Parameters are float32;
  `dtype` is the compute dtype, `conv_impl` the kernels ('xla' or 'cpu', see `layers`). fc8 starts from
  N(0, fc8_init_std) (0.01 in DeepLab's prototxt; None: LeCun normal like the other layers). The architecture's
  fields have no defaults: the recipe's values are config.model.backbone's (`scaleattn.config.defaults`), and
  `registry.build_backbone` passes them.

  The field of view is set, as in DeepLab's own variants (its Table 2), by fc6's kernel (odd) and dilation;
  `stride1_pools=False` also drops pool4 and pool5 (3x3, stride 1), which widen it without downsampling."""
  num_classes: int
  block_widths: Sequence[int]
  block_depths: Sequence[int]
  fc_width: int
  conv5_dilation: int
  fc6_dilation: int
  fc6_kernel: int
  stride1_pools: bool
  dropout_rate: float
  fc8_init_std: float | None
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  # The backbone contract: what multi-scale execution, tiling, rematerialisation and the steps read off a backbone.
  supports_valid_size: ClassVar[bool] = True  # confines itself to `valid_size` (the vmapped scale execution)
  remat_names: ClassVar[tuple[str, ...]] = (BLOCK_OUTPUT,)  # the tags 'per_block' rematerialisation saves
  state_collections: ClassVar[tuple[str, ...]] = ()  # variables besides 'params' (none: no batch norm)

  @property
  def output_stride(self) -> int:
    return 8

  def output_size(self, n: int) -> int:
    """The output grid's length for an input of n pixels: three ceil-mode stride-2 pools."""
    return output_size(n)

  def weight_options(self) -> dict[str, int]:
    """What weight converters need to fit this backbone (`scaleattn.weights`): fc6/fc7's width, to which
    full-size VGG-16 fc layers are decimated."""
    return {"fc_width": self.fc_width}

  def receptive_radius(self) -> int:
    """Input pixels each side of an output cell's centre that its value depends on (exact tiling needs twice it)."""
    return receptive_radius(self.block_depths, self.conv5_dilation, self.fc6_dilation, self.fc6_kernel,
                            self.stride1_pools)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, valid_size: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] -> (scores [B, h, w, C], fc7 [B, h, w, fc_width]), h = output_size(H).

    valid_size: optional int [2], the rows and columns of the real image at the top-left of `images`; outputs
    outside its output-grid region are not meaningful.
    """
    if len(self.block_widths) != 5 or len(self.block_depths) != 5:
      raise ValueError(f"DeepLabLargeFOV: block_widths={tuple(self.block_widths)} and "
                       f"block_depths={tuple(self.block_depths)}: expected 5 entries each (conv1..conv5)")
    if self.fc6_kernel < 1 or self.fc6_kernel % 2 == 0:
      raise ValueError(f"DeepLabLargeFOV: fc6_kernel={self.fc6_kernel}: expected an odd kernel size >= 1")
    valid = None if valid_size is None else jnp.asarray(valid_size, jnp.int32)

    def conv(features: int, kernel: int, dilation: int, name: str, **kwargs) -> Conv:
      return Conv(features, kernel, dilation, impl=self.conv_impl, dtype=self.dtype, name=name, **kwargs)

    def confine(x: jax.Array, fill: float) -> jax.Array:
      if valid is None:
        return x
      inside = (jnp.arange(x.shape[1])[:, None] < valid[0]) & (jnp.arange(x.shape[2])[None, :] < valid[1])
      return jnp.where(inside[None, :, :, None], x, jnp.asarray(fill, x.dtype))

    x = images.astype(self.dtype)
    for block, (width, depth) in enumerate(zip(self.block_widths, self.block_depths, strict=True), start=1):
      for i in range(1, depth + 1):
        x = nn.relu(conv(width, 3, self.conv5_dilation if block == 5 else 1, f"conv{block}_{i}")(x))
        x = confine(x, 0.0 if i < depth else -jnp.inf)  # the block's last conv feeds the pool
      stride = 2 if block <= 3 else 1
      if stride == 2 or self.stride1_pools:
        x = max_pool_3x3(x, stride, self.conv_impl)
      if valid is not None and stride == 2:
        valid = pool_size(valid)
      x = checkpoint_name(confine(x, 0.0), BLOCK_OUTPUT)
    # fc7 and fc8 are 1x1 and the caller crops the output, so nothing after fc6 needs confining.
    x = nn.relu(conv(self.fc_width, self.fc6_kernel, self.fc6_dilation, "fc6")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(conv(self.fc_width, 1, 1, "fc7")(x))
    fc7 = checkpoint_name(nn.Dropout(self.dropout_rate, deterministic=not train)(x), BLOCK_OUTPUT)
    fc8_init = nn.initializers.lecun_normal() if self.fc8_init_std is None else nn.initializers.normal(
        self.fc8_init_std)
    scores = conv(self.num_classes, 1, 1, "fc8", kernel_init=fc8_init)(fc7)
    return scores, fc7
