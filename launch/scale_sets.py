"""Trained on two scales, run on others: the paper's attention, one attention head shared by all scales, Tao et al.'s
hierarchical attention and average pooling on `scale_shapes`.

  PYTHONPATH=. python launch/scale_sets.py    # 4 methods x 3 seeds, each run then evaluated on 4 scale sets

Every run trains on scales (1, 0.5) with extra supervision from `--config` (default `configs/shapes.py:ablation`,
the Table-1 grid's settings) and is evaluated on the test split at each `--eval_sets` entry (the paper's attention
only on its training set: its head has one output per trained scale). Runs live in WORKDIR/<method>/seed_<k>; a
finished run or evaluation is never redone, so an interrupted invocation continues where it stopped.

Writes to `--results`: scale_sets.json (per method and set: test mIoU per seed, mean and standard deviation, the
change from the training set paired by seed, model GFLOPs per image, attention and accuracy per object-size bin),
scale_sets.md and scale_sets.png (mean weight of each scale per object size, per method, on two sets).
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from launch import grid_runs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/shapes.py:ablation", "Config of every run; runs override "
                                "model.scales, model.fusion.name, loss.extra_supervision and seed.", lock_config=False)
flags.DEFINE_list("methods", ["attention", "shared_attention", "hierarchical", "average"], "Fusion methods.")
flags.DEFINE_list("eval_sets", ["1-0.5", "1-0.75-0.5", "1-0.75-0.5-0.25", "1.5-1-0.5"],
                  "Inference scale sets, scales joined by '-'.")
flags.DEFINE_string("train_scales", "1-0.5", "The training scale set.")
flags.DEFINE_integer("seeds", 3, "Seeds per method (0..n-1).")
flags.DEFINE_integer("workers", 2, "Parallel runs, each pinned to one CPU core (1: no pinning).")
flags.DEFINE_string("workdir", "workdirs/scale_sets", "Where the runs live.")
flags.DEFINE_string("results", "launch/results", "Where the table, JSON and figure go.")


def parse_scales(text: str) -> tuple[float, ...]:
  return tuple(float(s) for s in text.split("-"))


def run_config(base: ml_collections.ConfigDict, method: str, scales: tuple[float, ...], seed: int
               ) -> ml_collections.ConfigDict:
  config = base.copy_and_resolve_references()
  config.seed = seed
  config.model.scales = scales
  config.model.fusion.name = method
  config.loss.extra_supervision = True
  return config


def evaluable(method: str, train_key: str, key: str) -> bool:
  from scaleattn.models.fusion import SCALE_AGNOSTIC  # noqa: PLC0415 - JAX starts in the workers
  return method in SCALE_AGNOSTIC or key == train_key


def train_and_test(config: ml_collections.ConfigDict, workdir: str, eval_sets: dict[str, tuple[float, ...]]
                   ) -> dict[str, dict]:
  """One run trained (or reused), then its test-split results on every inference set it can run."""
  from scaleattn.evaluation import segmentation  # noqa: PLC0415 - JAX starts after the worker is pinned

  grid_runs.run_cell(config, workdir)
  results = {}
  for key, scales in eval_sets.items():
    def compute(scales=scales) -> dict:
      test_config = grid_runs.test_only(config)
      test_config.eval.scales = scales
      return segmentation.evaluate(test_config, workdir)["test"]
    results[key] = grid_runs.cached_json(os.path.join(workdir, f"test_scales_{key}.json"), compute)
  return results


def gflops(config: ml_collections.ConfigDict, scales: tuple[float, ...]) -> float:
  """Model GFLOPs of one forward pass on an eval_size x eval_size image at these scales."""
  from scaleattn.perf import flops  # noqa: PLC0415

  model = config.model.copy_and_resolve_references()
  model.scales = scales
  size = config.input.eval_size
  return flops.step_flops(model, 1, size, size, train=False) / 1e9


def aggregate(runs: dict[tuple[str, int], dict[str, dict]], configs: dict[str, ml_collections.ConfigDict],
              eval_sets: dict[str, tuple[float, ...]], train_key: str) -> dict:
  """Per method and inference set: mIoU over seeds, the paired change from the training set, GFLOPs, and the
  per-size statistics averaged over seeds."""
  out = {}
  for method, config in configs.items():
    seeds = sorted(seed for m, seed in runs if m == method)
    base = [runs[(method, s)][train_key]["miou"] for s in seeds]
    out[method] = {}
    for key, scales in eval_sets.items():
      if key not in runs[(method, seeds[0])]:
        continue
      tests = [runs[(method, s)][key] for s in seeds]
      mious = [t["miou"] for t in tests]
      mean, std = grid_runs.mean_std(mious)
      change, change_std = grid_runs.mean_std([m - b for m, b in zip(mious, base, strict=True)])
      out[method][key] = {
          "scales": list(scales), "seeds": len(seeds), "test_miou_per_seed": mious, "test_miou_mean": mean,
          "test_miou_std": std, "change_from_training_set_mean": change, "change_from_training_set_std": change_std,
          "gflops_per_image": gflops(config, scales),
          "by_size": {k: grid_runs.mean_of_finite([t[k] for t in tests]) for k in tests[0]
                      if k.startswith(("attention/", "accuracy/", "pixels/"))}}
  return out


def markdown(summary: dict, info: dict) -> str:
  sets = list(info["eval_sets"])
  lines = [f"# Trained on scales {info['train_scales']}, evaluated on other scale sets (scale_shapes test split)", "",
           f"{info['steps']} training steps per run, extra supervision on, {info['seeds']} seeds per method. "
           f"Machine: {info['machine']}. Commit {info['commit']}. Wall time of the invocation that wrote this "
           f"{info['wall_minutes']:.0f} min ({info['workers']} parallel runs, finished runs reused).", "",
           "Test mIoU % (mean ± std over seeds); in brackets the change from the training set, paired by seed "
           "(mean ± std). '-' : the method cannot run on that set.", "",
           "| method | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
  for method, by_set in summary.items():
    cells = []
    for key in sets:
      if key not in by_set:
        cells.append("-")
        continue
      r = by_set[key]
      cell = f"{100 * r['test_miou_mean']:.1f} ± {100 * r['test_miou_std']:.1f}"
      if key != info["train_key"]:
        cell += f" ({100 * r['change_from_training_set_mean']:+.1f} ± {100 * r['change_from_training_set_std']:.1f})"
      cells.append(cell)
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  lines += ["", "Model GFLOPs per image (forward, one image of eval_size):", "",
            "| method | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
  for method, by_set in summary.items():
    lines.append(f"| {method} | " + " | ".join(f"{by_set[k]['gflops_per_image']:.3f}" if k in by_set else "-"
                                              for k in sets) + " |")
  return "\n".join(lines) + "\n"


def plot(summary: dict, shown_sets: list[str], path: str) -> None:
  """Mean weight of each scale per object-size bin: one column per method, one row per inference set."""
  from matplotlib.figure import Figure  # noqa: PLC0415

  methods = [m for m in summary if m != "average"]
  fig = Figure(figsize=(4.6 * len(methods), 3.4 * len(shown_sets)), layout="constrained")
  axes = fig.subplots(len(shown_sets), len(methods), squeeze=False)
  for i, key in enumerate(shown_sets):
    for j, method in enumerate(methods):
      ax = axes[i, j]
      ax.set_ylim(0, 1)
      if key not in summary[method]:
        ax.set_axis_off()
        ax.set_title(f"{method} on {key}: cannot run", fontsize="small")
        continue
      r = summary[method][key]
      bins = [k.split("/")[1] for k in r["by_size"] if k.startswith("pixels/")]
      x = np.arange(len(bins))
      for s in r["scales"]:
        ax.plot(x, [r["by_size"][f"attention/{b}/scale_{s:g}"] for b in bins], "o-", label=f"scale {s:g}")
      ax.set_xticks(x, [b.replace("size_", "") for b in bins], rotation=30)
      ax.set_title(f"{method} on scales {key}", fontsize="small")
      ax.set_ylabel("mean weight")
      ax.legend(fontsize="x-small")
  fig.savefig(path, dpi=85)


def main(argv):
  del argv
  start = time.perf_counter()
  base = FLAGS.config
  train_key = FLAGS.train_scales
  eval_sets = {key: parse_scales(key) for key in FLAGS.eval_sets}
  if train_key not in eval_sets:
    raise app.UsageError(f"--eval_sets={FLAGS.eval_sets}: expected the training set {train_key} among them")
  from scaleattn.data import input_pipeline  # noqa: PLC0415
  input_pipeline.prepare(base.dataset)  # once, before the workers start
  configs = {m: run_config(base, m, parse_scales(train_key), 0) for m in FLAGS.methods}
  jobs = [(m, seed) for seed in range(FLAGS.seeds) for m in FLAGS.methods]  # seed-major
  results = grid_runs.run_pool(
      [(train_and_test, (run_config(base, m, parse_scales(train_key), seed),
                         os.path.join(FLAGS.workdir, m, f"seed_{seed}"),
                         {k: v for k, v in eval_sets.items() if evaluable(m, train_key, k)})) for m, seed in jobs],
      FLAGS.workers)
  runs = dict(zip(jobs, results, strict=True))
  for (method, seed), by_set in runs.items():
    logging.info("%s seed %d: %s", method, seed, {k: round(v["miou"], 4) for k, v in by_set.items()})
  summary = aggregate(runs, configs, eval_sets, train_key)
  info = {"command": " ".join(["PYTHONPATH=. python launch/scale_sets.py", *sys.argv[1:]]),
          "machine": grid_runs.machine(), "commit": grid_runs.commit(), "workers": FLAGS.workers,
          "seeds": FLAGS.seeds, "steps": base.train.num_steps, "train_scales": train_key, "train_key": train_key,
          "eval_sets": list(eval_sets), "wall_minutes": (time.perf_counter() - start) / 60}
  os.makedirs(FLAGS.results, exist_ok=True)
  with open(os.path.join(FLAGS.results, "scale_sets.json"), "w") as f:
    json.dump({**info, "config": json.loads(base.to_json_best_effort()), "methods": summary}, f, indent=1)
  with open(os.path.join(FLAGS.results, "scale_sets.md"), "w") as f:
    f.write(markdown(summary, info))
  largest = max(eval_sets, key=lambda k: len(eval_sets[k]))
  plot(summary, [train_key, largest], os.path.join(FLAGS.results, "scale_sets.png"))


if __name__ == "__main__":
  app.run(main)
