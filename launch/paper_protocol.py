"""The paper's protocol on `scale_shapes`: one pretrained backbone per seed (the stand-in for ImageNet VGG-16,
configs/shapes_pretrain.py), then the 13 Table-1 cells fine-tuned from it with the authors' recipe
(configs/shapes_paper.py), and the paper's claims tested over seeds beside the from-scratch grid
(launch/results/ablation.json).

  PYTHONPATH=. python launch/paper_protocol.py                       # 5 pretrainings + 13 cells x 5 seeds
  PYTHONPATH=. python launch/paper_protocol.py --seeds=1 --cells=s2-attention
  PYTHONPATH=. python launch/paper_protocol.py --report_only  # the results files from the runs finished so far

Fine-tuning seed s starts from pretraining seed s. Every run lives in WORKDIR/<cell or 'pretrain'>/seed_<s> and is
never redone once finished (launch/grid_runs.py); an interrupted run resumes from its checkpoint. Two runs at a
time, each pinned to its own core, in this order: the pretraining of a seed, then that seed's runs of the cells the
claims rest on (baseline; s2/s3 x attention/average x without/with E-Supv), seed after seed; the max cells last.
After every finished run (and at the start) paper_protocol.{json,md} and paper_protocol_attention_vs_size.png are
rewritten from whatever runs are finished, the md listing those still missing.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections
import numpy as np
from scipy import stats

from configs import shapes_paper, shapes_pretrain
from launch import ablation, grid_runs

PRETRAIN = "pretrain"
BACKBONE_FILE = "backbone.npz"
WEIGHT_STATS_FILE = "weight_stats.json"
SHARP = 0.8  # a pixel's weights are 'decided' when its largest weight exceeds this
CLAIM_FUSIONS = ("attention", "average")  # the cells the claims rest on run first; 'max' follows
CONFIDENCE = 0.95
FIGURE = "paper_protocol_attention_vs_size.png"
# The benchmark's run-to-run spread is wider than a few seeds show: an effect under 1.5 points needs 5 seeds.
SMALL_EFFECT, SEEDS_FOR_SMALL = 0.015, 5


def cells() -> list[ablation.Cell]:
  """The 13 Table-1 cells, those the claims rest on first."""
  grid = ablation.grid(reduced=False)
  return [c for c in grid if c.fusion in ("none",) + CLAIM_FUSIONS] + [c for c in grid if c.fusion == "max"]


def finetune_config(cell: ablation.Cell, seed: int, backbone: str) -> ml_collections.ConfigDict:
  config = ablation.cell_config(shapes_paper.get_config(), cell, seed)
  config.init_from = backbone
  return config


def pretrain_config(seed: int) -> ml_collections.ConfigDict:
  config = shapes_pretrain.get_config()
  config.seed = seed
  return config


def _restore(config: ml_collections.ConfigDict, workdir: str):
  """(experiment, parameters) of a finished run."""
  from scaleattn import checkpointing  # noqa: PLC0415 - JAX starts after the worker is pinned.
  from scaleattn.experiment import build_experiment  # noqa: PLC0415
  exp = build_experiment(config)
  params, _ = checkpointing.restore_params(workdir, config.train, exp.abstract_state)
  return exp, params


def export_backbone(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the pretrained backbone without fc8 (the paper's fc8 is new: other classes) for `init_from`."""
  import jax  # noqa: PLC0415

  from scaleattn import convert  # noqa: PLC0415
  path = os.path.join(workdir, BACKBONE_FILE)
  if not os.path.exists(path):
    _, params = _restore(config, workdir)
    convert.save_pretrained(path, {k: v for k, v in jax.device_get(params["backbone"]).items() if k != "fc8"})
  return path


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pool job: a pretraining run and its exported backbone."""
  result = grid_runs.run_cell(config, workdir)
  export_backbone(config, workdir)
  return result


def weight_statistics(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Per object-size bin of the test split: the normalised entropy of the fusion weights (1 = uniform over the
  scales) and the share of pixels whose largest weight exceeds SHARP."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from scaleattn import sharding  # noqa: PLC0415
  from scaleattn.data import input_pipeline  # noqa: PLC0415
  from scaleattn.data.preprocessing import IGNORE_LABEL  # noqa: PLC0415
  from scaleattn.evaluation import metrics  # noqa: PLC0415
  from scaleattn.inference import forward  # noqa: PLC0415
  config = grid_runs.test_only(config)
  exp, params = _restore(config, workdir)
  bins = tuple(config.eval.size_bins)

  @jax.jit
  def sums(params, batch):
    weights = forward.to_input_size(forward.predict_scores(params, batch["image"], exp=exp, flip=False).weights,
                                    batch["image"])
    entropy = -jnp.sum(weights * jnp.log(jnp.clip(weights, 1e-12)), axis=-1) / np.log(weights.shape[-1])
    values = jnp.stack([entropy, (jnp.max(weights, axis=-1) > SHARP).astype(jnp.float32)], axis=-1)
    counted = batch["mask"] & (batch["label"] != IGNORE_LABEL)
    return metrics.sum_by_size(values, jnp.where(counted, batch["instance_size"], -1.0), bins)

  data = input_pipeline.create_datasets(config, data_devices=exp.mesh.size)
  totals = None
  for local in data.eval_batches(config.dataset.test_split):
    step = sums(params, sharding.global_batch(exp.mesh, local))
    totals = step if totals is None else jax.tree.map(jnp.add, totals, step)
  return metrics.summarize_by_size(*jax.device_get(totals), "weights", ("entropy", f"max_above_{SHARP:g}"), bins)


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pool job: a fine-tuning run, and for attention cells the statistics of its weights."""
  result = grid_runs.run_cell(config, workdir)
  if _has_weight_stats(config):
    grid_runs.cached_json(os.path.join(workdir, WEIGHT_STATS_FILE), lambda: weight_statistics(config, workdir))
  return result


