"""Sliding-window (tiled) multi-scale inference in device memory that does not grow with the image.

Three passes, each a fixed-shape jitted step run window after window; the whole maps live in host memory (NumPy)
between them, so the device holds one step's work at a time:

1. The backbone, on every scale's tiles. Each scale's input (the image resized as `MultiScaleNet.scale_inputs` does) is
   cut into `tile` x `tile` tiles at offsets that are multiples of the output stride, so that every tile's output
   grid is a window of the whole input's. A tile is made on the device from the image rows and columns it needs
   (the slice of the resize that lands in it), and the backbone runs on it confined to the input's pixels
   (`valid_size`). Every output cell takes its value from the tile whose centre it is nearest: the blending weights
   are 0 or 1 and sum to one at every cell, and a cell whose receptive field lies inside that tile (or reaches past
   the input's edge only) gets exactly the whole-input result, so with an overlap of twice the backbone's
   receptive-field radius tiled equals whole-input inference.
2. The fusion, in windows of the scale-1 output grid: each scale's scores and features around the window (one cell
   more on every side, for the fusion heads' 3x3 convolutions) are brought into the window by the slice of the
   whole map's resize that lands there, and fused by the model's own `MultiScaleNet.fuse`.
3. For prediction, the fused scores at the image's resolution and their argmax, in windows of `tile` pixels.

The tile step runs `tiles_per_step` tiles per call (stacked along a leading axis, every scale's tiles in one
queue; the last group is padded with copies of its last tile, whose outputs are dropped). The fusion and
upsampling steps run one window per call: an image has few of them (each covers a tile's worth of the scale-1
input, without overlap), and on VGG-16 LargeFOV the fusion window is already the largest program.

Compilation: every window a step reads has a fixed shape, whatever the image's size: its span is the bound
`window_span` gives for every resize the step meets (not that image's own need; the tiles of every scale share the
smallest scale's), so predicting images of any number of sizes compiles three programs per batch size, each once (`TiledForward.programs`, logged with the time
their compilation took). Host memory holds every scale's scores and features, which whole-image inference holds on
the device.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from scaleattn.config.validation import ConfigError
from scaleattn.experiment import as_variables
from scaleattn.inference.memory import memory_analysis
from scaleattn.models import MultiScaleNet, MultiScaleOutput, resize

# Tile sizes the memory budget chooses from: 8k + 1 pixels, so a tile's output grid has no partial cell.
TILE_SIZES = (65, 129, 193, 257, 321, 385, 449, 513, 641, 769, 897, 1025, 1281, 1537, 2049)


@dataclasses.dataclass(frozen=True)
class AxisPlan:
  """Tiles along one axis of an input of `length` pixels: their offsets, their real (unpadded) pixels, and the
  output cells [lo, hi) of the whole input's grid each one provides."""
  length: int
  tile: int
  starts: tuple[int, ...]
  valid: tuple[int, ...]
  owned: tuple[tuple[int, int], ...]
  cells: int  # the whole input's output grid

  @property
  def padded(self) -> int:
    return self.starts[-1] + self.tile


