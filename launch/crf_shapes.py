"""What the dense CRF does on `scale_shapes`: its weights grid-searched on the validation split (as DeepLab did on
VOC val), then the default model's test mIoU with and without it, over seeds.

  PYTHONPATH=. python launch/crf_shapes.py    # 3 seeds of configs/shapes.py, then the CRF grid on each

Each seed trains `--config` (default `configs/shapes.py`, the embedded default run) with that seed, or reuses a
finished run in WORKDIR/seed_<k>. The grid covers bilateral weight x bilateral position std x bilateral colour std
(Gaussian kernel and iterations as DeepLab's VOC settings) on the first `--val_batches` validation batches; the
setting with the best validation mIoU (per seed) is then applied to the first `--test_batches` test batches (the
CRF's cost on a CPU core bounds how many), which are also scored without it. Writes
crf_shapes.json and crf_shapes.md to `--results`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from launch import grid_runs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/shapes.py", "The model's config; runs override the seed.",
                                lock_config=False)
flags.DEFINE_integer("seeds", 3, "Seeds (0..n-1).")
flags.DEFINE_list("bilateral_weight", ["3", "5"], "Bilateral kernel weights searched.")
flags.DEFINE_list("bilateral_xy_std", ["30", "60"], "Bilateral position stds (pixels) searched.")
flags.DEFINE_list("bilateral_rgb_std", ["5"], "Bilateral colour stds searched.")
flags.DEFINE_integer("val_batches", 2, "Validation batches the grid is scored on.")
flags.DEFINE_integer("test_batches", 8, "Test batches scored with and without the CRF (0: the whole split).")
flags.DEFINE_integer("workers", 2, "Parallel seeds, each pinned to one CPU core (1: no pinning).")
flags.DEFINE_string("workdir", "workdirs/crf_shapes", "Where the runs live.")
flags.DEFINE_string("results", "launch/results", "Where crf_shapes.{json,md} go.")


def _miou(config: ml_collections.ConfigDict, workdir: str, split: str, num_batches: int | None) -> tuple[float, float]:
  """mIoU of the workdir's latest checkpoint on (the first batches of) a split, and seconds per image."""
  from scaleattn import checkpointing  # noqa: PLC0415 - JAX starts in the workers
  from scaleattn.data import input_pipeline
  from scaleattn.evaluation import segmentation
  from scaleattn.experiment import build_experiment  # noqa: PLC0415

  exp = build_experiment(config)
  data = input_pipeline.create_datasets(config, data_devices=exp.mesh.size)
  params, _ = checkpointing.restore_params(workdir, config.train, exp.abstract_state)
  batches = data.num_eval_batches(split) if num_batches is None else min(num_batches, data.num_eval_batches(split))
  eval_fn = segmentation.jit_eval_step(exp)
  first = next(iter(data.eval_batches(split)))
  segmentation.evaluate_split(eval_fn, params, exp, iter([first]), 1, data.class_names, desc="compile")
  start = time.perf_counter()
  result = segmentation.evaluate_split(eval_fn, params, exp, itertools.islice(data.eval_batches(split), batches),
                                   batches, data.class_names, desc=split)
  return result["miou"], (time.perf_counter() - start) / (batches * config.eval.batch_size)


def crf_seed(config: ml_collections.ConfigDict, workdir: str, grid: list[dict], val_batches: int,
             test_batches: int | None) -> dict:
  """One seed: trained (or reused), the grid scored on validation, the best setting and no CRF on test."""
  run = grid_runs.run_cell(config, workdir)

  def search() -> dict:
    scored = []
    for setting in grid:
      cfg = config.copy_and_resolve_references()
      cfg.eval.crf.update(enabled=True, **setting)
      miou, seconds = _miou(cfg, workdir, config.dataset.eval_split, val_batches)
      scored.append({**setting, "validation_miou": miou, "seconds_per_image": seconds})
    best = max(scored, key=lambda s: s["validation_miou"])
    cfg = config.copy_and_resolve_references()
    cfg.eval.crf.update(enabled=True, **{k: best[k] for k in grid[0]})
    with_crf, seconds = _miou(cfg, workdir, config.dataset.test_split, test_batches)
    without, seconds_without = _miou(config, workdir, config.dataset.test_split, test_batches)
    return {"grid": scored, "best": best, "test_miou_crf": with_crf, "test_miou_no_crf": without,
            "test_seconds_per_image_crf": seconds, "test_seconds_per_image_no_crf": seconds_without,
            "train_seconds": run["train_seconds"]}
  key = hashlib.sha256(json.dumps([grid, val_batches, test_batches]).encode()).hexdigest()[:10]
  return grid_runs.cached_json(os.path.join(workdir, f"crf_search_{key}.json"), search)