def _has_weight_stats(config: ml_collections.ConfigDict) -> bool:
  return config.model.fusion.name == "attention" and len(config.model.scales) > 1


def jobs(cell_list: Sequence[ablation.Cell], seeds: Sequence[int], workdir: str) -> list[grid_runs.Job]:
  """Every run in the order they start: per seed its pretraining and its claims cells, then the max cells."""
  first, last = [], []
  for seed in seeds:
    pre_dir = os.path.join(workdir, PRETRAIN, f"seed_{seed}")
    pre = grid_runs.Job(PRETRAIN, seed, pretrain, (pretrain_config(seed), pre_dir),
              (os.path.join(pre_dir, "result.json"), os.path.join(pre_dir, BACKBONE_FILE)))
    first.append(pre)
    for cell in cell_list:
      run_dir = os.path.join(workdir, cell.name, f"seed_{seed}")
      config = finetune_config(cell, seed, os.path.join(pre_dir, BACKBONE_FILE))
      outputs = (os.path.join(run_dir, "result.json"),) + (
          (os.path.join(run_dir, WEIGHT_STATS_FILE),) if _has_weight_stats(config) else ())
      job = grid_runs.Job(cell.name, seed, finetune, (config, run_dir), outputs, pre)
      (first if cell.fusion != "max" else last).append(job)
  return first + last


def paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE) -> dict:
  """a - b over the seeds both have: the mean difference, its t-interval, how many seeds have a > b, and the
  verdict on 'a > b' ('supported' only when the interval lies above 0, 'contradicted' when below, either only with
  SEEDS_FOR_SMALL seeds when the mean difference is under SMALL_EFFECT)."""
  seeds = sorted(set(a) & set(b))
  diffs = np.array([a[s] - b[s] for s in seeds], np.float64)
  out = {"seeds": seeds, "differences": diffs.tolist(), "n": len(seeds),
         "positive": int(np.sum(diffs > 0)), "mean": float(np.mean(diffs)) if len(seeds) else float("nan")}
  if len(seeds) < 2:
    return {**out, "interval": [float("nan"), float("nan")], "verdict": "too few seeds"}
  half = stats.t.ppf(0.5 + confidence / 2, len(seeds) - 1) * np.std(diffs, ddof=1) / np.sqrt(len(seeds))
  lo, hi = out["mean"] - half, out["mean"] + half
  verdict = "supported" if lo > 0 else "contradicted" if hi < 0 else "unresolved"
  if verdict != "unresolved" and abs(out["mean"]) < SMALL_EFFECT and len(seeds) < SEEDS_FOR_SMALL:
    verdict = "too few seeds"
  return {**out, "interval": [float(lo), float(hi)], "verdict": verdict}


