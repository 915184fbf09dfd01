"""Sliding-window (tiled) multi-scale inference, for images too large to run whole in the memory at hand.

The scales run one after another. Each scale's input (the image resized as `MultiScaleNet.scale_inputs` does) is
cut into `tile` x `tile` tiles at offsets that are multiples of the output stride, so that every tile's output grid
is a window of the whole input's; the backbone runs on one tile position at a time in a single jitted step of
fixed shape, confined to the input's pixels (`valid_size`: a tile reaching past the input's edge computes what the
input alone gives there). Every output cell takes its value from the tile whose centre it is nearest: the
blending weights are 0 or 1 and sum to one at every cell, and a cell whose receptive field lies inside that tile
(or reaches past the input's edge only) gets exactly the whole-input result, so with an overlap of twice the
backbone's receptive-field radius tiled equals whole-input inference. The stitched score and feature maps then go
through the model's own fusion (`MultiScaleNet.fuse`).

Compilation: the backbone's tile step once, whatever the image size; the stitching and fusion, which are small
next to the backbone, once per image size.
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
from jax import lax

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
  radius = receptive_radius(backbone.block_depths, backbone.conv5_dilation, backbone.fc6_dilation)
  return -(-2 * radius // OUTPUT_STRIDE) * OUTPUT_STRIDE


def describe(model_cfg: ml_collections.ConfigDict, tile: int, overlap: int) -> str:
  """The tiling in words, saying whether it is exact (for the LargeFOV backbone, whose receptive field is known)."""
  text = f"{tile}-pixel tiles overlapping by {overlap}"
  if model_cfg.backbone.name != "largefov":
    return text
  exact = exact_overlap(model_cfg.backbone)
  return text + (f" (exact: at least the exact overlap {exact})" if overlap >= exact else
                 f" (below the exact overlap {exact}: cells near inner tile edges differ from whole-image inference)")


def _backbone(model: MultiScaleNet, tiles: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  return model.backbone(tiles, train=False, valid_size=valid)


def _scale_inputs(model: MultiScaleNet, images: jax.Array) -> list[jax.Array]:
  return model.scale_inputs(images)


def _fuse(model: MultiScaleNet, outs: Sequence[tuple[jax.Array, jax.Array]]) -> MultiScaleOutput:
  return model.fuse(outs, train=False)


def _stitch(tiles: Sequence[Sequence[jax.Array]], rows: AxisPlan, cols: AxisPlan) -> jax.Array:
  """One scale's whole output map from its tiles' outputs [B, t, t, ...], each cell from the tile that owns it."""
  bands = []
  for i, (r0, r1) in enumerate(rows.owned):
    fy = rows.starts[i] // OUTPUT_STRIDE
    pieces = []
    for j, (c0, c1) in enumerate(cols.owned):
      fx = cols.starts[j] // OUTPUT_STRIDE
      pieces.append(tiles[i][j][:, r0 - fy:r1 - fy, c0 - fx:c1 - fx])
    bands.append(jnp.concatenate(pieces, axis=2))
  return jnp.concatenate(bands, axis=1)


class TiledForward:
  """Eval-mode forward pass of `model` tile by tile: (params, images [B, H, W, 3]) -> MultiScaleOutput, as
  `model.apply(..., train=False)` gives for the whole images (exactly so with `overlap >= exact_overlap`)."""

  def __init__(self, model: MultiScaleNet, tile: int, overlap: int):
    if tile < OUTPUT_STRIDE or not 0 <= overlap < tile:
      raise ValueError(f"TiledForward: tile={tile}, overlap={overlap}: expected tile >= {OUTPUT_STRIDE} and "
                       "0 <= overlap < tile")
    self.model, self.tile, self.overlap = model, tile, overlap
    self._inputs = jax.jit(functools.partial(model.apply, method=_scale_inputs))
    self._cut = jax.jit(lambda x, y0, x0: lax.dynamic_slice(x, (0, y0, x0, 0), (x.shape[0], tile, tile, x.shape[3])))
    self.tile_step = jax.jit(functools.partial(model.apply, method=_backbone))
    self._fuse = jax.jit(self._stitch_and_fuse, static_argnames="plans")

  def plans(self, height: int, width: int) -> list[tuple[AxisPlan, AxisPlan]]:
    """Per scale, the tiling of that scale's input."""
    return [(plan_axis(resize.scaled_size(height, s), self.tile, self.overlap),
             plan_axis(resize.scaled_size(width, s), self.tile, self.overlap)) for s in self.model.scales]

  def _stitch_and_fuse(self, params: Any, outs: list, plans: tuple) -> MultiScaleOutput:
    stitched = [(_stitch([[o[0] for o in row] for row in tiles], rows, cols),
                 _stitch([[o[1] for o in row] for row in tiles], rows, cols))
                for tiles, (rows, cols) in zip(outs, plans, strict=True)]
    return self.model.apply({"params": params}, stitched, method=_fuse)

  def __call__(self, params: Any, images: jax.Array) -> MultiScaleOutput:
    variables = {"params": params}
    plans = tuple(self.plans(*images.shape[1:3]))
    outs = []
    for x, (rows, cols) in zip(self._inputs(variables, images), plans, strict=True):
      x = jnp.pad(x, ((0, 0), (0, rows.padded - x.shape[1]), (0, cols.padded - x.shape[2]), (0, 0)))
      outs.append([[self.tile_step(variables, self._cut(x, y0, x0), jnp.asarray((vy, vx), jnp.int32))
                    for x0, vx in zip(cols.starts, cols.valid, strict=True)]
                   for y0, vy in zip(rows.starts, rows.valid, strict=True)])
    return self._fuse(params, outs, plans=plans)

  def program_bytes(self, params: Any, batch: int, height: int, width: int) -> dict[str, int]:
    """XLA's buffer assignment of the two programs for `batch` images of height x width, compiled from shapes (not
    run): the tile step (the same for any image size) and the stitching and fusion, whose arguments are every
    tile's outputs (what the tiled pass holds between the two)."""
    plans = tuple(self.plans(height, width))
    variables = {"params": params}
    tiles = jax.ShapeDtypeStruct((batch, self.tile, self.tile, 3), jnp.float32)
    valid = jax.ShapeDtypeStruct((2,), jnp.int32)
    step = self.tile_step.lower(variables, tiles, valid).compile()
    out = jax.eval_shape(self.tile_step, variables, tiles, valid)
    outs = [[[out] * len(cols.starts) for _ in rows.starts] for rows, cols in plans]
    fuse = self._fuse.lower(params, outs, plans=plans).compile()
    return {"tile_step": memory_analysis(step)["total_bytes"], "stitch_and_fuse": memory_analysis(fuse)["total_bytes"]}


def tiled_bytes(model: MultiScaleNet, params: Any, batch: int, tile: int, overlap: int, size: int) -> int:
  """The larger of the tiled pass's two programs on size x size images (`TiledForward.program_bytes`)."""
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
