"""The paper's Table 1 grid on `scale_shapes`, with what the attention learned.

  PYTHONPATH=. python launch/ablation.py              # 13 cells x 3 seeds (about 2 hours on 2 CPU cores)
  PYTHONPATH=. python launch/ablation.py --reduced    # 1 seed, scales {1, 0.5}: 7 runs (about 20 minutes)

Cells: the single-scale baseline, then scales {1, 0.5} and {1, 0.75, 0.5} x fusion {max, average, attention} x
{without, with} extra supervision, each trained from `--config` (default `configs/shapes.py:ablation`) with seeds
0..n-1. Every run lives in WORKDIR/<cell>/seed_<k>; a finished run leaves `result.json` there and is never redone,
an unfinished one resumes from its checkpoint, so an interrupted grid continues where it stopped. Runs go to
`--workers` processes, each pinned to its own CPU core (small models use two cores at once badly).

Writes to `--results`: ablation.json (per cell: test mIoU mean and standard deviation over seeds, per-class IoU,
attention weight and accuracy per object-size bin, training time; plus machine and commit), ablation.md (the table
beside the paper's), attention_vs_size.png and attention_examples.png.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from launch import grid_runs

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs (other launchers import this module's grid without them)."""
  config_flags.DEFINE_config_file("config", "configs/shapes.py:ablation", "Config of every run; cells override "
                                  "model.scales, model.fusion.name, loss.extra_supervision and seed.", lock_config=False)
  flags.DEFINE_bool("reduced", False, "One seed and scales {1, 0.5} only.")
  flags.DEFINE_integer("seeds", 3, "Seeds per cell (0..n-1).")
  flags.DEFINE_list("cells", [], "Only these cells (names as in the table), e.g. 'baseline,s2-attention-esupv'.")
  flags.DEFINE_integer("workers", 2, "Parallel runs, each pinned to one CPU core (1: no pinning).")
  flags.DEFINE_string("workdir", "workdirs/ablation", "Where the runs live.")
  flags.DEFINE_string("results", "launch/results", "Where the tables and figures go.")
  flags.DEFINE_integer("examples", 4, "Test images in attention_examples.png.")


