"""DeepLab v2 (Chen et al., TPAMI 2017): a dilated ResNet-50/101/152 with frozen BatchNorm and the ASPP head.

Geometry as the authors' Caffe model (and deeplab-pytorch, which reproduces it): a 7x7 stride-2 stem (pad 3), a
3x3 stride-2 ceil-mode max-pool with pad 1 (321 -> 161 -> 81), bottleneck stages of 256, 512, 1024 and 2048
channels, stride 2 in stage 3 only and dilations 2 and 4 in stages 4 and 5 (output stride 8: 321 -> 41,
513 -> 65; output stride 16 strides stage 4 and dilates stage 5 by 2). A stage's first block strides in its 1x1
`reduce` convolution (MSRA/Caffe layout) or, with `stride_in_3x3`, in its 3x3 (torchvision's layout). The head,
ASPP, is four 3x3 convolutions with biases and dilations 6, 12, 18, 24 on the 2048-channel features, summed.

BatchNorm is frozen, as DeepLab v2 trains it (batches of 10 are too small for batch statistics): the statistics
and the affine live in the 'batch_stats' collection, never in 'params', so the optimizer never sees them, and
every normalisation (training too) uses them under `stop_gradient`. Convolutions carry no bias (BatchNorm's shift
is the bias), except ASPP's.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from scaleattn.models.largefov import BLOCK_OUTPUT
from scaleattn.models.layers import Conv, conv2d, max_pool_3x3
from scaleattn.models.resize import pool_size

BLOCK_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}  # bottleneck blocks in stages 2..5
BN_EPS = 1e-5  # Caffe's BatchNorm default, as deeplab-pytorch and torchvision
STAGES = (2, 3, 4, 5)  # Caffe's stage numbers (res2..res5), used in parameter names
OUTPUT_STRIDES = (8, 16)


def strided_size(n: int) -> int:
  """A stride-2 convolution's output length whose padding is half its (odd) kernel span: ceil(n / 2)."""
  return (n - 1) // 2 + 1


def confine(x: jax.Array, valid: jax.Array | None, fill: float) -> jax.Array:
  """x [B, H, W, C] with `fill` outside its top-left valid region (rows, columns) `valid`; x itself without one."""
  if valid is None:
    return x
  inside = (jnp.arange(x.shape[1])[:, None] < valid[0]) & (jnp.arange(x.shape[2])[None, :] < valid[1])
  return jnp.where(inside[None, :, :, None], x, jnp.asarray(fill, x.dtype))


