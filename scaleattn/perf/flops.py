"""Model FLOPs: the network's convolutions as dense convolutions, read off the model.

The count does not depend on how a backend runs the network (Winograd or per-tap matmuls on CPU, every scale
padded to full size under vmap, the attention head projected per scale), so it is the numerator of model FLOP
utilisation (MFU) and compares steps across backends. Each convolution counts 2 * H * W * k * k * Cin * Cout
(every tap, padding included) per image and forward pass; a train step counts 3 forward passes (forward, input
gradient, weight gradient). Pools, resizes, the fusion's weighted sum and the losses are left out: they are
small next to the convolutions.
"""
from __future__ import annotations

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from scaleattn.models import build_model
from scaleattn.models.fusion import Fusion, Layer, per_scale
from scaleattn.models.layers import Conv


def conv_layers(cfg: ml_collections.ConfigDict, height: int, width: int) -> collections.Counter:
  """Layer -> how many times the model of `cfg` (config.model) runs it on one height x width image: every
  backbone convolution at each scale's own size, and the fusion's head as its class declares it (`head_layers`)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.scale_execution = "loop"  # each scale at its own size: the network's work, not the padding's
  cfg.remat = "none"  # the network's work, not the recomputation's
  model = build_model(cfg)
  seen = collections.Counter()

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, Conv):
      x = args[0]
      seen[Layer(x.shape[1], x.shape[2], x.shape[3], module.features, module.kernel_size, module.dilation)] += 1
    elif context.method_name == "__call__" and isinstance(module, Fusion):
      seen.update(module.head_layers(args[0].shape, [m.shape for m in per_scale(args[1])], kwargs.get("scales")))
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return seen


def layer_flops(layer: Layer) -> int:
  """One forward pass of `layer` on one image, every tap counted."""
  return 2 * layer.height * layer.width * layer.kernel ** 2 * layer.cin * layer.cout


def step_flops(cfg: ml_collections.ConfigDict, batch_size: int, height: int, width: int, train: bool) -> float:
  """Model FLOPs of one train step (3 passes) or eval step (1 pass) on a batch of height x width images."""
  forward = sum(count * layer_flops(layer) for layer, count in conv_layers(cfg, height, width).items())
  return float(batch_size * forward * (3 if train else 1))