# mIoU (%) without / with extra supervision, from the paper (PASCAL-Person-Part val and VOC 2012 val, ImageNet init).
PAPER = {
    "PASCAL-Person-Part": {"baseline": 51.91, ("1-0.5", "max"): (52.90, 55.26), ("1-0.5", "average"): (52.71, 55.17),
                           ("1-0.5", "attention"): (53.49, 55.85), ("1-0.75-0.5", "max"): (53.02, 55.78),
                           ("1-0.75-0.5", "average"): (52.56, 55.72), ("1-0.75-0.5", "attention"): (53.12, 56.39)},
    "VOC 2012": {"baseline": 62.28, ("1-0.5", "max"): (64.81, 67.43), ("1-0.5", "average"): (64.86, 67.79),
                 ("1-0.5", "attention"): (65.27, 68.24), ("1-0.75-0.5", "max"): (65.15, 67.79),
                 ("1-0.75-0.5", "average"): (63.92, 67.98), ("1-0.75-0.5", "attention"): (64.37, 69.08)},
}
SCALE_SETS = ((1.0, 0.5), (1.0, 0.75, 0.5))
FUSIONS = ("max", "average", "attention")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One configuration of the grid."""
  name: str
  scales: tuple[float, ...]
  fusion: str
  extra_supervision: bool

  @property
  def scale_key(self) -> str:
    return "-".join(f"{s:g}" for s in self.scales)


def grid(reduced: bool) -> list[Cell]:
  cells = [Cell("baseline", (1.0,), "none", False)]
  for scales in SCALE_SETS[:1] if reduced else SCALE_SETS:
    for fusion in FUSIONS:
      for esupv in (False, True):
        cells.append(Cell(f"s{len(scales)}-{fusion}" + ("-esupv" if esupv else ""), scales, fusion, esupv))
  return cells


def cell_config(base: ml_collections.ConfigDict, cell: Cell, seed: int) -> ml_collections.ConfigDict:
  config = base.copy_and_resolve_references()
  config.seed = seed
  config.model.scales = cell.scales
  config.model.fusion.name = "attention" if cell.fusion == "none" else cell.fusion  # one scale: no fusion runs
  config.loss.extra_supervision = cell.extra_supervision
  return config


def aggregate(cells: list[Cell], runs: dict[tuple[str, int], dict], class_names: tuple[str, ...]) -> dict:
  """Per cell: mean and standard deviation over seeds of test mIoU and per-class IoU, the mean of every per-size
  statistic, and training time."""
  out = {}
  for cell in cells:
    results = [r for (name, _), r in sorted(runs.items()) if name == cell.name]
    if not results:
      continue
    tests = [r["test"] for r in results]
    miou_mean, miou_std = grid_runs.mean_std([t["miou"] for t in tests])
    out[cell.name] = {
        "scales": list(cell.scales), "fusion": cell.fusion, "extra_supervision": cell.extra_supervision,
        "seeds": len(results), "test_miou_mean": miou_mean, "test_miou_std": miou_std,
        "test_miou_per_seed": [t["miou"] for t in tests],
        "test_iou_mean": {c: float(np.mean([t[f"iou/{c}"] for t in tests])) for c in class_names},
        "test_pixel_accuracy_mean": float(np.mean([t["pixel_accuracy"] for t in tests])),
        "by_size": {k: grid_runs.mean_of_finite([t[k] for t in tests]) for k in tests[0]
                    if k.startswith(("attention/", "accuracy/", "pixels/"))},
        "train_seconds_mean": float(np.mean([r["train_seconds"] for r in results])),
        "steps": results[0]["steps"],
    }
  return out


def _paper(cell: Cell, dataset: str) -> str:
  table = PAPER[dataset]
  if cell.name == "baseline":
    return f"{table['baseline']:.2f}"
  return f"{table[(cell.scale_key, cell.fusion)][int(cell.extra_supervision)]:.2f}"


def markdown(cells: list[Cell], summary: dict, info: dict) -> str:
  """ablation.md: the grid beside the paper's numbers."""
  lines = [f"# Table 1 on scale_shapes ({info['steps']} steps per run, test split, {info['seeds']} seed(s))", "",
           f"Machine: {info['machine']}. Commit {info['commit']}. Training time summed over runs "
           f"{info['train_minutes_total']:.0f} min; wall time of the invocation that wrote this "
           f"{info['wall_minutes']:.0f} min ({info['workers']} parallel runs, runs finished earlier reused).", "",
           "| cell | scales | fusion | E-Supv | test mIoU % (mean ± std) | per seed | train min | "
           "paper: Person-Part | paper: VOC 2012 |",
           "|---|---|---|---|---|---|---|---|---|"]
  for cell in cells:
    if cell.name not in summary:
      continue
    s = summary[cell.name]
    per_seed = ", ".join(f"{100 * v:.1f}" for v in s["test_miou_per_seed"])
    lines.append(f"| {cell.name} | {cell.scale_key} | {cell.fusion} | {'yes' if cell.extra_supervision else 'no'} "
                 f"| {100 * s['test_miou_mean']:.1f} ± {100 * s['test_miou_std']:.1f} | {per_seed} | "
                 f"{s['train_seconds_mean'] / 60:.1f} | {_paper(cell, 'PASCAL-Person-Part')} | "
                 f"{_paper(cell, 'VOC 2012')} |")
  classes = list(next(iter(summary.values()))["test_iou_mean"])
  lines += ["", "Per-class test IoU % (mean over seeds):", "", "| cell | " + " | ".join(classes) + " |",
            "|---|" + "---|" * len(classes)]
  for cell in cells:
    if cell.name in summary:
      iou = summary[cell.name]["test_iou_mean"]
      lines.append(f"| {cell.name} | " + " | ".join(f"{100 * iou[c]:.1f}" for c in classes) + " |")
  return "\n".join(lines) + "\n"


def _bins(by_size: dict) -> list[str]:
  return [k.split("/")[1] for k in by_size if k.startswith("pixels/")]


def plot_attention_vs_size(cells: list[Cell], summary: dict, path: str) -> None:
  """Mean weight of each scale per object-size bin (attention cells), and each scale's own accuracy per bin."""
  from matplotlib.figure import Figure  # noqa: PLC0415
  shown = [c for c in cells if c.fusion == "attention" and c.name in summary]
  if not shown:
    return
  fig = Figure(figsize=(5.2 * len(shown), 7.0), layout="constrained")
  axes = fig.subplots(2, len(shown), squeeze=False)
  for j, cell in enumerate(shown):
    by_size = summary[cell.name]["by_size"]
    bins = _bins(by_size)
    x = np.arange(len(bins))
    for s in cell.scales:
      axes[0, j].plot(x, [by_size[f"attention/{b}/scale_{s:g}"] for b in bins], "o-", label=f"scale {s:g}")
      axes[1, j].plot(x, [by_size[f"accuracy/{b}/scale_{s:g}"] for b in bins], "o-", label=f"scale {s:g} alone")
    axes[1, j].plot(x, [by_size[f"accuracy/{b}/fused"] for b in bins], "k*--", label="fused")
    for ax, ylabel in ((axes[0, j], "mean attention weight"), (axes[1, j], "pixel accuracy")):
      ax.set_xticks(x, [b.replace("size_", "") for b in bins], rotation=30)
      ax.set_ylim(0, 1)
      ax.set_ylabel(ylabel)
      ax.legend(fontsize="small")
    axes[0, j].set_title(f"{cell.name} (test, {summary[cell.name]['seeds']} seed(s))")
    axes[1, j].set_xlabel("object size (px; 'background' = no object)")
  fig.savefig(path, dpi=90)