def main(argv):
  del argv
  start = time.perf_counter()
  base = FLAGS.config
  grid = [{"bilateral_weight": float(w), "bilateral_xy_std": float(xy), "bilateral_rgb_std": float(rgb)}
          for w, xy, rgb in itertools.product(FLAGS.bilateral_weight, FLAGS.bilateral_xy_std,
                                              FLAGS.bilateral_rgb_std)]
  from scaleattn.data import input_pipeline  # noqa: PLC0415
  input_pipeline.prepare(base.dataset)
  configs = []
  for seed in range(FLAGS.seeds):
    config = base.copy_and_resolve_references()
    config.seed = seed
    config.eval.num_examples = 0
    configs.append(config)
  seeds = grid_runs.run_pool([(crf_seed, (c, os.path.join(FLAGS.workdir, f"seed_{k}"), grid, FLAGS.val_batches,
                                                          FLAGS.test_batches or None))
                              for k, c in enumerate(configs)], FLAGS.workers)
  gains = [s["test_miou_crf"] - s["test_miou_no_crf"] for s in seeds]
  summary = {
      "test_miou_no_crf": grid_runs.mean_std([s["test_miou_no_crf"] for s in seeds]),
      "test_miou_crf": grid_runs.mean_std([s["test_miou_crf"] for s in seeds]),
      "gain": grid_runs.mean_std(gains), "gain_per_seed": gains,
  }
  info = {"machine": grid_runs.machine(), "commit": grid_runs.commit(), "seeds": FLAGS.seeds,
          "val_batches": FLAGS.val_batches, "test_batches": FLAGS.test_batches, "wall_minutes": (time.perf_counter() - start) / 60}
  logging.info("CRF on scale_shapes: %s", summary)
  os.makedirs(FLAGS.results, exist_ok=True)
  with open(os.path.join(FLAGS.results, "crf_shapes.json"), "w") as f:
    json.dump({**info, "command": " ".join(["PYTHONPATH=. python launch/crf_shapes.py", *sys.argv[1:]]), "summary": summary,
               "per_seed": seeds, "config": json.loads(base.to_json_best_effort())}, f, indent=1)
  lines = [f"# Dense CRF on scale_shapes (configs/shapes.py, {FLAGS.seeds} seeds, test split)", "",
           f"Machine: {info['machine']}. Commit {info['commit']}. CRF weights chosen per seed on the first "
           f"{FLAGS.val_batches} validation batches; test mIoU on the first {FLAGS.test_batches or 'all'} test "
           "batches, with and without the CRF (the same images). Seconds per image: the whole test pass's time over its images "
           "(one worker process; not alone on the machine if other work ran).", "",
           "| seed | best (bilateral weight, xy std, rgb std) | val mIoU % | test mIoU % no CRF | with CRF | gain | "
           "s/image no CRF | with CRF |", "|---|---|---|---|---|---|---|---|"]
  for k, s in enumerate(seeds):
    b = s["best"]
    lines.append(f"| {k} | {b['bilateral_weight']:g}, {b['bilateral_xy_std']:g}, {b['bilateral_rgb_std']:g} | "
                 f"{100 * b['validation_miou']:.1f} | {100 * s['test_miou_no_crf']:.1f} | "
                 f"{100 * s['test_miou_crf']:.1f} | {100 * gains[k]:+.2f} | {s['test_seconds_per_image_no_crf']:.4f} "
                 f"| {s['test_seconds_per_image_crf']:.4f} |")
  m, sd = summary["gain"]
  lines += ["", f"Gain from the CRF: {100 * m:+.2f} ± {100 * sd:.2f} mIoU points (mean ± std over seeds)."]
  with open(os.path.join(FLAGS.results, "crf_shapes.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