def claims() -> list[tuple[str, str, str]]:
  """(claim, cell a, cell b) for 'a beats b': multi-scale vs baseline, attention vs average and max (per scale set,
  without and with E-Supv), E-Supv on vs off (per fusion and scale set)."""
  out = []
  multi = [c for c in ablation.grid(reduced=False) if c.name != "baseline"]
  out += [(f"{c.name} > baseline", c.name, "baseline") for c in multi]
  for scales in ablation.SCALE_SETS:
    prefix = f"s{len(scales)}"
    for esupv in ("", "-esupv"):
      for other in ("average", "max"):
        out.append((f"{prefix}{esupv}: attention > {other}", f"{prefix}-attention{esupv}", f"{prefix}-{other}{esupv}"))
    for fusion in ablation.FUSIONS:
      out.append((f"{prefix}-{fusion}: E-Supv > none", f"{prefix}-{fusion}-esupv", f"{prefix}-{fusion}"))
  return out


def test_claims(per_seed: Mapping[str, Mapping[int, float]]) -> list[dict]:
  """Every claim on per-cell {seed: test mIoU} (claims whose cells are missing are left out)."""
  return [{"claim": name, "a": a, "b": b, **paired(per_seed[a], per_seed[b])}
          for name, a, b in claims() if a in per_seed and b in per_seed]


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def collect(job_list: Sequence[grid_runs.Job]) -> dict[str, dict[int, dict]]:
  """Per run name and seed, its finished result (with its weight statistics)."""
  runs: dict[str, dict[int, dict]] = {}
  for job in job_list:
    if job.finished():
      run_dir = job.args[1]
      result = _read(os.path.join(run_dir, "result.json"))
      if (weights := _read(os.path.join(run_dir, WEIGHT_STATS_FILE))) is not None:
        result["test"].update(weights)
      runs.setdefault(job.name, {})[job.seed] = result
  return runs


def summarize(cell_list: Sequence[ablation.Cell], runs: Mapping[str, Mapping[int, dict]]) -> dict:
  """Per cell: test mIoU per seed, mean and std, train minutes, and the by-size statistics averaged over seeds."""
  out = {}
  for cell in cell_list:
    if cell.name not in runs:
      continue
    by_seed = runs[cell.name]
    miou = {s: r["test"]["miou"] for s, r in sorted(by_seed.items())}
    mean, std = grid_runs.mean_std(list(miou.values()))
    tests = [r["test"] for r in by_seed.values()]
    out[cell.name] = {
        "scales": list(cell.scales), "fusion": cell.fusion, "extra_supervision": cell.extra_supervision,
        "test_miou_per_seed": miou, "test_miou_mean": mean, "test_miou_std": std, "seeds": len(miou),
        "train_minutes_mean": float(np.mean([r["train_seconds"] for r in by_seed.values()])) / 60,
        "by_size": {k: grid_runs.mean_of_finite([t.get(k, float("nan")) for t in tests]) for k in tests[0]
                    if k.startswith(("attention/", "accuracy/", "pixels/", "weights/"))},
    }
  return out


STAND_IN = """\
Why this stands in fairly for ImageNet pretraining. The paper fine-tunes every cell from one VGG-16 trained on
another task (ImageNet classification) with other classes on other images; here every cell starts from one
backbone per seed trained on another task's labels (segmenting five other outlines: ring, star, ellipse, ell,
bowtie; scale_shapes 'pretrain') on other images (their own generator seeds), at scale 1 alone. What transfers,
as from ImageNet: the low-level filters (colour contrast, edges, corners, the fills and textures, which are drawn
from the same distributions for all classes), separating objects from the blotchy background and the clutter
strokes, and features over the same object sizes (8-96 px) at both of the model's input scales. What does not:
the evaluation classes (disk, square, triangle, cross are never seen, so fc8 and the attention head start new, as
in the paper), and the field of view stays the backbone's own. Where the stand-in is kinder than ImageNet: the
source task is segmentation, not classification, on images of the same generator and size range, so the
transfer gap is narrower than ImageNet -> VOC, and the pretraining (Adam, from scratch) is short, not a
converged ImageNet model; the claims below are about this setting, not a reproduction of the paper's numbers."""


def _pct(x: float) -> str:
  return f"{100 * x:.1f}" if np.isfinite(x) else "-"


def _claim_cell(c: dict | None) -> str:
  if c is None:
    return "- | - | -"
  lo, hi = c["interval"]
  interval = f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" if np.isfinite(lo) else "-"
  return f"{100 * c['mean']:+.2f} {interval} | {c['positive']}/{c['n']} | {c['verdict']}"


