"""Losses: pixel softmax cross-entropy with an ignore label, and the multi-scale extra supervision (E-Supv).

All pure and jittable; logits of any float dtype are reduced in float32.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from scaleattn.data.preprocessing import IGNORE_LABEL
from scaleattn.models import MultiScaleOutput
from scaleattn.models.resize import nearest_indices

PER_SCALE_GRIDS = ("authors", "output", "native")
AUTHORS_OWN_GRID_BELOW = 0.75  # 'authors': scales below this are supervised on their own grid (0.5 at 21x21)


@functools.partial(jax.jit, static_argnums=1)
def downsample_labels(labels: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """labels [B, H, W] -> [B, h, w]: the label nearest to each align-corners position of the output grid
  (321 -> 41 picks rows and columns 0, 8, ..., 320; 321 -> 21 picks 0, 16, ..., 320)."""
  rows = nearest_indices(out_hw[0], labels.shape[1])
  cols = nearest_indices(out_hw[1], labels.shape[2])
  return labels[:, rows][:, :, cols]


def valid_pixels(labels: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """How many pixels of `labels` [B, H, W] sampled on the out_hw grid are not IGNORE_LABEL."""
  return jnp.sum(downsample_labels(labels, out_hw) != IGNORE_LABEL)


@jax.jit
def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, count: jax.Array | None = None) -> jax.Array:
  """Softmax cross-entropy of logits [B, h, w, C] summed over the pixels of labels [B, h, w] that are not
  IGNORE_LABEL, divided by `count` (default: those pixels' number); 0 (with zero gradient) when there are none.

  An explicit `count` is the whole batch's: slices of a batch then sum to the loss of the batch."""
  valid = labels != IGNORE_LABEL
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  count = jnp.sum(valid) if count is None else count
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)


def term_names(cfg: ml_collections.ConfigDict, scales: Sequence[float]) -> tuple[str, ...]:
  """Names of the loss terms: 'fused', then with extra supervision over 2+ scales 'scale_1', 'scale_0.75', ...
  (with one scale its own loss is the fused loss, so there is nothing extra to supervise)."""
  per_scale = tuple(f"scale_{s:g}" for s in scales) if cfg.extra_supervision and len(scales) > 1 else ()
  return ("fused",) + per_scale


def term_logits(output: MultiScaleOutput, cfg: ml_collections.ConfigDict, scales: Sequence[float] | None = None
                ) -> dict[str, jax.Array]:
  """The score map each loss term is taken on, by term name. A scale's own term uses its scores resized to the
  scale-1 grid ('output'), its own grid ('native'), or, as the authors' configs, the scale-1 grid for scales of
  0.75 and up and its own grid below ('authors')."""
  scales = tuple(output.scales if scales is None else scales)
  num_scales = output.per_scale.shape[3]
  if len(scales) != num_scales:
    raise ValueError(f"losses: scales={scales} do not name the {num_scales} scales of the output")
  if cfg.per_scale_grid not in PER_SCALE_GRIDS:
    raise ValueError(f"config.loss.per_scale_grid={cfg.per_scale_grid!r}: expected one of {PER_SCALE_GRIDS}")
  logits = {"fused": output.fused}
  for i, name in enumerate(term_names(cfg, scales)[1:]):
    own = cfg.per_scale_grid == "native" or (cfg.per_scale_grid == "authors" and scales[i] < AUTHORS_OWN_GRID_BELOW)
    logits[name] = output.own_grid[i] if own else output.per_scale[:, :, :, i]
  return logits


def multiscale_loss(output: MultiScaleOutput, labels: jax.Array, cfg: ml_collections.ConfigDict,
                    scales: Sequence[float] | None = None, pixel_counts: Mapping[str, jax.Array] | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """loss(fused) + sum_s w_s * loss(scale s) with `config.loss` fields; returns (total, terms by name).

  Terms are `term_logits` against labels sampled on each term's grid; the per-scale ones are weighted by
  scale_weights (None = 1 each). scales: the scales along the S axis (default: output.scales). pixel_counts: per
  term, the valid pixels of the whole batch when `labels` is one slice of it (gradient accumulation).
  """
  logits = term_logits(output, cfg, scales)
  num_scales = output.per_scale.shape[3]
  weights = (1.0,) * num_scales if cfg.scale_weights is None else tuple(cfg.scale_weights)
  if len(weights) != num_scales:
    raise ValueError(f"config.loss.scale_weights={weights}: expected one weight per scale ({num_scales})")
  terms = {name: pixel_cross_entropy(x, downsample_labels(labels, x.shape[1:3]),
                                     None if pixel_counts is None else pixel_counts[name])
           for name, x in logits.items()}
  total = terms["fused"]
  for w, name in zip(weights, list(terms)[1:], strict=False):
    total = total + w * terms[name]
  return total, terms
