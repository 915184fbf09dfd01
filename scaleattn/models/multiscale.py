"""The share-net: one backbone applied to every rescaled copy of the image, its outputs fused over scales.

`MultiScaleNet` takes the backbone and the fusion as modules (`registry.build_model` makes them from the config):
any backbone mapping (images [B, H, W, 3], train, valid_size) to (scores, features) at output stride 8, and any
fusion mapping (scores [B, h, w, S, C], per-scale features, train, scales) to (fused scores, weights [B, h, w, S])
(tiled inference also passes `to_grid`, as `ScaleFusion` takes it). `fusion_input` says what the fusion is handed
as features: the backbone's ('features': fc7 for DeepLab-LargeFOV, the paper's) or every scale's own scores
('scores': fc8, the paper's ablation).

Two ways to run the scales, chosen by `scale_execution`, with the same parameters and the same results:
'loop' runs each scale at its own size through the one backbone; 'vmap' pads every scale onto the scale-1
canvas and runs one vmapped backbone that confines each scale to its valid region (exact, but every scale then
costs as much as scale 1).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from scaleattn.models import resize

SCALE_EXECUTIONS = ("loop", "vmap")
# Rematerialisation of the backbone in the backward pass: 'per_scale' keeps only each scale's input and recomputes
# the whole backbone pass; 'per_block' also keeps every block's output (the names the backbone's `remat_names`
# declares).
REMAT_POLICIES = ("none", "per_scale", "per_block")
FUSION_INPUTS = ("features", "scores")  # what the fusion's head reads


def remat_policy(name: str, backbone: nn.Module) -> Callable | None:
  """The jax.checkpoint policy of rematerialisation `name` for `backbone`."""
  return {"none": None, "per_scale": jax.checkpoint_policies.nothing_saveable,
          "per_block": jax.checkpoint_policies.save_only_these_names(*backbone.remat_names)}[name]


@flax.struct.dataclass
class MultiScaleOutput:
  """The share-net's outputs; `scales` (static) names the S axis."""
  fused: jax.Array  # [B, h, w, C] on the scale-1 output grid
  per_scale: jax.Array  # [B, h, w, S, C], every scale's scores resized to the scale-1 grid
  weights: jax.Array  # [B, h, w, S] fusion weights
  own_grid: tuple[jax.Array, ...]  # [B, h_s, w_s, C], each scale's scores on its own output grid
  scales: tuple[float, ...] = flax.struct.field(pytree_node=False, default=())