class ConvBN(nn.Module):
  """A bias-free k x k convolution (stride, dilation, padding dilation * (k // 2)) then frozen BatchNorm and an
  optional ReLU. Parameters: 'kernel' (HWIO, float32); batch_stats: 'mean', 'var', 'scale', 'bias'."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  dilation: int = 1
  relu: bool = True
  eps: float = BN_EPS
  impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, self.features
    kernel = self.param("kernel", nn.initializers.he_normal(), (k, k, x.shape[-1], c), jnp.float32)
    stats = {name: self.variable("batch_stats", name, init, (c,), jnp.float32).value
             for name, init in (("mean", jnp.zeros), ("var", jnp.ones), ("scale", jnp.ones), ("bias", jnp.zeros))}
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if self.stride == 1:
      y = conv2d(x, kernel, self.dilation, self.impl)
    elif k == 1:  # a strided 1x1 convolution reads every stride-th pixel
      y = conv2d(x[:, ::self.stride, ::self.stride], kernel, 1, self.impl)
    else:
      pad = self.dilation * (k // 2)
      y = lax.conv_general_dilated(x, kernel, (self.stride, self.stride), ((pad, pad), (pad, pad)),
                                   rhs_dilation=(self.dilation, self.dilation),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    stats = lax.stop_gradient(stats)
    multiplier = stats["scale"] * lax.rsqrt(stats["var"] + self.eps)
    y = y * multiplier.astype(y.dtype) + (stats["bias"] - stats["mean"] * multiplier).astype(y.dtype)
    return nn.relu(y) if self.relu else y


class Stem(nn.Module):
  """`conv1`: 7x7, stride 2, pad 3, frozen BatchNorm, ReLU; then the 3x3 stride-2 max-pool with pad 1 in ceil mode
  (deeplab-pytorch's nn.MaxPool2d(3, 2, 1, ceil_mode=True): n -> n // 2 + 1)."""
  width: int = 64
  eps: float = BN_EPS
  impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """images, their valid region (or None) -> the pool's output and its valid region."""
    x = ConvBN(self.width, 7, 2, 1, True, self.eps, self.impl, self.dtype, name="conv1")(
        confine(images.astype(self.dtype), valid, 0.0))
    valid = None if valid is None else strided_size(valid)
    x = max_pool_3x3(confine(x, valid, -jnp.inf), 2, self.impl)
    return x, None if valid is None else pool_size(valid)


class Bottleneck(nn.Module):
  """1x1 `reduce` -> 3x3 `conv3x3` (dilated) -> 1x1 `increase` (features channels), plus the identity or a 1x1
  `shortcut` projection, then ReLU. The stride sits in `reduce` (Caffe) or in `conv3x3` (torchvision)."""
  features: int
  stride: int = 1
  dilation: int = 1
  projection: bool = False
  stride_in_3x3: bool = False
  eps: float = BN_EPS
  impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """x, its valid region (or None) -> the block's output and its valid region."""
    unit = lambda features, kernel, stride, dilation, relu, name: ConvBN(
        features, kernel, stride, dilation, relu, self.eps, self.impl, self.dtype, name=name)
    reduce_stride, conv_stride = (1, self.stride) if self.stride_in_3x3 else (self.stride, 1)
    h = unit(self.features // 4, 1, reduce_stride, 1, True, "reduce")(x)
    if valid is not None and reduce_stride == 2:
      valid = strided_size(valid)
    h = unit(self.features // 4, 3, conv_stride, self.dilation, True, "conv3x3")(confine(h, valid, 0.0))
    if valid is not None and conv_stride == 2:
      valid = strided_size(valid)
    h = unit(self.features, 1, 1, 1, False, "increase")(h)
    shortcut = unit(self.features, 1, self.stride, 1, False, "shortcut")(x) if self.projection else x
    return nn.relu(h + shortcut.astype(h.dtype)), valid


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling as DeepLab v2 (ASPP-L): one 3x3 convolution with bias per dilation, summed."""
  num_classes: int
  dilations: Sequence[int] = (6, 12, 18, 24)
  init_std: float = 0.01
  impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branches = [Conv(self.num_classes, 3, d, impl=self.impl, dtype=self.dtype, name=f"c{i}",
                     kernel_init=nn.initializers.normal(self.init_std))(x) for i, d in enumerate(self.dilations)]
    return sum(branches[1:], branches[0])


class DeepLabV2(nn.Module):
  """DeepLab v2 ResNet + ASPP (module docstring). `width` is the stem's channels (64; stage s's blocks output
  width * 2^(s-2) * 4); `block_depths` the blocks per stage (BLOCK_DEPTHS: 50, 101, 152). ASPP starts from
  N(0, aspp_init_std) weights and zero biases (DeepLab v2's prototxt). `train` changes nothing: no dropout, and
  BatchNorm is frozen."""
  num_classes: int
  block_depths: Sequence[int] = BLOCK_DEPTHS[101]
  width: int = 64
  output_stride: int = 8
  stride_in_3x3: bool = False
  aspp_dilations: Sequence[int] = (6, 12, 18, 24)
  aspp_init_std: float = 0.01
  bn_eps: float = BN_EPS
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  supports_valid_size: ClassVar[bool] = True
  remat_names: ClassVar[tuple[str, ...]] = (BLOCK_OUTPUT,)
  state_collections: ClassVar[tuple[str, ...]] = ("batch_stats",)
  state_trainable: ClassVar[bool] = False

  def stage_plan(self) -> list[tuple[int, int, int, int, int]]:
    """(stage, blocks, output channels, first block's stride, dilation) for stages 2..5."""
    if len(self.block_depths) != 4 or min(self.block_depths) < 1:
      raise ValueError(f"DeepLabV2: block_depths={tuple(self.block_depths)}: expected 4 positive block counts "
                       f"(stages 2..5; e.g. {BLOCK_DEPTHS})")
    if self.output_stride not in OUTPUT_STRIDES:
      raise ValueError(f"DeepLabV2: output_stride={self.output_stride}: expected one of {OUTPUT_STRIDES}")
    strides, dilations = ((1, 2, 1, 1), (1, 1, 2, 4)) if self.output_stride == 8 else ((1, 2, 2, 1), (1, 1, 1, 2))
    return [(stage, depth, self.width * 4 * 2 ** i, stride, dilation) for i, (stage, depth, stride, dilation)
            in enumerate(zip(STAGES, self.block_depths, strides, dilations, strict=True))]

  def output_size(self, n: int) -> int:
    """The output grid's length for an input of length n (321 -> 41, 513 -> 65 at output stride 8)."""
    n = pool_size(strided_size(n))  # stem convolution, then the ceil-mode pool
    for _, _, _, stride, _ in self.stage_plan():
      n = strided_size(n) if stride == 2 else n
    return n

  def weight_options(self) -> dict[str, bool]:
    """What weight converters need to fit this backbone (`scaleattn.weights`): the stride layout, which shapes
    cannot tell apart."""
    return {"stride_in_3x3": self.stride_in_3x3}

  def receptive_radius(self) -> int:
    """Input pixels each side of an output cell's centre that it depends on: every layer adds its kernel's
    half-span times its dilation times the stride accumulated before it (705 for ResNet-101 at output stride 8)."""
    radius, jump = 3, 2  # the 7x7 stem at stride 1
    radius, jump = radius + jump, jump * 2  # the 3x3 pool
    for _, depth, _, stride, dilation in self.stage_plan():
      for block in range(depth):
        block_stride = stride if block == 0 else 1
        if self.stride_in_3x3:
          radius, jump = radius + dilation * jump, jump * block_stride
        else:
          jump *= block_stride
          radius += dilation * jump
    return radius + max(self.aspp_dilations) * jump

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, valid_size: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] -> (scores [B, h, w, C], res5 features [B, h, w, 32 * width]), h = output_size(H).

    valid_size: optional int [2], the rows and columns of the real image at the top-left of `images`; each
    spatial layer's input is reset outside it (0, -inf before the pool), so inside its output region the result
    is what the image gives alone.
    """
    del train  # no dropout; frozen BatchNorm
    plan = self.stage_plan()
    valid = None if valid_size is None else jnp.asarray(valid_size, jnp.int32)
    x, valid = Stem(self.width, self.bn_eps, self.conv_impl, self.dtype, name="stem")(images, valid)
    for stage, depth, features, stride, dilation in plan:
      for block in range(1, depth + 1):
        x, valid = Bottleneck(features, stride if block == 1 else 1, dilation, block == 1, self.stride_in_3x3,
                              self.bn_eps, self.conv_impl, self.dtype, name=f"res{stage}_{block}")(x, valid)
        x = checkpoint_name(x, BLOCK_OUTPUT)
    features = x
    scores = ASPP(self.num_classes, tuple(self.aspp_dilations), self.aspp_init_std, self.conv_impl, self.dtype,
                  name="aspp")(confine(x, valid, 0.0))
    return scores, features
