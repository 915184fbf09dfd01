"""The eval-mode forward pass shared by evaluation, prediction, the panels, export and the benchmark: every scale,
the fusion, optional test-time flip, the scores brought to the input's resolution, the optional CRF on them, and
`plan`, the one place that decides whether images run whole or tiled."""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec

from scaleattn import crf, sharding
from scaleattn.experiment import Experiment, as_variables
from scaleattn.inference import tiling
from scaleattn.inference.memory import memory_analysis
from scaleattn.models import MultiScaleOutput, resize

Forward = Callable[[Any, jax.Array], MultiScaleOutput]


def predict_scores(params: Any, images: jax.Array, *, exp: Experiment, flip: bool, forward: Forward | None = None
                   ) -> MultiScaleOutput:
  """Eval-mode outputs on the scale-1 output grid over config.eval.scales, from the whole images or from
  `forward(params, images)` (tiled inference); with `flip`, fused and per-scale scores and weights average the
  image and its mirror (mirrored back)."""
  if forward is None:
    forward = lambda w, x: exp.eval_model.apply(as_variables(w), x, train=False)
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


@functools.partial(jax.jit, static_argnames=("exp",))
def full_resolution(params: Any, images: jax.Array, valid: jax.Array, *, exp: Experiment
                    ) -> tuple[jax.Array, jax.Array]:
  """Whole-image prediction: labels and fusion weights at the images' resolution; `valid` marks the real pixels of
  padded images."""
  out = predict_scores(params, images, exp=exp, flip=exp.config.eval.flip)
  return predict_labels(out.fused, images, valid, exp=exp), to_input_size(out.weights, images)


class Plan(NamedTuple):
  """How images run: all through `tiled` (`tile_all`), or whole up to the planned size and through `tiled` (when
  not None) beyond it; `measured`: the compiled bytes the memory budget looked at."""
  tiled: tiling.TiledForward | None
  tile_all: bool
  measured: dict[str, int]

  def scores(self, params: Any, images: jax.Array, *, exp: Experiment) -> MultiScaleOutput:
    """Eval-mode outputs on the scale-1 output grid through the tiles, flipped as config.eval says."""
    return predict_scores(params, images, exp=exp, flip=exp.config.eval.flip, forward=self.tiled)


def plan(exp: Experiment, params: Any, *, rows: int, size: int, tile_larger: bool = False,
         devices: Sequence[jax.Device] | None = None) -> Plan:
  """Whole images or tiles for batches of `rows` images per device up to size x size, from config.eval: its
  `tile_size`, or with `memory_budget_gb` whole images when their compiled program (`full_resolution`) fits the
  budget, else the largest tile that does (`tiling.choose`). `tile_larger`: a caller that meets images larger than
  `size` gets `size`-pixel tiles for them even when whole images were chosen. The overlap follows
  `tiling.resolve_overlap`."""
  canvas = jax.ShapeDtypeStruct((rows, size, size, 3), jnp.float32)
  valid = jax.ShapeDtypeStruct(canvas.shape[:3], jnp.bool_)
  whole_bytes = lambda: memory_analysis(full_resolution.lower(params, canvas, valid, exp=exp).compile())[
      "total_bytes"]
  choice = tiling.choose(exp.eval_model, params, exp.config.eval, batch=rows, longest=size, whole_bytes=whole_bytes)
  if choice.tile:
    logging.info("Inference tiled: %s (measured bytes: %s)", tiling.describe(exp.eval_model, choice.tile,
                                                                             choice.overlap), choice.measured)
    return Plan(tiling.TiledForward(exp.eval_model, choice.tile, choice.overlap, devices=devices,
                                    tiles_per_step=choice.per_step), True, choice.measured)
  if tile_larger:
    overlap = tiling.resolve_overlap(exp.eval_model, size, exp.config.eval.tile_overlap, cap=size // 2)
    return Plan(tiling.TiledForward(exp.eval_model, size, overlap, devices=devices,
                                    tiles_per_step=exp.config.eval.tiles_per_step), False, choice.measured)
  return Plan(None, False, choice.measured)