def markdown(cell_list: Sequence[ablation.Cell], summary: dict, scratch: dict, claim_rows: dict, info: dict) -> str:
  lines = [f"# Table 1 under the paper's protocol on scale_shapes ({info['finetune_steps']} fine-tuning steps, "
           f"test split)", "",
           f"Init: {info['init']}. Optimizer: {info['optimizer']}. Machine: {info['machine']}. Commit {info['commit']}.",
           f"Runs finished: {info['runs_finished']} of {info['runs_total']} ({info['workers']} at a time). Training "
           f"time summed over finished runs {info['train_minutes_total']:.0f} min; the invocation that wrote this "
           f"had run {info['wall_minutes']:.0f} min (runs finished earlier reused).", "",
           "## Pretraining (the ImageNet stand-in)", "", STAND_IN, "",
           f"Pretraining: {info['pretrain']}. Its own test mIoU per seed: "
           + (", ".join(f"seed {s}: {_pct(v)}" for s, v in info["pretrain_miou"].items()) or "none yet") + ".", "",
           "## Test mIoU % per cell", "",
           "| cell | E-Supv | paper protocol: mean ± std | per seed | n | train min | from scratch (Adam, cosine): "
           "mean ± std | n |", "|---|---|---|---|---|---|---|---|"]
  for cell in cell_list:
    s, f = summary.get(cell.name), scratch.get(cell.name)
    ours = (f"{_pct(s['test_miou_mean'])} ± {_pct(s['test_miou_std'])} | "
            + ", ".join(f"{_pct(v)}" for v in s["test_miou_per_seed"].values())
            + f" | {s['seeds']} | {s['train_minutes_mean']:.1f}") if s else "- | - | 0 | -"
    theirs = f"{_pct(f['test_miou_mean'])} ± {_pct(f['test_miou_std'])} | {f['seeds']}" if f else "- | 0"
    lines.append(f"| {cell.name} | {'yes' if cell.extra_supervision else 'no'} | {ours} | {theirs} |")
  lines += ["", "## Claims (a > b): paired differences over seeds, mIoU points, 95% t-interval", "",
            "'supported' only when the interval lies above 0; 'contradicted' when below; either needs "
            f"{SEEDS_FOR_SMALL} seeds when the difference is under {100 * SMALL_EFFECT:g} points ('too few seeds'); "
            "seeds where a > b out of the seeds both cells have.", "",
            "| claim | paper protocol: mean [95% CI] | a > b | verdict | from scratch: mean [95% CI] | a > b | "
            "verdict |", "|---|---|---|---|---|---|---|"]
  for name, _, _ in claims():
    ours, theirs = claim_rows["paper_protocol"].get(name), claim_rows["from_scratch"].get(name)
    lines.append(f"| {name} | {_claim_cell(ours)} | {_claim_cell(theirs)} |")
  lines += ["", "## By object size (paper protocol, test split, mean over seeds)", "",
            "Pixel accuracy of each scale alone and of the fused prediction, the mean attention weight per scale, "
            "the weights' entropy (normalised: 1 = uniform, 0 = one scale) and the share of pixels whose largest "
            f"weight exceeds {SHARP:g}.", ""]
  for cell in cell_list:
    if cell.fusion != "attention" or cell.name not in summary:
      continue
    by_size = summary[cell.name]["by_size"]
    scales = [f"scale_{s:g}" for s in cell.scales]
    head = (["bin", "pixels"] + [f"acc {s}" for s in scales] + ["acc fused"] + [f"weight {s}" for s in scales]
            + ["entropy", f"max > {SHARP:g}"])
    lines += [f"{cell.name} ({summary[cell.name]['seeds']} seed(s)):", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]
    for b in ablation._bins(by_size):  # noqa: SLF001 - the bin names as the ablation reads them
      row = [b.replace("size_", ""), f"{by_size[f'pixels/{b}']:.0f}"]
      row += [_pct(by_size[f"accuracy/{b}/{s}"]) for s in scales + ["fused"]]
      row += [f"{by_size[f'attention/{b}/{s}']:.2f}" for s in scales]
      row += [f"{by_size.get(f'weights/{b}/entropy', float('nan')):.2f}",
              _pct(by_size.get(f"weights/{b}/max_above_{SHARP:g}", float("nan")))]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
  lines += ["## Missing", "", ", ".join(info["missing"]) or "none", ""]
  if info["failures"]:
    lines += ["Failed:", ""] + [f"- {f}" for f in info["failures"]] + [""]
  return "\n".join(lines)