def plan_axis(length: int, tile: int, overlap: int, stride: int, output_size: Callable[[int], int]) -> AxisPlan:
  """Offsets stepping by tile - overlap (rounded down to the backbone's output `stride`, at least one stride), the
  last one the first multiple of the stride whose tile reaches the end; each output cell is owned by the tile whose
  coverage it is deepest in (the boundary between neighbours halves their overlap). `output_size`: the backbone's
  output grid length for an input length."""
  if length <= tile:
    starts = [0]
  else:
    step = max(stride, (tile - overlap) // stride * stride)
    last = -(-(length - tile) // stride) * stride
    starts = list(range(0, last, step)) + [last]
  valid = [min(tile, length - s) for s in starts]
  first = [s // stride for s in starts]
  end = [f + output_size(v) for f, v in zip(first, valid, strict=True)]
  bounds = [0] + [(first[k + 1] + end[k]) // 2 for k in range(len(starts) - 1)] + [end[-1]]
  return AxisPlan(length, tile, tuple(starts), tuple(valid), tuple(zip(bounds[:-1], bounds[1:], strict=True)),
                  output_size(length))


def exact_overlap(model: MultiScaleNet) -> int:
  """The overlap from which tiled inference equals whole-image inference: twice the backbone's receptive-field
  radius, rounded up to its output stride."""
  stride = model.backbone.output_stride
  return -(-2 * model.backbone.receptive_radius() // stride) * stride


def resolve_overlap(model: MultiScaleNet, tile: int, overlap: int | None, cap: int | None = None) -> int:
  """config.eval.tile_overlap for `tile`-pixel tiles: as given (at most `cap`), or when unset (None) the exact
  overlap where it fits in the tile, else the largest multiple of the output stride below the tile (logged: such
  tiles are not exact)."""
  if overlap is not None:
    return overlap if cap is None else min(overlap, cap)
  exact, stride = exact_overlap(model), model.backbone.output_stride
  limit = tile - 1 if cap is None else min(tile - 1, cap)
  if exact <= limit:
    return exact
  fitted = max(0, limit // stride * stride)
  logging.info("config.eval.tile_overlap unset: the exact overlap %d does not fit %d-pixel tiles; using %d, so "
               "cells near inner tile edges differ from whole-image inference.", exact, tile, fitted)
  return fitted


def describe(model: MultiScaleNet, tile: int, overlap: int) -> str:
  """The tiling in words, saying whether it is exact."""
  exact = exact_overlap(model)
  return f"{tile}-pixel tiles overlapping by {overlap}" + (
      f" (exact: at least the exact overlap {exact})" if overlap >= exact else
      f" (below the exact overlap {exact}: cells near inner tile edges differ from whole-image inference)")


@dataclasses.dataclass(frozen=True)
class Windows:
  """A resize (bilinear, align corners) along one axis from `n_in` positions to `n_out`, cut into windows of its
  output: window k is the output positions [starts[k] - halo, starts[k] + size + halo), made from the input
  positions [reads[k], reads[k] + span) (zero outside the input) by matrices[k] [size + 2 halo, span]; output
  positions outside [0, n_out) come out zero."""
  starts: tuple[int, ...]
  reads: tuple[int, ...]
  matrices: np.ndarray

  @property
  def span(self) -> int:
    return self.matrices.shape[2]


def window_span(size: int, halo: int, margin: int, ratio: float) -> int:
  """The input positions a window of `size` + 2 `halo` outputs reads (`margin` more on either side), rounded up to
  a multiple of 8, for every bilinear resize whose step (n_in - 1) / (n_out - 1) is below `ratio`: an output run
  of n positions spans at most floor((n - 1) step) + 2 input positions, plus one where the run's first position
  falls just before a tap."""
  return -(-(math.floor((size + 2 * halo - 1) * ratio) + 3 + 2 * margin) // 8) * 8


def resize_windows(n_out: int, n_in: int, starts: Sequence[int], size: int, halo: int = 0, margin: int = 0,
                   ratio: float = 0.0) -> Windows:
  """The windows of the resize n_in -> n_out at `starts`, each reading `margin` more input positions on either
  side than its taps (for a 3x3 convolution on them). The span is `window_span(size, halo, margin, ratio)`, shared
  by all the resizes whose step `ratio` bounds, so that they share compiled programs; a resize needing more (a
  step above `ratio`) gets its own span, rounded up to a multiple of 8."""
  taps, frac = resize.interpolation_taps(n_out, n_in)
  second = 1 if n_in > 1 else 0
  ranges = [(max(start - halo, 0), min(start + size + halo, n_out)) for start in starts]
  first = [int(taps[lo:hi].min()) if hi > lo else 0 for lo, hi in ranges]
  last = [int(taps[lo:hi].max()) + second if hi > lo else 0 for lo, hi in ranges]
  needed = max(b - a for a, b in zip(first, last, strict=True)) + 1 + 2 * margin
  span = max(-(-needed // 8) * 8, window_span(size, halo, margin, ratio))
  reads = tuple(a - margin for a in first)
  matrices = np.zeros((len(starts), size + 2 * halo, span), np.float32)
  for k, ((lo, hi), start, read) in enumerate(zip(ranges, starts, reads, strict=True)):
    out = np.arange(lo, hi) - start + halo
    np.add.at(matrices[k], (out, taps[lo:hi] - read), 1.0 - frac[lo:hi])
    if second:
      np.add.at(matrices[k], (out, taps[lo:hi] + 1 - read), frac[lo:hi])
  return Windows(tuple(starts), reads, matrices)


def _crop(x: np.ndarray, row: int, col: int, height: int, width: int) -> np.ndarray:
  """x[:, row:row + height, col:col + width] of a host array [B, H, W, ...], zero outside x."""
  out = np.zeros((x.shape[0], height, width) + x.shape[3:], x.dtype)
  r0, r1 = max(row, 0), min(row + height, x.shape[1])
  c0, c1 = max(col, 0), min(col + width, x.shape[2])
  if r0 < r1 and c0 < c1:
    out[:, r0 - row:r1 - row, c0 - col:c1 - col] = x[:, r0:r1, c0:c1]
  return out


def _tile_forward(model: MultiScaleNet, crop: jax.Array, rows: jax.Array, cols: jax.Array, valid: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """One tile of one scale's input, made from the image rows and columns it reads (zero beyond the input), through
  the backbone, confined to the input's pixels when the backbone can be (else cells whose receptive field reaches
  past the input's edge see the zeros there as image)."""
  tile = resize.apply_matrices(crop * model.input_scale, rows, cols)
  return model.backbone(tile, train=False, valid_size=valid if model.backbone.supports_valid_size else None)


def _fuse_window(model: MultiScaleNet, crops: Sequence[tuple[jax.Array, jax.Array]], rows: Sequence[jax.Array],
                 cols: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One window of the scale-1 output grid (with its one-cell halo) fused from every scale's maps around it;
  returns the window's fused scores, weights and per-scale scores without the halo."""
  to_grid = [functools.partial(resize.apply_matrices, rows=r, cols=c) for r, c in zip(rows, cols, strict=True)]
  out = model.fuse(crops, train=False, grid=(rows[0].shape[0], cols[0].shape[0]), to_grid=to_grid)
  return out.fused[:, 1:-1, 1:-1], out.weights[:, 1:-1, 1:-1], out.per_scale[:, 1:-1, 1:-1]


def _upsample_window(fused: jax.Array, weights: jax.Array, rows: jax.Array, cols: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """One window of the image: the labels (argmax of the fused scores brought to it) and the fusion weights."""
  scores = resize.apply_matrices(fused.astype(jnp.float32), rows, cols)
  return jnp.argmax(scores, axis=-1), resize.apply_matrices(weights.astype(jnp.float32), rows, cols)


class TiledForward:
  """Eval-mode forward pass of `model` window by window: (params, images [B, H, W, 3]) -> MultiScaleOutput of
  host arrays, what `model.apply(..., train=False)` gives for the whole images (exactly so with `overlap >=
  exact_overlap`); `upsample` brings fused scores and weights to the images' resolution the same way. The backbone
  runs `tiles_per_step` tiles per call. The steps run on `devices` (default: JAX's default device), the batch split
  over them when it divides evenly."""

  def __init__(self, model: MultiScaleNet, tile: int, overlap: int, devices: Sequence[jax.Device] | None = None,
               tiles_per_step: int = 1):
    stride = model.backbone.output_stride
    if tile < stride or not 0 <= overlap < tile:
      raise ValueError(f"TiledForward: tile={tile}, overlap={overlap}: expected tile >= {stride} and "
                       "0 <= overlap < tile")
    if tiles_per_step < 1:
      raise ValueError(f"TiledForward: tiles_per_step={tiles_per_step}: expected a positive integer")
    self.model, self.tile, self.overlap, self.tiles_per_step = model, tile, overlap, tiles_per_step
    self.output_size = model.backbone.output_size
    self.window = self.output_size(tile)  # fusion windows: as many output cells as a tile gives
    self._mesh = jax.sharding.Mesh(np.asarray(devices or jax.devices()[:1]), ("batch",))
    self._replicated = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())
    self.tile_step = jax.jit(jax.vmap(functools.partial(model.apply, method=_tile_forward), in_axes=(None, 0, 0, 0, 0)))
    self.fuse_step = jax.jit(functools.partial(model.apply, method=_fuse_window))
    self.upsample_step = jax.jit(_upsample_window)
    # Bounds of the resizes' steps (n_in - 1) / (n_out - 1), from which every window of a step gets one shape
    # (`window_span`), for backbones whose output grid has within one cell of (n - 1) / stride + 1 cells:
    # the image to a scale's input, T / (s (T - 1)) once the input needs two tiles (all scales share the smallest
    # scale's); a scale's output grid to the scale-1 one, s + (s + 1) / window once that needs two windows; the
    # output grid to the image, 1 / stride + 1 / T. Below those sizes a window reads the whole input, within the
    # same bounds.
    self._tile_ratio = tile / (min(model.scales) * (tile - 1))
    self._fuse_ratios = [s + (s + 1) / self.window for s in model.scales]
    self._upsample_ratio = 1 / stride + 1 / tile
    self._compiled: dict[Any, Any] = {}
    self.compile_s = 0.0

  @property
  def programs(self) -> int:
    """Programs compiled so far (one per step and shape of its arguments); `compile_s` is their compile time."""
    return len(self._compiled)

  def _run(self, name: str, step: Any, *args: Any) -> Any:
    """`step(*args)`, compiled ahead of time once per shape of its arguments, counted and timed."""
    key = (name, jax.tree.structure(args), tuple((x.shape, x.dtype) for x in jax.tree.leaves(args)))
    if key not in self._compiled:
      start = time.perf_counter()
      self._compiled[key] = step.lower(*args).compile()
      seconds = time.perf_counter() - start
      self.compile_s += seconds
      logging.info("Tiled inference: compiled %s in %.1f s (%d programs so far, %.1f s in all).", name, seconds,
                   self.programs, self.compile_s)
    return self._compiled[key](*args)

  def _batch(self, x: np.ndarray, axis: int = 0) -> jax.Array:
    """On the devices, split along the batch `axis` when it divides evenly, else replicated."""
    if x.shape[axis] % self._mesh.size:
      return jax.device_put(x, self._replicated)
    spec = jax.sharding.PartitionSpec(*[None] * axis, "batch")
    return jax.device_put(x, jax.sharding.NamedSharding(self._mesh, spec))

  def _replicate(self, x: Any) -> Any:
    """On every device of this forward, from this process's copy (parameters may be global arrays)."""
    return jax.device_put(jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, x),
                          self._replicated)

  def scale_plans(self, height: int, width: int) -> list[tuple[AxisPlan, AxisPlan, Windows, Windows]]:
    """Per scale: the tiling of that scale's input, and the windows of the image's resize to it that make the
    tiles."""
    plans = []
    for s in self.model.scales:
      rows, cols = (plan_axis(resize.scaled_size(n, s), self.tile, self.overlap, self.model.backbone.output_stride,
                              self.output_size) for n in (height, width))
      plans.append((rows, cols, resize_windows(rows.length, height, rows.starts, self.tile, ratio=self._tile_ratio),
                    resize_windows(cols.length, width, cols.starts, self.tile, ratio=self._tile_ratio)))
    return plans

  def fusion_windows(self, height: int, width: int) -> list[tuple[Windows, Windows]]:
    """Per scale: the windows of its output grid's resize to the scale-1 output grid, one-cell halos included."""
    h, w, t = self.output_size(height), self.output_size(width), self.window
    return [(resize_windows(h, rows.cells, range(0, h, t), t, 1, 1, ratio),
             resize_windows(w, cols.cells, range(0, w, t), t, 1, 1, ratio))
            for (rows, cols, _, _), ratio in zip(self.scale_plans(height, width), self._fuse_ratios, strict=True)]

  def __call__(self, params: Any, images: np.ndarray) -> MultiScaleOutput:
    images = np.asarray(images, np.float32)
    variables = self._replicate(as_variables(params))
    return self._fuse_maps(variables, self._backbone_maps(variables, images), *images.shape[1:3])

  def _backbone_maps(self, variables: Any, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every scale's (scores, features) on its whole output grid: every scale's tiles in one queue (one per window
    shape, a single one unless a resize outgrows its fixed span), `tiles_per_step` per call; a group is fetched
    after the next one is dispatched, so the host cuts the next tiles while the device runs."""
    plans = self.scale_plans(*images.shape[1:3])
    stride, per_step = self.model.backbone.output_stride, self.tiles_per_step
    queues: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for k, (rows, cols, row_windows, col_windows) in enumerate(plans):
      for i, j in np.ndindex(len(rows.starts), len(cols.starts)):
        queues.setdefault((row_windows.span, col_windows.span), []).append((k, i, j))
    maps: list[list[np.ndarray] | None] = [None] * len(plans)

    def tile_inputs(k: int, i: int, j: int) -> tuple[np.ndarray, ...]:
      rows, cols, row_windows, col_windows = plans[k]
      return (_crop(images, row_windows.reads[i], col_windows.reads[j], row_windows.span, col_windows.span),
              row_windows.matrices[i], col_windows.matrices[j], np.asarray((rows.valid[i], cols.valid[j]), np.int32))

    def store(group: list[tuple[int, int, int]], outs: Any) -> None:
      outs = jax.device_get(outs)
      for n, (k, i, j) in enumerate(group):  # the dummy tiles after the group's own are dropped
        rows, cols, _, _ = plans[k]
        if maps[k] is None:
          maps[k] = [np.zeros((images.shape[0], rows.cells, cols.cells, o.shape[-1]), o.dtype) for o in outs]
        (r0, r1), (c0, c1) = rows.owned[i], cols.owned[j]
        fy, fx = rows.starts[i] // stride, cols.starts[j] // stride
        for whole, o in zip(maps[k], outs, strict=True):
          whole[:, r0:r1, c0:c1] = o[n, :, r0 - fy:r1 - fy, c0 - fx:c1 - fx]

    pending = None
    for queue in queues.values():
      for first in range(0, len(queue), per_step):
        group = queue[first:first + per_step]
        padded = group + group[-1:] * (per_step - len(group))  # copies of the last tile keep the shapes static
        crops, *shared = (np.stack(x) for x in zip(*(tile_inputs(*item) for item in padded), strict=True))
        outs = self._run("tile_step", self.tile_step, variables, self._batch(crops, axis=1),
                         *self._replicate(tuple(shared)))
        if pending is not None:
          store(*pending)
        pending = (group, outs)
    store(*pending)
    return [(scores, features) for scores, features in maps]

  def _fuse_maps(self, variables: Any, maps: Sequence[tuple[np.ndarray, np.ndarray]], height: int, width: int
                 ) -> MultiScaleOutput:
    """The fused output on the scale-1 output grid, window by window."""
    windows = self.fusion_windows(height, width)
    h, w, t = self.output_size(height), self.output_size(width), self.window
    b, c, s = maps[0][0].shape[0], maps[0][0].shape[-1], len(maps)
    fused = np.zeros((b, h, w, c), np.float32)
    weights, per_scale = np.zeros((b, h, w, s), np.float32), np.zeros((b, h, w, s, c), np.float32)
    for i, r0 in enumerate(range(0, h, t)):
      for j, c0 in enumerate(range(0, w, t)):
        crops = tuple(tuple(self._batch(_crop(m, wr.reads[i], wc.reads[j], wr.span, wc.span)) for m in pair)
                      for pair, (wr, wc) in zip(maps, windows, strict=True))
        matrices = self._replicate((tuple(wr.matrices[i] for wr, _ in windows),
                                    tuple(wc.matrices[j] for _, wc in windows)))
        outs = jax.device_get(self._run("fuse_window", self.fuse_step, variables, crops, *matrices))
        r1, c1 = min(r0 + t, h), min(c0 + t, w)
        for whole, o in zip((fused, weights, per_scale), outs, strict=True):
          whole[:, r0:r1, c0:c1] = o[:, :r1 - r0, :c1 - c0]
    return MultiScaleOutput(fused=fused, per_scale=per_scale, weights=weights,
                            own_grid=tuple(scores for scores, _ in maps), scales=tuple(self.model.scales))

  def upsample_windows(self, height: int, width: int) -> tuple[Windows, Windows]:
    """The windows of the output grid's resize to the images' height x width, `tile` pixels each."""
    return tuple(resize_windows(n, self.output_size(n), range(0, n, self.tile), self.tile,
                                ratio=self._upsample_ratio) for n in (height, width))

  def upsample(self, fused: np.ndarray, weights: np.ndarray, height: int, width: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(labels [B, H, W], weights [B, H, W, S]) at the images' resolution from fused scores and weights on the
    output grid, in windows of `tile` pixels: `inference.predict_labels` without the CRF, and
    `inference.to_input_size`."""
    rows, cols = self.upsample_windows(height, width)
    b = fused.shape[0]
    labels = np.zeros((b, height, width), np.int32)
    full = np.zeros((b, height, width, weights.shape[-1]), np.float32)
    for i, y0 in enumerate(rows.starts):
      for j, x0 in enumerate(cols.starts):
        crops = [self._batch(_crop(np.asarray(m), rows.reads[i], cols.reads[j], rows.span, cols.span))
                 for m in (fused, weights)]
        outs = jax.device_get(self._run("upsample_window", self.upsample_step, *crops,
                                        *self._replicate((rows.matrices[i], cols.matrices[j]))))
        y1, x1 = min(y0 + self.tile, height), min(x0 + self.tile, width)
        for whole, o in zip((labels, full), outs, strict=True):
          whole[:, y0:y1, x0:x1] = o[:, :y1 - y0, :x1 - x0]
    return labels, full

  def _tile_args(self, params: Any, batch: int, row_span: int, col_span: int) -> tuple:
    struct, g = jax.ShapeDtypeStruct, self.tiles_per_step
    return (as_variables(params), struct((g, batch, row_span, col_span, 3), jnp.float32),
            struct((g, self.tile, row_span), jnp.float32), struct((g, self.tile, col_span), jnp.float32),
            struct((g, 2), jnp.int32))

  def program_bytes(self, params: Any, batch: int, height: int, width: int) -> dict[str, int]:
    """XLA's buffer assignment of the three steps for `batch` images of height x width, compiled from shapes (not
    run): the tile step (`tiles_per_step` tiles; the largest over its window shapes), the fusion window and the
    upsampling window. None of them grows with the image."""
    struct = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    plans = self.scale_plans(height, width)
    measured = {"tile_step": max(
        memory_analysis(self.tile_step.lower(*self._tile_args(params, batch, *spans)).compile())["total_bytes"]
        for spans in {(wr.span, wc.span) for _, _, wr, wc in plans})}
    channels = [tuple(o.shape[-1] for o in jax.eval_shape(self.tile_step, *self._tile_args(
        params, batch, wr.span, wc.span))) for _, _, wr, wc in plans]
    windows = self.fusion_windows(height, width)
    crops = tuple(tuple(struct((batch, wr.span, wc.span, n)) for n in pair)
                  for pair, (wr, wc) in zip(channels, windows, strict=True))
    fuse = self.fuse_step.lower(as_variables(params), crops, tuple(struct(wr.matrices.shape[1:]) for wr, _ in windows),
                                tuple(struct(wc.matrices.shape[1:]) for _, wc in windows)).compile()
    measured["fuse_window"] = memory_analysis(fuse)["total_bytes"]
    rows, cols = self.upsample_windows(height, width)
    up = self.upsample_step.lower(struct((batch, rows.span, cols.span, channels[0][0])),
                                  struct((batch, rows.span, cols.span, len(channels))),
                                  struct(rows.matrices.shape[1:]), struct(cols.matrices.shape[1:])).compile()
    measured["upsample_window"] = memory_analysis(up)["total_bytes"]
    return measured

  def host_bytes(self, params: Any, batch: int, height: int, width: int) -> int:
    """Host memory of the maps held between the steps: every scale's scores and features, the fused outputs, and
    the labels and weights at the images' resolution (float32 and int32)."""
    cells = 0
    for rows, cols, wr, wc in self.scale_plans(height, width):
      scores, feats = jax.eval_shape(self.tile_step, *self._tile_args(params, batch, wr.span, wc.span))
      cells += rows.cells * cols.cells * (scores.shape[-1] + feats.shape[-1])
    s, c = len(self.model.scales), scores.shape[-1]
    cells += self.output_size(height) * self.output_size(width) * (c + s + s * c)
    return 4 * batch * (cells + height * width * (1 + s))


def tile_count(model: MultiScaleNet, tile: int, overlap: int, height: int, width: int) -> int:
  """The tiles the backbone runs on for a height x width image, over every scale (before padding to whole groups
  of tiles per step)."""
  stride = model.backbone.output_stride
  return sum(math.prod(len(plan_axis(resize.scaled_size(n, s), tile, overlap, stride, model.backbone.output_size)
                           .starts) for n in (height, width)) for s in model.scales)


def tiled_bytes(model: MultiScaleNet, params: Any, batch: int, tile: int, overlap: int | None, size: int,
                tiles_per_step: int = 1) -> int:
  """The largest of the tiled pass's programs on size x size images (`TiledForward.program_bytes`)."""
  overlap = resolve_overlap(model, tile, overlap, cap=tile // 2)
  return max(TiledForward(model, tile, overlap, tiles_per_step=tiles_per_step)
             .program_bytes(params, batch, size, size).values())


class TileChoice(NamedTuple):
  """How inference runs: `tile` 0 for whole images, else tiles overlapping by `overlap`, `per_step` of them per
  backbone call; the bytes each compiled step measured, when a budget was set."""
  tile: int
  overlap: int
  per_step: int
  measured: dict[str, int]


def choose(model: MultiScaleNet, params: Any, cfg: ml_collections.ConfigDict, *, batch: int, longest: int,
           whole_bytes: Callable[[], int]) -> TileChoice:
  """Whole images or tiles, from config.eval: `tile_size` and `tiles_per_step` as given, or with
  `memory_budget_gb` the whole image when its compiled step fits the budget, else the largest tile whose tiled
  pass (its larger program, on longest x longest images, `batch` per device) does, then the most tiles per step
  that still fit (`most_tiles_per_step`). The overlap is `tile_overlap`, at most half a chosen tile."""
  budget = cfg.memory_budget_gb * 2 ** 30
  if not budget:
    tile = cfg.tile_size
    return TileChoice(tile, resolve_overlap(model, tile, cfg.tile_overlap) if tile else 0, cfg.tiles_per_step, {})
  gb = lambda n: f"{n / 2 ** 30:.2f} GB"
  if cfg.tile_size:
    need = tiled_bytes(model, params, batch, cfg.tile_size, cfg.tile_overlap, longest)
    if need <= budget:
      return _fill_steps(model, params, batch, budget, longest, cfg.tile_size,
                         resolve_overlap(model, cfg.tile_size, cfg.tile_overlap), {f"tile_{cfg.tile_size}": need})
    best, _ = largest_fitting_tile(model, params, batch, budget, longest, cfg.tile_overlap, limit=cfg.tile_size)
    raise ConfigError(f"config.eval.tile_size={cfg.tile_size}: its step needs {gb(need)} on a device, more than "
                      f"config.eval.memory_budget_gb={cfg.memory_budget_gb}; "
                      + (f"tiles up to {best} fit" if best else "no tile size fits"))
  whole = whole_bytes()
  if whole <= budget:
    return TileChoice(0, 0, 1, {"whole": whole})
  best, measured = largest_fitting_tile(model, params, batch, budget, longest, cfg.tile_overlap)
  if best is None:
    raise ConfigError(f"config.eval.memory_budget_gb={cfg.memory_budget_gb}: even {TILE_SIZES[0]}-pixel tiles need "
                      f"{gb(measured[TILE_SIZES[0]])} on a device; expected a budget of at least that")
  overlap = resolve_overlap(model, best, cfg.tile_overlap, cap=best // 2)
  return _fill_steps(model, params, batch, budget, longest, best, overlap,
                     {"whole": whole, **{f"tile_{t}": n for t, n in measured.items()}})


def _fill_steps(model: MultiScaleNet, params: Any, batch: int, budget_bytes: float, longest: int, tile: int,
                overlap: int, measured: dict[str, int]) -> TileChoice:
  """The choice of `tile`, with the most tiles per step the budget holds (their bytes added as tile_T_xN)."""
  per_step, more = most_tiles_per_step(model, params, batch, budget_bytes, longest, tile, overlap,
                                       limit=tile_count(model, tile, overlap, longest, longest))
  return TileChoice(tile, overlap, per_step, {**measured, **{f"tile_{tile}_x{n}": b for n, b in more.items()}})


def most_tiles_per_step(model: MultiScaleNet, params: Any, batch: int, budget_bytes: float, longest: int, tile: int,
                        overlap: int, limit: int, measure: Callable[..., int] = tiled_bytes
                        ) -> tuple[int, dict[int, int]]:
  """The most tiles per step, doubling from one (which the tile's own choice measured to fit), whose tiled pass
  fits the budget, and at most `limit` (the tiles a longest x longest image needs: more would all be dummies).
  Also returns the bytes measured per count."""
  best, measured, count = 1, {}, 2
  while count <= limit:
    measured[count] = measure(model, params, batch, tile, overlap, longest, count)
    if measured[count] > budget_bytes:
      break
    best, count = count, 2 * count
  return best, measured


def largest_fitting_tile(model: MultiScaleNet, params: Any, batch: int, budget_bytes: float, longest: int,
                         overlap: int, limit: int | None = None,
                         measure: Callable[..., int] = tiled_bytes) -> tuple[int | None, dict[int, int]]:
  """The largest of TILE_SIZES (up to the first that covers `longest` pixels, and below `limit`) whose tiled pass
  fits the budget, by bisection on compiled programs; None if not even the smallest fits. Also returns the bytes
  measured per tile size. The bisection takes the need to grow with the tile, as it does once the tile step
  dominates (on small images many small tiles' outputs can outweigh it); a tile it returns was measured to fit."""
  covering = next((t for t in TILE_SIZES if t >= longest), TILE_SIZES[-1])
  candidates = [t for t in TILE_SIZES if t <= covering and (limit is None or t < limit)] or [TILE_SIZES[0]]
  measured: dict[int, int] = {}
  lo, hi, best = 0, len(candidates) - 1, None
  while lo <= hi:
    mid = (lo + hi) // 2
    measured[candidates[mid]] = measure(model, params, batch, candidates[mid], overlap, longest)
    if measured[candidates[mid]] <= budget_bytes:
      best, lo = candidates[mid], mid + 1
    else:
      hi = mid - 1
  return best, measured
