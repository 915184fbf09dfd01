"""The backbone's convolution and max-pool, each with two implementations of one function.

'xla' is `lax.conv_general_dilated` and `lax.reduce_window`: what GPU and TPU compilers take best, and what a
program built for them gets unless 'cpu' is asked for by name. 'cpu' is `scaleattn.kernels` (Winograd, per-tap and
strip convolutions, the max-pool as shifted maxima), faster on XLA:CPU. `config.model.conv_impl='auto'` resolves
from the platform the program is built for (the mesh's devices, or an export target), never from the host's
default backend.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

from scaleattn.kernels import cpu_conv, cpu_pool
from scaleattn.models.resize import pool_size

CONV_IMPLS = ("auto", "xla", "cpu")


def resolve_conv_impl(conv_impl: str, platform: str) -> str:
  """'xla' or 'cpu' for `conv_impl` on devices of `platform` ('cpu', 'gpu', 'cuda', 'rocm', 'tpu')."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"config.model.conv_impl={conv_impl!r}: expected one of {CONV_IMPLS}")
  if conv_impl == "cpu" and platform != "cpu":
    logging.warning("config.model.conv_impl='cpu' on a %s program: the CPU kernels will run there as asked, slower "
                    "than the plain path; use 'auto' or 'xla'.", platform)
  if conv_impl != "auto":
    return conv_impl
  return "cpu" if platform == "cpu" else "xla"


def conv2d(x: jax.Array, w: jax.Array, dilation: int, impl: str) -> jax.Array:
  """'SAME' convolution of x [B, H, W, Cin] with w [k, k, Cin, Cout] and `dilation`."""
  if impl == "cpu":
    return cpu_conv.conv2d(x, w, dilation)
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(dilation, dilation),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def max_pool_3x3(x: jax.Array, stride: int, impl: str) -> jax.Array:
  """Caffe's ceil-mode 3x3 max-pool with pad 1 on [B, H, W, C]; stride 2 gives pool_size(H) rows."""
  if stride not in (1, 2):
    raise ValueError(f"max_pool_3x3: stride={stride}, expected 1 or 2")
  h, w = x.shape[1:3]
  out_h, out_w = (pool_size(h), pool_size(w)) if stride == 2 else (h, w)
  if impl == "cpu":
    return cpu_pool.max_pool_3x3(x, stride, out_h, out_w)
  pad_h, pad_w = stride * (out_h - 1) + 2 - h, stride * (out_w - 1) + 2 - w  # bottom/right: ceil mode
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                           ((0, 0), (1, pad_h), (1, pad_w), (0, 0)))


class Conv(nn.Module):
  """`nn.Conv(features, (k, k), kernel_dilation=d, padding='SAME')` (same parameter names and shapes) computed by
  `conv2d` with `impl`: float32 parameters, computed in `dtype`."""
  features: int
  kernel_size: int = 3
  dilation: int = 1
  impl: str = "xla"
  dtype: Any = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return conv2d(x, kernel, self.dilation, self.impl) + bias
