"""The one place backbones and fusion methods are named: `config.model.backbone.name` and
`config.model.fusion.name` pick a factory here, and the rest of each sub-config is passed to it as keywords.

Adding a backbone is one module (output stride 8, `(images, *, train, valid_size=None) -> (scores, features)`)
plus one line in BACKBONES; adding a fusion method is one line in FUSIONS.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from scaleattn.models import fusion, largefov
from scaleattn.models.multiscale import MultiScaleNet

# name -> factory(num_classes=, dtype=, conv_impl=, **config.model.backbone)
BACKBONES: dict[str, Callable[..., nn.Module]] = {"largefov": largefov.DeepLabLargeFOV}
# name -> factory(num_scales=, dtype=, **config.model.fusion)
FUSIONS: dict[str, Callable[..., nn.Module]] = {method: functools.partial(fusion.ScaleFusion, method)
                                                for method in fusion.METHODS}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_SUPPLIED = {"num_classes", "num_scales", "dtype", "conv_impl", "name", "parent"}  # set here, not by the config


def options(factory: Callable[..., nn.Module]) -> tuple[str, ...]:
  """The keywords a sub-config may set for `factory`."""
  return tuple(p for p in inspect.signature(factory).parameters if p not in _SUPPLIED)


def _settings(sub: ml_collections.ConfigDict) -> dict:
  return {k: v for k, v in sub.items() if k != "name"}


def build_model(cfg: ml_collections.ConfigDict, conv_impl: str = "xla", scales: Sequence[float] | None = None
                ) -> MultiScaleNet:
  """MultiScaleNet from `config.model`; `conv_impl` is the resolved kernel choice ('xla' or 'cpu',
  `layers.resolve_conv_impl`): the default suits anything that only needs shapes or parameters. `scales` replaces
  config.model.scales (inference on another scale set: the same parameters, for the scale-agnostic fusions)."""
  scales = tuple(float(s) for s in (cfg.scales if scales is None else scales))
  dtype = DTYPES[cfg.dtype]
  backbone = BACKBONES[cfg.backbone.name](num_classes=cfg.num_classes, dtype=dtype, conv_impl=conv_impl,
                                          **_settings(cfg.backbone))
  fuse = None if len(scales) == 1 else FUSIONS[cfg.fusion.name](num_scales=len(scales), dtype=dtype,
                                                                 **_settings(cfg.fusion))
  return MultiScaleNet(backbone=backbone, fusion=fuse, scales=scales, scale_execution=cfg.scale_execution,
                       input_scale=cfg.input_scale, remat=cfg.remat)
