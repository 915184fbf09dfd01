"""The eval-mode forward pass shared by evaluation and prediction: every scale, the fusion, optional test-time
flip, the scores brought to the input's resolution, and the optional CRF on them."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from scaleattn import crf, sharding
from scaleattn.models import MultiScaleOutput, resize
from scaleattn.state import Experiment

Forward = Callable[[Any, jax.Array], MultiScaleOutput]


def predict_scores(params: Any, images: jax.Array, *, exp: Experiment, flip: bool, forward: Forward | None = None
                   ) -> MultiScaleOutput:
  """Eval-mode outputs on the scale-1 output grid over config.eval.scales, from the whole images or from
  `forward(params, images)` (tiled inference); with `flip`, fused and per-scale scores and weights average the
  image and its mirror (mirrored back)."""
  if forward is None:
    forward = lambda p, x: exp.eval_model.apply({"params": p}, x, train=False)
  out = forward(params, images)
  if not flip:
    return out
  mirrored = forward(params, images[:, :, ::-1])
  return out.replace(fused=(out.fused + mirrored.fused[:, :, ::-1]) / 2,
                     per_scale=(out.per_scale + mirrored.per_scale[:, :, ::-1]) / 2,
                     weights=(out.weights + mirrored.weights[:, :, ::-1]) / 2)


def to_input_size(x: jax.Array, images: jax.Array) -> jax.Array:
  """[B, h, w, ...] on the output grid -> float32 at the images' resolution (x8, bilinear, as the paper's test)."""
  return resize.resize_bilinear(x.astype(jnp.float32), images.shape[1:3])


def predict_labels(fused: jax.Array, images: jax.Array, valid: jax.Array, *, exp: Experiment) -> jax.Array:
  """Labels [B, H, W] at the images' resolution from fused scores on the output grid: the argmax of the upsampled
  scores, or of the CRF's marginals when config.eval.crf.enabled (images are mean-subtracted, as the model sees
  them; `valid` marks their real pixels)."""
  scores = to_input_size(fused, images)
  cfg = exp.config.eval.crf
  if not cfg.enabled:
    return jnp.argmax(scores, axis=-1)
  rgb = images + jnp.asarray(exp.config.input.mean_rgb, images.dtype)
  settings = {k: v for k, v in cfg.items() if k != "enabled"}
  run = functools.partial(crf.dense_crf, **settings)
  if exp.mesh.size > 1 and images.shape[0] % exp.mesh.size == 0:
    # The CRF runs its examples one after another (lax.map); over a batch split across the mesh, each device runs
    # its own rows (left to the partitioner, the loop would gather the whole batch on every device).
    rows = PartitionSpec(sharding.DATA_AXIS)
    run = jax.shard_map(run, mesh=exp.mesh, in_specs=(rows, rows, rows), out_specs=rows)
  return jnp.argmax(run(scores, rgb, valid), axis=-1)
