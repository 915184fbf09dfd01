"""Losses: pixel softmax cross-entropy with an ignore label, and the multi-scale extra supervision (E-Supv).

All pure and jittable; logits of any float dtype are reduced in float32.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from scaleattn.models import MultiScaleOutput
from scaleattn.models.resize import nearest_indices

PER_SCALE_GRIDS = ("output", "native")


@functools.partial(jax.jit, static_argnums=1)
def downsample_labels(labels: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """labels [B, H, W] -> [B, h, w]: the label nearest to each align-corners position of the output grid
  (321 -> 41 picks rows and columns 0, 8, ..., 320; 321 -> 21 picks 0, 16, ..., 320)."""
  rows = nearest_indices(out_hw[0], labels.shape[1])
  cols = nearest_indices(out_hw[1], labels.shape[2])
  return labels[:, rows][:, :, cols]


@functools.partial(jax.jit, static_argnames="ignore_label")
def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int = 255) -> jax.Array:
  """Mean softmax cross-entropy of logits [B, h, w, C] over the pixels of labels [B, h, w] that are not
  `ignore_label`; 0 (with zero gradient) when there are none."""
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def term_names(cfg: ml_collections.ConfigDict, scales: Sequence[float]) -> tuple[str, ...]:
  """Names of the loss terms: 'fused', then with extra supervision over 2+ scales 'scale_1', 'scale_0.75', ...
  (with one scale its own loss is the fused loss, so there is nothing extra to supervise)."""
  per_scale = tuple(f"scale_{s:g}" for s in scales) if cfg.extra_supervision and len(scales) > 1 else ()
  return ("fused",) + per_scale


def multiscale_loss(output: MultiScaleOutput, labels: jax.Array, cfg: ml_collections.ConfigDict,
                    scales: Sequence[float] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """loss(fused) + sum_s w_s * loss(scale s) with `config.loss` fields; returns (total, terms by name).

  Terms are term_names(cfg, scales); the per-scale ones are weighted by scale_weights (None = 1 each). per_scale_grid 'output': each scale's scores resized to the scale-1 grid
  (output.per_scale); 'native': each scale's own score map against labels sampled on its grid.
  scales: the scales along the S axis; defaults to output.scales (MultiScaleNet fills it in).
  """
  scales = tuple(output.scales if scales is None else scales)
  num_scales = output.per_scale.shape[3]
  if len(scales) != num_scales:
    raise ValueError(f"multiscale_loss: scales={scales} do not name the {num_scales} scales of the output")
  if cfg.per_scale_grid not in PER_SCALE_GRIDS:
    raise ValueError(f"config.loss.per_scale_grid={cfg.per_scale_grid!r}: expected one of {PER_SCALE_GRIDS}")
  weights = (1.0,) * num_scales if cfg.scale_weights is None else tuple(cfg.scale_weights)
  if len(weights) != num_scales:
    raise ValueError(f"config.loss.scale_weights={weights}: expected one weight per scale ({num_scales})")

  def loss(logits: jax.Array) -> jax.Array:
    return pixel_cross_entropy(logits, downsample_labels(labels, logits.shape[1:3]), cfg.ignore_label)

  terms = {"fused": loss(output.fused)}
  total = terms["fused"]
  for i, name in enumerate(term_names(cfg, scales)[1:]):
    terms[name] = loss(output.per_scale[:, :, :, i] if cfg.per_scale_grid == "output" else output.native[i])
    total = total + weights[i] * terms[name]
  return total, terms