class MultiScaleNet(nn.Module):
  """`backbone` shared by all `scales` (1.0 must be among them: it sets the output grid), then `fusion`.

  Parameters: {'backbone': ..., 'fusion': ...} (a fusion without parameters adds none). With one scale there is
  nothing to fuse and `fusion` may be None: fused = that scale's scores, weights = 1. The fields have no defaults:
  the recipe's values are config.model's (`scaleattn.config.defaults`), and `registry.build_model` passes them.
  """
  backbone: nn.Module
  fusion: nn.Module | None
  scales: Sequence[float]
  scale_execution: str  # one of SCALE_EXECUTIONS
  input_scale: float
  remat: str  # one of REMAT_POLICIES
  fusion_input: str  # one of FUSION_INPUTS

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> MultiScaleOutput:
    """images [B, H, W, 3] (mean-subtracted, then multiplied by input_scale) -> MultiScaleOutput; dropout uses the
    'dropout' rng when training."""
    scales = tuple(float(s) for s in self.scales)
    if 1.0 not in scales or len(set(scales)) != len(scales):
      raise ValueError(f"MultiScaleNet.scales={scales}: expected distinct scales, 1.0 among them (it sets the "
                       "output grid)")
    if self.scale_execution not in SCALE_EXECUTIONS:
      raise ValueError(f"MultiScaleNet.scale_execution={self.scale_execution!r}: expected one of {SCALE_EXECUTIONS}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"MultiScaleNet.remat={self.remat!r}: expected one of {tuple(REMAT_POLICIES)}")
    if len(scales) > 1 and self.fusion is None:
      raise ValueError(f"MultiScaleNet.scales={scales}: several scales need a fusion module")
    inputs = self.scale_inputs(images)
    height, width = images.shape[1:3]
    sizes = [x.shape[1:3] for x in inputs]

    def run_backbone(module: nn.Module, x: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
      return module(x, train=train, valid_size=valid)

    if self.remat != "none":
      run_backbone = nn.remat(run_backbone, policy=remat_policy(self.remat, self.backbone))
    if self.scale_execution == "loop":
      outs = [run_backbone(self.backbone, x, None) for x in inputs]
    else:
      if not self.backbone.supports_valid_size:
        raise ValueError(f"MultiScaleNet: scale_execution='vmap' needs a backbone that confines itself to each "
                         f"scale's valid region; {type(self.backbone).__name__} does not; use 'loop'")
      if max(scales) > 1.0:
        raise ValueError(f"MultiScaleNet.scales={scales}: scale_execution='vmap' pads onto the scale-1 canvas, so "
                         "it needs every scale <= 1; use 'loop'")
      canvas = jnp.stack([jnp.pad(x, ((0, 0), (0, height - x.shape[1]), (0, width - x.shape[2]), (0, 0)))
                          for x in inputs])  # [S, B, H, W, 3], zeros outside each scale
      shared = ("params", *self.backbone.state_collections)  # one backbone, with its state, for every scale
      run = nn.vmap(run_backbone, in_axes=(0, 0), out_axes=0, variable_axes=dict.fromkeys(shared),
                    split_rngs={"params": False, "dropout": True})
      all_scores, all_feats = run(self.backbone, canvas, jnp.asarray(sizes, jnp.int32))
      out_sizes = [(self.backbone.output_size(h), self.backbone.output_size(w)) for h, w in sizes]
      outs = [(all_scores[i, :, :h, :w], all_feats[i, :, :h, :w]) for i, (h, w) in enumerate(out_sizes)]
    return self.fuse(outs, train=train)

  def scale_inputs(self, images: jax.Array) -> list[jax.Array]:
    """The backbone's input at every scale: images times input_scale, resized (align corners) by each scale."""
    images = images * self.input_scale if self.input_scale != 1.0 else images
    height, width = images.shape[1:3]
    return [resize.resize_bilinear(images, (resize.scaled_size(height, s), resize.scaled_size(width, s)))
            for s in self.scales]

  def fuse(self, outs: Sequence[tuple[jax.Array, jax.Array]], *, train: bool, grid: tuple[int, int] | None = None,
           to_grid: Sequence[Callable[[jax.Array], jax.Array]] | None = None) -> MultiScaleOutput:
    """Every scale's (scores, features) on its own output grid -> the output on the common grid: scale 1's output
    grid, or `grid` with `to_grid` (per scale, how its maps are brought there; tiled inference fuses window by
    window with the slices of the resizes that land in each)."""
    scales = tuple(float(s) for s in self.scales)
    grid = outs[scales.index(1.0)][0].shape[1:3] if grid is None else grid
    bring = [resize.resizer(grid)] * len(outs) if to_grid is None else to_grid
    per_scale = jnp.stack([b(scores) for b, (scores, _) in zip(bring, outs, strict=True)], axis=3)
    own_grid = tuple(scores for scores, _ in outs)
    if len(scales) == 1:  # the single-scale baseline is plain DeepLab-LargeFOV: nothing to fuse
      return MultiScaleOutput(fused=per_scale[:, :, :, 0], per_scale=per_scale, weights=jnp.ones(
          per_scale.shape[:4], per_scale.dtype), own_grid=own_grid, scales=scales)
    if self.fusion_input not in FUSION_INPUTS:
      raise ValueError(f"MultiScaleNet.fusion_input={self.fusion_input!r}: expected one of {FUSION_INPUTS}")
    maps = [scores if self.fusion_input == "scores" else feats for scores, feats in outs]
    fused, weights = self.fusion(per_scale, maps, train=train, scales=scales,
                                 **({} if to_grid is None else {"to_grid": to_grid}))
    return MultiScaleOutput(fused=fused, per_scale=per_scale, weights=weights, own_grid=own_grid, scales=scales)