def write_results(job_list: Sequence[grid_runs.Job], cell_list: Sequence[ablation.Cell], results_dir: str,
                  start: float, workers: int, failures: Sequence[str]) -> None:
  """paper_protocol.{json,md} from the finished runs, beside the from-scratch grid's claims."""
  runs = collect(job_list)
  summary = summarize(cell_list, runs)
  scratch_path = os.path.join(results_dir, "ablation.json")
  scratch = (_read(scratch_path) or {}).get("cells", {})
  per_seed = {name: {int(s): v for s, v in c["test_miou_per_seed"].items()} for name, c in summary.items()}
  scratch_seeds = {name: dict(enumerate(c["test_miou_per_seed"])) for name, c in scratch.items()}
  claim_rows = {"paper_protocol": {c["claim"]: c for c in test_claims(per_seed)},
                "from_scratch": {c["claim"]: c for c in test_claims(scratch_seeds)}}
  finetune_cfg, pretrain_cfg = shapes_paper.get_config(), shapes_pretrain.get_config()
  o, p = finetune_cfg.optim, pretrain_cfg.optim
  info = {
      "machine": grid_runs.machine(), "commit": grid_runs.commit(), "workers": workers,
      "init": "per seed s, the backbone (conv1-fc7) pretrained with seed s by configs/shapes_pretrain.py; fc8 and the "
              "attention head new (fc8 std 0.01)",
      "optimizer": f"SGD momentum {o.momentum}, base lr {o.learning_rate:g} (x10 fc8 and attention head, x20 their "
                   f"biases, x2 other biases), step schedule x{o.decay_factor:g} every {o.decay_every_steps} steps, "
                   f"weight decay {o.weight_decay:g}, batch {finetune_cfg.train.batch_size}, crop "
                   f"{finetune_cfg.input.crop_size}, E-Supv grid '{finetune_cfg.loss.per_scale_grid}'",
      "pretrain": f"scale_shapes '{pretrain_cfg.dataset.builder_config}', scale 1, {p.name} lr {p.learning_rate:g} "
                  f"{p.schedule}, {pretrain_cfg.train.num_steps} steps, batch {pretrain_cfg.train.batch_size}, crop "
                  f"{pretrain_cfg.input.crop_size}",
      "pretrain_miou": {s: r["test"]["miou"] for s, r in sorted(runs.get(PRETRAIN, {}).items())},
      "pretrain_train_minutes": {s: r["train_seconds"] / 60 for s, r in sorted(runs.get(PRETRAIN, {}).items())},
      "finetune_steps": finetune_cfg.train.num_steps,
      "runs_total": len(job_list), "runs_finished": sum(len(v) for v in runs.values()),
      "missing": [f"{j.name} seed {j.seed}" for j in job_list if not j.finished()],
      "failures": list(failures),
      "wall_minutes": (time.perf_counter() - start) / 60,
      "train_minutes_total": sum(r["train_seconds"] for v in runs.values() for r in v.values()) / 60,
  }
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, "paper_protocol.json"), "w") as f:
    json.dump({**info, "finetune_config": json.loads(finetune_cfg.to_json_best_effort()),
               "pretrain_config": json.loads(pretrain_cfg.to_json_best_effort()), "cells": summary,
               "claims": claim_rows}, f, indent=1)
  with open(os.path.join(results_dir, "paper_protocol.md"), "w") as f:
    f.write(markdown(cell_list, summary, scratch, claim_rows, info))
  ablation.plot_attention_vs_size(cell_list, summary, os.path.join(results_dir, FIGURE))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=5, help="seeds 0..n-1, for pretraining and fine-tuning both")
  parser.add_argument("--cells", default="", help="only these cells, comma-separated (e.g. 'baseline,s2-attention')")
  parser.add_argument("--workers", type=int, default=2, help="parallel runs, each pinned to one core (1: unpinned)")
  parser.add_argument("--workdir", default="workdirs/paper_protocol")
  parser.add_argument("--results", default="launch/results")
  parser.add_argument("--report_only", action="store_true", help="write the results of the finished runs, run none")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  wanted = set(filter(None, args.cells.split(",")))
  cell_list = [c for c in cells() if not wanted or c.name in wanted]
  job_list = jobs(cell_list, range(args.seeds), args.workdir)
  from scaleattn.data import input_pipeline  # noqa: PLC0415
  for config in (shapes_pretrain.get_config(), shapes_paper.get_config()):
    input_pipeline.prepare(config.dataset)  # once, before the workers start
  def write(failures: list[str]) -> None:
    write_results(job_list, cell_list, args.results, start, args.workers, failures)

  write([])
  if not args.report_only:
    write(grid_runs.run_jobs(job_list, args.workers, write)[1])


if __name__ == "__main__":
  main()