def plot_examples(config: ml_collections.ConfigDict, workdir: str, num: int, path: str) -> None:
  """Test images with ground truth, per-scale attention weights and prediction, as in the paper's figures."""
  import jax  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  from scaleattn import checkpointing, visualize
  from scaleattn.data import input_pipeline
  from scaleattn.experiment import build_experiment  # noqa: PLC0415
  from scaleattn.inference import forward  # noqa: PLC0415
  exp = build_experiment(config)
  params, _ = checkpointing.restore_params(workdir, config.train, exp.abstract_state)
  data = input_pipeline.create_datasets(config, data_devices=exp.mesh.size)
  batch = next(iter(data.eval_batches("test")))
  mean = np.asarray(config.input.mean_rgb, np.float32)
  pred, weights = jax.device_get(forward.full_resolution(params, batch["image"][:num], batch["mask"][:num], exp=exp))
  scales = tuple(config.model.scales)
  fig = Figure(figsize=(2.2 * (3 + len(scales)), 2.3 * num), layout="constrained")
  axes = fig.subplots(num, 3 + len(scales), squeeze=False)
  for i in range(num):
    rows, cols = np.nonzero(batch["mask"][i])
    h, w = rows.max() + 1, cols.max() + 1
    panels = [("image", np.clip(batch["image"][i, :h, :w] + mean, 0, 255).astype(np.uint8), {}),
              ("ground truth", visualize.colorize(batch["label"][i, :h, :w].astype(np.uint8)), {})]
    panels += [(f"weight, scale {s:g}", weights[i, :h, :w, k], dict(cmap=visualize.HEATMAP_CMAP, vmin=0, vmax=1))
               for k, s in enumerate(scales)]
    panels.append(("prediction", visualize.colorize(pred[i, :h, :w].astype(np.uint8)), {}))
    for ax, (title, picture, style) in zip(axes[i], panels, strict=True):
      ax.imshow(picture, interpolation="nearest", **style)
      ax.set_axis_off()
      if i == 0:
        ax.set_title(title, fontsize="small")
  fig.savefig(path, dpi=80)


def main(argv):
  del argv
  base = FLAGS.config
  cells = [c for c in grid(FLAGS.reduced) if not FLAGS.cells or c.name in FLAGS.cells]
  seeds = range(1 if FLAGS.reduced else FLAGS.seeds)
  jobs = [(cell, seed) for seed in seeds for cell in cells]  # seed-major: a stopped grid has whole seeds done
  start = time.perf_counter()
  from scaleattn import data as datasets
  from scaleattn.data import input_pipeline  # noqa: PLC0415
  input_pipeline.prepare(base.dataset)  # once, before the workers start
  results = grid_runs.run_pool(
      [(grid_runs.run_cell, (cell_config(base, cell, seed), os.path.join(FLAGS.workdir, cell.name, f"seed_{seed}")))
       for cell, seed in jobs], FLAGS.workers)
  runs = {(cell.name, seed): result for (cell, seed), result in zip(jobs, results, strict=True)}
  for (name, seed), result in runs.items():
    logging.info("%s seed %d: test mIoU %.4f", name, seed, result["test"]["miou"])
  class_names = datasets.class_names(base.dataset.name)
  summary = aggregate(cells, runs, class_names)
  info = {"machine": grid_runs.machine(), "commit": grid_runs.commit(), "workers": FLAGS.workers, "seeds": len(seeds),
          "steps": base.train.num_steps, "wall_minutes": (time.perf_counter() - start) / 60,
          "train_minutes_total": sum(r["train_seconds"] for r in runs.values()) / 60}
  os.makedirs(FLAGS.results, exist_ok=True)
  with open(os.path.join(FLAGS.results, "ablation.json"), "w") as f:
    json.dump({**info, "config": json.loads(base.to_json_best_effort()), "cells": summary}, f, indent=1)
  with open(os.path.join(FLAGS.results, "ablation.md"), "w") as f:
    f.write(markdown(cells, summary, info))
  plot_attention_vs_size(cells, summary, os.path.join(FLAGS.results, "attention_vs_size.png"))
  shown = next((c for c in reversed(cells) if c.fusion == "attention"), None)
  if shown is not None and FLAGS.examples:
    plot_examples(cell_config(base, shown, 0), os.path.join(FLAGS.workdir, shown.name, "seed_0"), FLAGS.examples,
                  os.path.join(FLAGS.results, "attention_examples.png"))


if __name__ == "__main__":
  define_flags()
  app.run(main)
