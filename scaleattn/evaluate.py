"""Evaluation: a whole split through the jitted eval step (padded, masked, static shapes), merged statistics
reduced once on the host; and the `--mode=eval` entry point."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from scaleattn import checkpointing, input_pipeline, metrics, sharding, steps
from scaleattn.state import Experiment, build_experiment


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
    params, _ = checkpointing.restore_params(workdir, config.train, exp.abstract_state)
  else:
    params = jax.device_put(params, sharding.replicated(exp.mesh))
  eval_fn = steps.jit_eval_step(exp)
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
