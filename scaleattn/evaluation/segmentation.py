"""Evaluation: a whole split through the jitted eval step (padded, masked, static shapes), merged statistics
reduced once on the host; and the `--mode=eval` entry point."""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AbstractMesh
from tqdm import tqdm

from scaleattn import checkpointing, sharding
from scaleattn.data import input_pipeline
from scaleattn.data.preprocessing import IGNORE_LABEL
from scaleattn.evaluation import metrics
from scaleattn.experiment import Experiment, build_experiment
from scaleattn.inference import forward
from scaleattn.models import MultiScaleOutput


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, exp: Experiment) -> dict[str, jax.Array]:
  """`eval_statistics` of the whole images' outputs."""
  return eval_statistics(forward.predict_scores(params, batch["image"], exp=exp, flip=exp.config.eval.flip),
                         batch, exp=exp)


def eval_statistics(out: MultiScaleOutput, batch: Mapping[str, jax.Array], *, exp: Experiment
                    ) -> dict[str, jax.Array]:
  """Mergeable statistics of one batch's outputs: the confusion matrix and, where the data has per-pixel object
  sizes, per size bin the fusion weights and the correct pixels of the fused and of every scale's own prediction."""
  cfg = exp.config
  images, label = batch["image"], batch["label"]
  pred = forward.predict_labels(out.fused, images, batch["mask"], exp=exp)
  stats = {"confusion": metrics.confusion_matrix(pred, label, exp.num_classes, mask=batch["mask"])}
  if "instance_size" in batch:
    bins = tuple(cfg.eval.size_bins)
    counted = batch["mask"] & (label != IGNORE_LABEL)
    size_map = jnp.where(counted, batch["instance_size"], -1.0)
    weights = forward.to_input_size(out.weights, images)
    per_scale = jnp.argmax(forward.to_input_size(out.per_scale, images), axis=-1)  # [B, H, W, S]
    correct = jnp.concatenate([pred[..., None], per_scale], axis=-1) == label[..., None]
    stats["weight_sum"], stats["pixel_count"] = metrics.sum_by_size(weights, size_map, bins)
    stats["correct_sum"], _ = metrics.sum_by_size(correct, size_map, bins)
  return stats


def jit_eval_step(exp: Experiment) -> Callable:
  """`eval_step` jitted once (parameters replicated, batch split over the mesh); or, when `forward.plan` tiles
  (config.eval's `tile_size`, or a `memory_budget_gb` the whole images exceed), a plain function running tiled
  inference on each process's rows, then the jitted statistics of the whole batch."""
  repl, data = sharding.replicated(exp.mesh), sharding.data_sharding(exp.mesh)
  cfg = exp.config
  rows = input_pipeline.batch_layout(cfg.eval.batch_size, 1, exp.mesh.size, jax.process_count()).rows
  # An abstract mesh (a program lowered for devices this host lacks) has no devices of its own to tile on.
  local = None if isinstance(exp.mesh, AbstractMesh) else [
      d for d in exp.mesh.devices.flat if d.process_index == jax.process_index()]
  plan = forward.plan(exp, exp.abstract_state.weights, rows=rows // exp.mesh.size, size=cfg.input.eval_size,
                      devices=local)
  if not plan.tile_all:
    return jax.jit(functools.partial(eval_step, exp=exp), in_shardings=(repl, data), out_shardings=repl)
  statistics = jax.jit(functools.partial(eval_statistics, exp=exp), out_shardings=repl)

  def tiled_step(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    out = plan.scores(params, sharding.local_rows(batch["image"]), exp=exp)
    rows = sharding.global_batch(exp.mesh, {"fused": out.fused, "per_scale": out.per_scale, "weights": out.weights})
    return statistics(out.replace(own_grid=(), **rows), batch)
  return tiled_step


def evaluate_split(eval_fn: Callable, params: Any, exp: Experiment, batches: Iterator[Mapping[str, np.ndarray]],
                   num_batches: int, class_names: tuple[str, ...], desc: str = "eval") -> dict[str, Any]:
  """Runs the whole split once and reduces the merged statistics: mIoU, per-class IoU, pixel accuracy and, where
  the data has object sizes, the fusion weights and accuracies by size."""
  totals: dict[str, jax.Array] | None = None
  show = jax.process_index() == 0 and logging.get_verbosity() >= logging.INFO
  for local in tqdm(batches, total=num_batches, desc=desc, disable=not show, mininterval=5):
    stats = eval_fn(params, sharding.global_batch(exp.mesh, local))
    totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
  if totals is None:
    raise ValueError(f"evaluation split {desc!r} produced no batches")
  totals = jax.device_get(totals)
  result = metrics.summarize(metrics.compute_iou(totals["confusion"]), class_names)
  if "weight_sum" in totals:
    scales = tuple(f"scale_{s:g}" for s in exp.eval_scales)
    bins = tuple(exp.config.eval.size_bins)
    result.update(metrics.summarize_by_size(totals["weight_sum"], totals["pixel_count"], "attention", scales, bins))
    result.update(metrics.summarize_by_size(totals["correct_sum"], totals["pixel_count"], "accuracy",
                                            ("fused",) + scales, bins))
  return result


def evaluate(config: ml_collections.ConfigDict, workdir: str, params: Any | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint in `workdir` (or `params`) on the eval split (and test split if set);
  writes `eval_results.json` to the workdir."""
  exp = build_experiment(config)
  data = input_pipeline.create_datasets(config, data_devices=exp.mesh.size)
  if params is None:
    params, _ = checkpointing.restore_weights(exp, workdir)
  else:
    params = jax.device_put(params, sharding.replicated(exp.mesh))
  eval_fn = jit_eval_step(exp)
  results = {}
  for split in filter(None, (config.dataset.eval_split, config.dataset.test_split)):
    result = evaluate_split(eval_fn, params, exp, data.eval_batches(split), data.num_eval_batches(split),
                            data.class_names, desc=split)
    results[split] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
    logging.info("%s: mIoU %.4f, pixel accuracy %.4f", split, result["miou"], result["pixel_accuracy"])
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results
