"""The one place backbones and fusion methods are named: `config.model.backbone.name` and
`config.model.fusion.name` pick a factory here, and the rest of each sub-config is passed to it as keywords.

Adding a backbone is one module that keeps the backbone contract (see `largefov.DeepLabLargeFOV`: `(images, *,
train, valid_size=None) -> (scores, features)`, `output_stride`, `output_size`, `receptive_radius`, `remat_names`,
`state_collections`, `supports_valid_size`, `weight_options`) plus one line in BACKBONES; adding a fusion method is
one class in fusion.py decorated with `@register(name)`.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from scaleattn.models import fusion, largefov, resnet
from scaleattn.models.multiscale import MultiScaleNet

# name -> factory(num_classes=, dtype=, conv_impl=, **config.model.backbone)
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "largefov": largefov.DeepLabLargeFOV,
    **{f"resnet{depth}": functools.partial(resnet.DeepLabV2, block_depths=blocks)
       for depth, blocks in resnet.BLOCK_DEPTHS.items()},
}
# name -> class(num_scales=, dtype=, **config.model.fusion): fusion.py's table, filled by `fusion.register`
FUSIONS: dict[str, type[fusion.Fusion]] = fusion.FUSIONS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_SUPPLIED = {"num_classes", "num_scales", "dtype", "conv_impl", "name", "parent"}  # set here, not by the config


def options(factory: Callable[..., nn.Module]) -> tuple[str, ...]:
  """The keywords a sub-config may set for `factory`."""
  return tuple(p for p in inspect.signature(factory).parameters if p not in _SUPPLIED)


def _settings(sub: ml_collections.ConfigDict) -> dict:
  return {k: v for k, v in sub.items() if k != "name"}


def build_backbone(cfg: ml_collections.ConfigDict, conv_impl: str = "xla") -> nn.Module:
  """The backbone of `config.model`, unbound: what it declares (output stride and size, receptive field, remat
  names, non-parameter state) can be read without parameters."""
  return BACKBONES[cfg.backbone.name](num_classes=cfg.num_classes, dtype=DTYPES[cfg.dtype], conv_impl=conv_impl,
                                      **_settings(cfg.backbone))


def build_model(cfg: ml_collections.ConfigDict, conv_impl: str = "xla", scales: Sequence[float] | None = None
                ) -> MultiScaleNet:
  """MultiScaleNet from `config.model`; `conv_impl` is the resolved kernel choice ('xla' or 'cpu',
  `layers.resolve_conv_impl`): the default suits anything that only needs shapes or parameters. `scales` replaces
  config.model.scales (inference on another scale set: the same parameters, for the scale-agnostic fusions)."""
  scales = tuple(float(s) for s in (cfg.scales if scales is None else scales))
  dtype = DTYPES[cfg.dtype]
  backbone = build_backbone(cfg, conv_impl)
  fuse = None if len(scales) == 1 else FUSIONS[cfg.fusion.name](num_scales=len(scales), dtype=dtype,
                                                                 **_settings(cfg.fusion))
  return MultiScaleNet(backbone=backbone, fusion=fuse, scales=scales, scale_execution=cfg.scale_execution,
                       input_scale=cfg.input_scale, remat=cfg.remat, fusion_input=cfg.fusion_input)
