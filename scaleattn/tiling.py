"""Sliding-window (tiled) multi-scale inference in device memory that does not grow with the image.

Three passes, each a fixed-shape jitted step run window after window; the whole maps live in host memory (NumPy)
between them, so the device holds one window's work at a time:

1. The backbone, scale after scale. Each scale's input (the image resized as `MultiScaleNet.scale_inputs` does) is
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

Compilation: each step once per distinct window shape: the slice of a resize is an argument, and the rows a
window reads are rounded up to a multiple of 8, so image sizes share programs (the tile step has one shape per
scale once every scale's input is larger than a tile). Host memory holds every scale's scores and features, which whole-image inference holds on the device.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scaleattn import config_validation
from scaleattn.compiled_memory import memory_analysis
from scaleattn.config_validation import ConfigError
from scaleattn.models import MultiScaleNet, MultiScaleOutput, resize
from scaleattn.models.largefov import receptive_radius

OUTPUT_STRIDE = config_validation.OUTPUT_STRIDE
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

  @property
  def cells(self) -> int:
    return resize.output_size(self.length)

  @property
  def padded(self) -> int:
    return self.starts[-1] + self.tile


def plan_axis(length: int, tile: int, overlap: int) -> AxisPlan:
  """Offsets stepping by tile - overlap (rounded down to the output stride, at least one stride), the last one the
  first multiple of the stride whose tile reaches the end; each output cell is owned by the tile whose coverage
  it is deepest in (the boundary between neighbours halves their overlap)."""
  if length <= tile:
    starts = [0]
  else:
    step = max(OUTPUT_STRIDE, (tile - overlap) // OUTPUT_STRIDE * OUTPUT_STRIDE)
    last = -(-(length - tile) // OUTPUT_STRIDE) * OUTPUT_STRIDE
    starts = list(range(0, last, step)) + [last]
  valid = [min(tile, length - s) for s in starts]
  first = [s // OUTPUT_STRIDE for s in starts]
  end = [f + resize.output_size(v) for f, v in zip(first, valid, strict=True)]
  bounds = [0] + [(first[k + 1] + end[k]) // 2 for k in range(len(starts) - 1)] + [end[-1]]
  return AxisPlan(length, tile, tuple(starts), tuple(valid), tuple(zip(bounds[:-1], bounds[1:], strict=True)))


def blend_weights(plan: AxisPlan) -> np.ndarray:
  """[tiles, cells]: 1 where a tile provides the cell (its weight in the stitched map), else 0."""
  weights = np.zeros((len(plan.starts), plan.cells), np.float32)
  for k, (lo, hi) in enumerate(plan.owned):
    weights[k, lo:hi] = 1.0
  return weights


def exact_overlap(backbone: ml_collections.ConfigDict) -> int:
  """The overlap from which tiled inference equals whole-image inference: twice the receptive-field radius,
  rounded up to the output stride."""
  radius = receptive_radius(backbone.block_depths, backbone.conv5_dilation, backbone.fc6_dilation,
                            backbone.fc6_kernel, backbone.stride1_pools)
  return -(-2 * radius // OUTPUT_STRIDE) * OUTPUT_STRIDE


def describe(model_cfg: ml_collections.ConfigDict, tile: int, overlap: int) -> str:
  """The tiling in words, saying whether it is exact (for the LargeFOV backbone, whose receptive field is known)."""
  text = f"{tile}-pixel tiles overlapping by {overlap}"
  if model_cfg.backbone.name != "largefov":
    return text
  exact = exact_overlap(model_cfg.backbone)
  return text + (f" (exact: at least the exact overlap {exact})" if overlap >= exact else
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


def resize_windows(n_out: int, n_in: int, starts: Sequence[int], size: int, halo: int = 0, margin: int = 0
                   ) -> Windows:
  """The windows of the resize n_in -> n_out at `starts`, each reading `margin` more input positions on either
  side than its taps (for a 3x3 convolution on them); the span is rounded up to a multiple of 8."""
  taps, frac = resize.interpolation_taps(n_out, n_in)
  second = 1 if n_in > 1 else 0
  ranges = [(max(start - halo, 0), min(start + size + halo, n_out)) for start in starts]
  first = [int(taps[lo:hi].min()) if hi > lo else 0 for lo, hi in ranges]
  last = [int(taps[lo:hi].max()) + second if hi > lo else 0 for lo, hi in ranges]
  span = -(-(max(b - a for a, b in zip(first, last, strict=True)) + 1 + 2 * margin) // 8) * 8
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
  """One tile of one scale's input, made from the image rows and columns it reads, through the backbone."""
  tile = resize.apply_matrices(crop * model.input_scale, rows, cols)
  return model.backbone(tile, train=False, valid_size=valid)


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
  exact_overlap`); `upsample` brings fused scores and weights to the images' resolution the same way. The steps
  run on `devices` (default: JAX's default device), the batch split over them when it divides evenly."""

  def __init__(self, model: MultiScaleNet, tile: int, overlap: int, devices: Sequence[jax.Device] | None = None):
    if tile < OUTPUT_STRIDE or not 0 <= overlap < tile:
      raise ValueError(f"TiledForward: tile={tile}, overlap={overlap}: expected tile >= {OUTPUT_STRIDE} and "
                       "0 <= overlap < tile")
    self.model, self.tile, self.overlap = model, tile, overlap
    self.window = resize.output_size(tile)  # fusion windows: as many output cells as a tile gives
    mesh = jax.sharding.Mesh(np.asarray(devices or jax.devices()[:1]), ("batch",))
    self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    self.tile_step = jax.jit(functools.partial(model.apply, method=_tile_forward))
    self.fuse_step = jax.jit(functools.partial(model.apply, method=_fuse_window))
    self.upsample_step = jax.jit(_upsample_window)

  def _batch(self, x: np.ndarray) -> jax.Array:
    return jax.device_put(x, self._split if x.shape[0] % self._split.mesh.size == 0 else self._replicated)

  def _replicate(self, x: Any) -> Any:
    """On every device of this forward, from this process's copy (parameters may be global arrays)."""
    return jax.device_put(jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, x),
                          self._replicated)

  def scale_plans(self, height: int, width: int) -> list[tuple[AxisPlan, AxisPlan, Windows, Windows]]:
    """Per scale: the tiling of that scale's input, and the windows of the image's resize to it that make the
    tiles."""
    plans = []
    for s in self.model.scales:
      rows = plan_axis(resize.scaled_size(height, s), self.tile, self.overlap)
      cols = plan_axis(resize.scaled_size(width, s), self.tile, self.overlap)
      plans.append((rows, cols, resize_windows(rows.length, height, rows.starts, self.tile),
                    resize_windows(cols.length, width, cols.starts, self.tile)))
    return plans

  def fusion_windows(self, height: int, width: int) -> list[tuple[Windows, Windows]]:
    """Per scale: the windows of its output grid's resize to the scale-1 output grid, one-cell halos included."""
    h, w = resize.output_size(height), resize.output_size(width)
    return [(resize_windows(h, rows.cells, range(0, h, self.window), self.window, 1, 1),
             resize_windows(w, cols.cells, range(0, w, self.window), self.window, 1, 1))
            for rows, cols, _, _ in self.scale_plans(height, width)]

  def __call__(self, params: Any, images: np.ndarray) -> MultiScaleOutput:
    images = np.asarray(images, np.float32)
    variables = {"params": self._replicate(params)}
    maps = [self._backbone_maps(variables, images, *plan) for plan in self.scale_plans(*images.shape[1:3])]
    return self._fuse_maps(variables, maps, *images.shape[1:3])

  def _backbone_maps(self, variables: Any, images: np.ndarray, rows: AxisPlan, cols: AxisPlan, row_windows: Windows,
                     col_windows: Windows) -> tuple[np.ndarray, np.ndarray]:
    """One scale's (scores, features) on its whole output grid, tile by tile."""
    maps = None
    for i, (y0, vy) in enumerate(zip(rows.starts, rows.valid, strict=True)):
      for j, (x0, vx) in enumerate(zip(cols.starts, cols.valid, strict=True)):
        crop = _crop(images, row_windows.reads[i], col_windows.reads[j], row_windows.span, col_windows.span)
        outs = jax.device_get(self.tile_step(variables, self._batch(crop), *self._replicate(
            (row_windows.matrices[i], col_windows.matrices[j], np.asarray((vy, vx), np.int32)))))
        if maps is None:
          maps = [np.zeros((images.shape[0], rows.cells, cols.cells, o.shape[-1]), o.dtype) for o in outs]
        (r0, r1), (c0, c1) = rows.owned[i], cols.owned[j]
        fy, fx = y0 // OUTPUT_STRIDE, x0 // OUTPUT_STRIDE
        for whole, o in zip(maps, outs, strict=True):
          whole[:, r0:r1, c0:c1] = o[:, r0 - fy:r1 - fy, c0 - fx:c1 - fx]
    return maps[0], maps[1]

  def _fuse_maps(self, variables: Any, maps: Sequence[tuple[np.ndarray, np.ndarray]], height: int, width: int
                 ) -> MultiScaleOutput:
    """The fused output on the scale-1 output grid, window by window."""
    windows = self.fusion_windows(height, width)
    h, w, t = resize.output_size(height), resize.output_size(width), self.window
    b, c, s = maps[0][0].shape[0], maps[0][0].shape[-1], len(maps)
    fused = np.zeros((b, h, w, c), np.float32)
    weights, per_scale = np.zeros((b, h, w, s), np.float32), np.zeros((b, h, w, s, c), np.float32)
    for i, r0 in enumerate(range(0, h, t)):
      for j, c0 in enumerate(range(0, w, t)):
        crops = tuple(tuple(self._batch(_crop(m, wr.reads[i], wc.reads[j], wr.span, wc.span)) for m in pair)
                      for pair, (wr, wc) in zip(maps, windows, strict=True))
        matrices = self._replicate((tuple(wr.matrices[i] for wr, _ in windows),
                                    tuple(wc.matrices[j] for _, wc in windows)))
        outs = jax.device_get(self.fuse_step(variables, crops, *matrices))
        r1, c1 = min(r0 + t, h), min(c0 + t, w)
        for whole, o in zip((fused, weights, per_scale), outs, strict=True):
          whole[:, r0:r1, c0:c1] = o[:, :r1 - r0, :c1 - c0]
    return MultiScaleOutput(fused=fused, per_scale=per_scale, weights=weights,
                            own_grid=tuple(scores for scores, _ in maps), scales=tuple(self.model.scales))

  def upsample_windows(self, height: int, width: int) -> tuple[Windows, Windows]:
    """The windows of the output grid's resize to the images' height x width, `tile` pixels each."""
    return (resize_windows(height, resize.output_size(height), range(0, height, self.tile), self.tile),
            resize_windows(width, resize.output_size(width), range(0, width, self.tile), self.tile))

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
        outs = jax.device_get(self.upsample_step(*crops, *self._replicate((rows.matrices[i], cols.matrices[j]))))
        y1, x1 = min(y0 + self.tile, height), min(x0 + self.tile, width)
        for whole, o in zip((labels, full), outs, strict=True):
          whole[:, y0:y1, x0:x1] = o[:, :y1 - y0, :x1 - x0]
    return labels, full

  def _tile_args(self, params: Any, batch: int, row_windows: Windows, col_windows: Windows) -> tuple:
    struct = jax.ShapeDtypeStruct
    return ({"params": params}, struct((batch, row_windows.span, col_windows.span, 3), jnp.float32),
            struct(row_windows.matrices.shape[1:], jnp.float32), struct(col_windows.matrices.shape[1:], jnp.float32),
            struct((2,), jnp.int32))

  def program_bytes(self, params: Any, batch: int, height: int, width: int) -> dict[str, int]:
    """XLA's buffer assignment of the three steps for `batch` images of height x width, compiled from shapes (not
    run): the tile step (the largest over the scales), the fusion window and the upsampling window. None of them
    grows with the image."""
    struct = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    measured, channels = {"tile_step": 0}, []
    for _, _, wr, wc in self.scale_plans(height, width):
      args = self._tile_args(params, batch, wr, wc)
      step = memory_analysis(self.tile_step.lower(*args).compile())["total_bytes"]
      measured["tile_step"] = max(measured["tile_step"], step)
      channels.append(tuple(o.shape[-1] for o in jax.eval_shape(self.tile_step, *args)))
    windows = self.fusion_windows(height, width)
    crops = tuple(tuple(struct((batch, wr.span, wc.span, n)) for n in pair)
                  for pair, (wr, wc) in zip(channels, windows, strict=True))
    fuse = self.fuse_step.lower({"params": params}, crops, tuple(struct(wr.matrices.shape[1:]) for wr, _ in windows),
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
      scores, feats = jax.eval_shape(self.tile_step, *self._tile_args(params, batch, wr, wc))
      cells += rows.cells * cols.cells * (scores.shape[-1] + feats.shape[-1])
    s, c = len(self.model.scales), scores.shape[-1]
    cells += resize.output_size(height) * resize.output_size(width) * (c + s + s * c)
    return 4 * batch * (cells + height * width * (1 + s))


def tiled_bytes(model: MultiScaleNet, params: Any, batch: int, tile: int, overlap: int, size: int) -> int:
  """The largest of the tiled pass's programs on size x size images (`TiledForward.program_bytes`)."""
  return max(TiledForward(model, tile, min(overlap, tile // 2)).program_bytes(params, batch, size, size).values())


class TileChoice(NamedTuple):
  """How inference runs: `tile` 0 for whole images; the bytes each compiled step measured, when a budget was set."""
  tile: int
  overlap: int
  measured: dict[str, int]


def choose(model: MultiScaleNet, params: Any, cfg: ml_collections.ConfigDict, *, batch: int, longest: int,
           whole_bytes: Callable[[], int]) -> TileChoice:
  """Whole images or tiles, from config.eval: `tile_size` as given, or with `memory_budget_gb` the whole image when
  its compiled step fits the budget, else the largest tile whose tiled pass (its larger program, on longest x
  longest images, `batch` per device) does. The overlap is `tile_overlap`, at most half a chosen tile."""
  budget = cfg.memory_budget_gb * 2 ** 30
  if not budget:
    return TileChoice(cfg.tile_size, cfg.tile_overlap, {})
  gb = lambda n: f"{n / 2 ** 30:.2f} GB"
  if cfg.tile_size:
    need = tiled_bytes(model, params, batch, cfg.tile_size, cfg.tile_overlap, longest)
    if need <= budget:
      return TileChoice(cfg.tile_size, cfg.tile_overlap, {f"tile_{cfg.tile_size}": need})
    best, _ = largest_fitting_tile(model, params, batch, budget, longest, cfg.tile_overlap, limit=cfg.tile_size)
    raise ConfigError(f"config.eval.tile_size={cfg.tile_size}: its step needs {gb(need)} on a device, more than "
                      f"config.eval.memory_budget_gb={cfg.memory_budget_gb}; "
                      + (f"tiles up to {best} fit" if best else "no tile size fits"))
  whole = whole_bytes()
  if whole <= budget:
    return TileChoice(0, cfg.tile_overlap, {"whole": whole})
  best, measured = largest_fitting_tile(model, params, batch, budget, longest, cfg.tile_overlap)
  if best is None:
    raise ConfigError(f"config.eval.memory_budget_gb={cfg.memory_budget_gb}: even {TILE_SIZES[0]}-pixel tiles need "
                      f"{gb(measured[TILE_SIZES[0]])} on a device; expected a budget of at least that")
  overlap = min(cfg.tile_overlap, best // 2)
  return TileChoice(best, overlap, {"whole": whole, **{f"tile_{t}": n for t, n in measured.items()}})


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
