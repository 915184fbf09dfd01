"""Losses: pixel softmax cross-entropy with an ignore label, and the multi-scale extra supervision."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from scaleattn.models import MultiScaleOutput
from scaleattn.models.resize import nearest_indices


@functools.partial(jax.jit, static_argnums=1)
def downsample_labels(labels: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Nearest labels at align-corners positions of the output grid (321 -> 41 picks rows 0, 8, ..., 320)."""
  rows = nearest_indices(out_hw[0], labels.shape[1])
  cols = nearest_indices(out_hw[1], labels.shape[2])
  return labels[:, rows][:, :, cols]


@functools.partial(jax.jit, static_argnames="ignore_label")
def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int = 255) -> jax.Array:
  """Mean softmax cross-entropy over pixels whose label is not `ignore_label`; 0 when there are none."""
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def multiscale_loss(output: MultiScaleOutput, labels: jax.Array, cfg: ml_collections.ConfigDict,
                    scales: Sequence[float]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """loss(fused) + sum_s w_s * loss(scale s) (extra supervision; w_s from config, default 1), and the terms
  by name ('fused', 'scale_1', 'scale_0.5', ...). Per-scale losses use the scale-1 output grid ('output') or each scale's native grid ('native').
  """
  grid = output.fused.shape[1:3]
  ignore = cfg.ignore_label
  terms = {"fused": pixel_cross_entropy(output.fused, downsample_labels(labels, grid), ignore)}
  total = terms["fused"]
  if cfg.extra_supervision:
    weights = cfg.scale_weights or (1.0,) * len(scales)
    for i, name in enumerate(f"scale_{s:g}" for s in scales):
      logits = output.per_scale[:, :, :, i] if cfg.per_scale_grid == "output" else output.native[i]
      terms[name] = pixel_cross_entropy(logits, downsample_labels(labels, logits.shape[1:3]), ignore)
      total = total + weights[i] * terms[name]
  return total, terms
