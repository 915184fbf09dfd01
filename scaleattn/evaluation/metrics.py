"""Segmentation metrics: a mergeable confusion matrix (mIoU, per-class IoU, pixel accuracy) and per-object-size
attention statistics.

Everything accumulated on device is a sum of integer or float arrays, so partial results merge by addition across
batches, devices and hosts; the final ratios are taken once, on the host, in float64.
"""
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _check_num_classes(num_classes: Any) -> int:
  if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"metrics: num_classes must be a positive int, got {num_classes!r}")
  return int(num_classes)


@functools.partial(jax.jit, static_argnames="num_classes")
def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int, mask: jax.Array | None = None) -> jax.Array:
  """int32 [C, C] pixel counts, rows = ground truth, columns = prediction.

  Pixels whose label lies outside 0..C-1 (255 = void), whose prediction lies outside 0..C-1, or where `mask` is
  False are not counted. A bincount of `label * C + pred` (a scatter-add), cheaper than one-hot matmuls. Counts are
  int32: one cell overflows past 2**31 pixels.
  """
  c = _check_num_classes(num_classes)
  if pred.shape != label.shape:
    raise ValueError(f"confusion_matrix: pred shape {pred.shape} != label shape {label.shape}")
  if mask is not None and mask.shape != label.shape:
    raise ValueError(f"confusion_matrix: mask shape {mask.shape} != label shape {label.shape}")
  pred, label = pred.astype(jnp.int32), label.astype(jnp.int32)  # uint8 labels would overflow label * C.
  valid = (label >= 0) & (label < c) & (pred >= 0) & (pred < c)
  if mask is not None:
    valid &= mask.astype(bool)
  index = jnp.where(valid, label * c + pred, 0).ravel()
  counts = jnp.bincount(index, weights=valid.ravel().astype(jnp.int32), length=c * c)
  return counts.reshape(c, c)


def compute_iou(matrix: Any) -> dict[str, Any]:
  """{'miou', 'pixel_accuracy', 'iou' (float64 [C])} from a confusion matrix (rows = ground truth).

  IoU_c = TP / (GT_c + Pred_c - TP): NaN for a class neither present nor predicted (left out of the mean), 0 for a
  class predicted but absent from the ground truth. mIoU and pixel accuracy are NaN when nothing was counted.
  """
  m = np.asarray(matrix, np.float64)
  if m.ndim != 2 or m.shape[0] != m.shape[1]:
    raise ValueError(f"compute_iou: expected a square [C, C] confusion matrix, got shape {m.shape} (a matrix "
                     "still stacked over devices must be summed or reduced first)")
  tp = np.diag(m)
  union = m.sum(0) + m.sum(1) - tp
  iou = np.full(len(tp), np.nan)
  np.divide(tp, union, out=iou, where=union > 0)
  total = m.sum()
  return {"miou": float(iou[union > 0].mean()) if (union > 0).any() else float("nan"),
          "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
          "iou": iou}


def summarize(result: dict[str, Any], class_names: Sequence[str]) -> dict[str, float]:
  """Scalars for metric writers: 'miou', 'pixel_accuracy' and 'iou/<class name>'."""
  iou = np.asarray(result["iou"])
  if len(class_names) != len(iou):
    raise ValueError(f"summarize: {len(class_names)} class names for {len(iou)} IoU values")
  out = {"miou": float(result["miou"]), "pixel_accuracy": float(result["pixel_accuracy"])}
  out.update({f"iou/{name}": float(v) for name, v in zip(class_names, iou, strict=True)})
  return out


def _check_bins(bins: Sequence[float]) -> tuple[float, ...]:
  edges = tuple(float(b) for b in bins)
  if not edges or edges[0] <= 0 or any(a >= b for a, b in zip(edges, edges[1:], strict=False)):
    raise ValueError(f"size bins must be positive and strictly increasing edges, got {tuple(bins)!r}")
  return edges


def size_bin_names(bins: Sequence[float]) -> tuple[str, ...]:
  """Names of the len(bins) + 2 bins of `sum_by_size`: 'background', 'size_0-16', ..., 'size_128+'."""
  edges = _check_bins(bins)
  lows = (0.0,) + edges
  return ("background",) + tuple(f"size_{lo:g}-{hi:g}" for lo, hi in zip(lows, edges, strict=False)) + (
      f"size_{edges[-1]:g}+",)


@functools.partial(jax.jit, static_argnames="bins")
def sum_by_size(values: jax.Array, instance_size: jax.Array, bins: tuple[float, ...]) -> tuple[jax.Array, jax.Array]:
  """Per-pixel values [..., K] (fusion weights, correct-prediction indicators) summed per object-size bin:
  (float32 [len(bins)+2, K], pixel counts int32 [len(bins)+2]).

  Bin 0 is background (size 0); bin 1 + i holds sizes in [edge_{i-1}, edge_i) (edge_{-1} = 0, exclusive), the last
  sizes >= bins[-1]. Pixels with a negative size (padding, ignored labels) are not counted. Both outputs merge by
  addition.
  """
  edges = _check_bins(bins)
  if values.ndim != instance_size.ndim + 1 or values.shape[:-1] != instance_size.shape:
    raise ValueError(f"sum_by_size: values {values.shape} must be instance_size {instance_size.shape} + [K]")
  size = instance_size.astype(jnp.float32).ravel()
  valid = size >= 0
  index = jnp.where(size > 0, 1 + jnp.sum(size[:, None] >= jnp.asarray(edges, jnp.float32), axis=-1), 0)
  index = jnp.where(valid, index, 0)
  num_bins = len(edges) + 2
  v = jnp.where(valid[:, None], values.reshape(size.shape[0], -1).astype(jnp.float32), 0.0)
  sums = jax.ops.segment_sum(v, index, num_segments=num_bins)
  count = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_bins)
  return sums, count


def summarize_by_size(sums: Any, pixel_count: Any, prefix: str, columns: Sequence[str],
                      bins: Sequence[float]) -> dict[str, float]:
  """Scalars '<prefix>/<bin>/<column>' (the column's mean over the bin's pixels; NaN for an empty bin) and
  'pixels/<bin>', from `sum_by_size` totals."""
  names = size_bin_names(bins)
  sums, pixel_count = np.asarray(sums, np.float64), np.asarray(pixel_count, np.float64)
  if sums.shape != (len(names), len(columns)) or pixel_count.shape != (len(names),):
    raise ValueError(f"summarize_by_size: expected sums [{len(names)}, {len(columns)}] and pixel_count "
                     f"[{len(names)}] for bins {tuple(bins)} and columns {tuple(columns)}, got {sums.shape} "
                     f"and {pixel_count.shape}")
  out = {}
  for name, row, count in zip(names, sums, pixel_count, strict=True):
    out[f"pixels/{name}"] = float(count)
    for column, total in zip(columns, row, strict=True):
      out[f"{prefix}/{name}/{column}"] = float(total / count) if count else float("nan")
  return out
