"""Why the attention stays flat under the paper's protocol: one controlled change at a time to the paper's full model
(3 scales, attention, E-Supv; launch/paper_protocol.py's cell s3-attention-esupv), each from the same pretrained
backbone and seed as that cell's own run, which is the reference.

  PYTHONPATH=. python launch/attention_sharpness.py                 # 3 changes x seeds 0, 1
  PYTHONPATH=. python launch/attention_sharpness.py --seeds=1 --changes=scores_input
  PYTHONPATH=. python launch/attention_sharpness.py --report_only  # the results files from the runs finished so far

The changes: training twice as long (the step schedule stretched with it), the head reading every scale's scores
(fc8, the paper's own ablation) instead of fc7, and the head's learning rate x10 over the paper's multipliers. None
of them enters the main table. Needs paper_protocol.py's pretraining and reference runs of the seeds asked for
(it runs neither). Runs live in WORKDIR/sharpness/<change>/seed_<s> and are never redone once finished;
attention_sharpness.{json,md} are rewritten after every finished run.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence

import ml_collections
import numpy as np

from launch import ablation, grid_runs
from launch import paper_protocol as pp

REFERENCE = "s3-attention-esupv"
LOOKED_AT = ("0-16", "16-32", "32-64", "64+")  # object bins (background left out)


def _longer(config: ml_collections.ConfigDict) -> None:
  config.train.num_steps *= 2
  config.optim.decay_every_steps *= 2
  config.train.eval_every_steps = config.train.num_steps


def _scores_input(config: ml_collections.ConfigDict) -> None:
  config.model.fusion_input = "scores"


def _head_lr_x10(config: ml_collections.ConfigDict) -> None:
  config.optim.lr_multipliers = tuple((pattern, m * 10 if pattern.startswith("fusion/") else m)
                                      for pattern, m in config.optim.lr_multipliers)


# name -> (what it changes, the change applied to the reference's config)
CHANGES: dict[str, tuple[str, Callable[[ml_collections.ConfigDict], None]]] = {
    "longer": ("twice the fine-tuning steps, each of the three learning-rate stages twice as long", _longer),
    "scores_input": ("the head reads the scales' scores (fc8) instead of their fc7 features", _scores_input),
    "head_lr_x10": ("the head's learning rate x10 (kernels x100, biases x200 the base rate)", _head_lr_x10),
}


def reference_cell() -> ablation.Cell:
  return next(c for c in pp.cells() if c.name == REFERENCE)


def change_config(change: str, seed: int, backbone: str) -> ml_collections.ConfigDict:
  config = pp.finetune_config(reference_cell(), seed, backbone)
  CHANGES[change][1](config)
  return config


def jobs(changes: Sequence[str], seeds: Sequence[int], workdir: str) -> list[grid_runs.Job]:
  """Seed after seed, every change; each starts only if the reference run of its seed is finished."""
  out = []
  for seed in seeds:
    reference_dir = os.path.join(workdir, REFERENCE, f"seed_{seed}")
    backbone = os.path.join(workdir, pp.PRETRAIN, f"seed_{seed}", pp.BACKBONE_FILE)
    reference = grid_runs.Job(REFERENCE, seed, pp.finetune, (), (os.path.join(reference_dir, "result.json"),
                                                          os.path.join(reference_dir, pp.WEIGHT_STATS_FILE)))
    for change in changes:
      run_dir = os.path.join(workdir, "sharpness", change, f"seed_{seed}")
      out.append(grid_runs.Job(change, seed, pp.finetune, (change_config(change, seed, backbone), run_dir),
                        (os.path.join(run_dir, "result.json"), os.path.join(run_dir, pp.WEIGHT_STATS_FILE)),
                        reference))
  return out


def _reference_runs(seeds: Sequence[int], workdir: str) -> dict[int, dict]:
  """paper_protocol.py's finished runs of the reference cell, by seed."""
  return pp.collect([j for j in pp.jobs([reference_cell()], seeds, workdir) if j.name == REFERENCE]).get(REFERENCE, {})


def _object_mean(by_size: Mapping[str, float], key: str) -> float:
  """A per-bin statistic averaged over the object bins, weighted by their pixels."""
  bins = [b for b in LOOKED_AT if np.isfinite(by_size.get(f"weights/size_{b}/{key}", np.nan))]
  pixels = np.array([by_size[f"pixels/size_{b}"] for b in bins])
  return float(np.sum(pixels * [by_size[f"weights/size_{b}/{key}"] for b in bins]) / pixels.sum())


def _headline(by_seed: Mapping[int, dict]) -> dict:
  """The by-size statistics of these runs (mean over their seeds) and the figures the summary table shows."""
  cell = reference_cell()
  summary = pp.summarize([ablation.Cell("runs", cell.scales, cell.fusion, cell.extra_supervision)],
                         {"runs": by_seed})["runs"]
  by_size = summary["by_size"]
  return {**summary, "object_entropy": _object_mean(by_size, "entropy"),
          f"object_max_above_{pp.SHARP:g}": _object_mean(by_size, f"max_above_{pp.SHARP:g}"),
          "weight_scale_1_0-16": by_size["attention/size_0-16/scale_1"],
          "weight_scale_0.5_64+": by_size["attention/size_64+/scale_0.5"]}


def summarize(changes: Sequence[str], runs: Mapping[str, Mapping[int, dict]], reference: Mapping[int, dict]) -> dict:
  """Per change (and the reference over all its seeds): test mIoU per seed, the weights' entropy and sharp share
  over object pixels, the by-size statistics averaged over seeds, and for a change the same figures of the
  reference on the change's own seeds with the paired mIoU difference."""
  out = {REFERENCE: {"change": "none: the main table's cell", **_headline(reference)}} if reference else {}
  for name in changes:
    by_seed = runs.get(name, {})
    same = {s: reference[s] for s in by_seed if s in reference}
    if not by_seed or not same:
      continue
    miou = {s: r["test"]["miou"] for s, r in by_seed.items()}
    out[name] = {"change": CHANGES[name][0], **_headline(by_seed), "reference_same_seeds": _headline(same),
                 "vs_reference": pp.paired(miou, {s: r["test"]["miou"] for s, r in same.items()})}
  return out


def markdown(summary: Mapping[str, dict], info: Mapping) -> str:
  scales = [f"scale_{s:g}" for s in reference_cell().scales]
  lines = [f"# Why the attention stays flat: one change at a time to {REFERENCE} (paper protocol, test split)", "",
           f"Each change starts from the reference's pretrained backbone and seed; everything else is "
           f"configs/shapes_paper.py's. Machine: {info['machine']}. Commit {info['commit']}. Runs finished: "
           f"{info['runs_finished']} of {info['runs_total']}.", "",
           "Over the object pixels (bins 0-16 to 64+, background left out): the weights' normalised entropy (1 = "
           f"uniform over the 3 scales, 0 = one scale) and the share of pixels whose largest weight exceeds "
           f"{pp.SHARP:g}; then the mean weight of scale 1 on the smallest objects and of scale 0.5 on the largest "
           "(the paper's pattern: both high).", "",
           "Each change's cells give its value and, in parentheses, the reference's on the same seeds.", "",
           "| run | change | seeds | test mIoU % | vs reference, paired [95% CI] | entropy | "
           f"max > {pp.SHARP:g} % | w(scale_1), 0-16 px | w(scale_0.5), 64+ px |", "|" + "---|" * 9]
  keys = ("test_miou_mean", "object_entropy", f"object_max_above_{pp.SHARP:g}", "weight_scale_1_0-16",
          "weight_scale_0.5_64+")
  formats = ("{:.1f}", "{:.2f}", "{:.1f}", "{:.2f}", "{:.2f}")
  scale = (100, 1, 100, 1, 1)
  for name, s in summary.items():
    ref = s.get("reference_same_seeds")
    cells = [f.format(k * s[key]) + (f" ({f.format(k * ref[key])})" if ref else "")
             for key, f, k in zip(keys, formats, scale, strict=True)]
    vs = "-"
    if ref:
      v = s["vs_reference"]
      lo, hi = v["interval"]
      vs = f"{100 * v['mean']:+.2f}" + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if np.isfinite(lo) else "") + (
          f" ({v['positive']}/{v['n']} above)")
    lines.append(f"| {name} | {s['change']} | {s['seeds']} | {cells[0]} | {vs} | " + " | ".join(cells[1:]) + " |")
  lines += ["", "## Per object size (mean over seeds)", ""]
  for name, s in summary.items():
    by_size = s["by_size"]
    head = (["bin"] + [f"acc {x}" for x in scales] + ["acc fused"] + [f"weight {x}" for x in scales]
            + ["entropy", f"max > {pp.SHARP:g}"])
    lines += [f"{name} ({s['seeds']} seed(s)):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in ("background",) + LOOKED_AT:
      key = b if b == "background" else f"size_{b}"
      row = [b] + [f"{100 * by_size[f'accuracy/{key}/{x}']:.1f}" for x in scales + ["fused"]]
      row += [f"{by_size[f'attention/{key}/{x}']:.2f}" for x in scales]
      sharp = by_size[f"weights/{key}/max_above_{pp.SHARP:g}"]
      row += [f"{by_size[f'weights/{key}/entropy']:.2f}", f"{100 * sharp:.1f}"]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
  lines += ["Missing: " + (", ".join(info["missing"]) or "none"), ""]
  return "\n".join(lines)


def write_results(job_list: Sequence[grid_runs.Job], changes: Sequence[str], seeds: Sequence[int], workdir: str,
                  results_dir: str, failures: Sequence[str]) -> None:
  summary = summarize(changes, pp.collect(job_list), _reference_runs(seeds, workdir))
  info = {"machine": grid_runs.machine(), "commit": grid_runs.commit(), "reference": REFERENCE,
          "runs_total": len(job_list), "runs_finished": sum(j.finished() for j in job_list),
          "missing": [f"{j.name} seed {j.seed}" for j in job_list if not j.finished()], "failures": list(failures),
          "changes": {c: CHANGES[c][0] for c in changes}}
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, "attention_sharpness.json"), "w") as f:
    json.dump({**info, "runs": summary}, f, indent=1)
  with open(os.path.join(results_dir, "attention_sharpness.md"), "w") as f:
    f.write(markdown(summary, info))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=2, help="seeds 0..n-1 (their reference runs must be finished)")
  parser.add_argument("--changes", default=",".join(CHANGES), help="comma-separated, of " + ", ".join(CHANGES))
  parser.add_argument("--workers", type=int, default=1, help="parallel runs, each pinned to one core (1: unpinned)")
  parser.add_argument("--workdir", default="workdirs/paper_protocol", help="paper_protocol.py's workdir")
  parser.add_argument("--results", default="launch/results")
  parser.add_argument("--report_only", action="store_true", help="write the results of the finished runs, run none")
  args = parser.parse_args(argv)
  changes = [c for c in args.changes.split(",") if c]
  if unknown := [c for c in changes if c not in CHANGES]:
    parser.error(f"--changes: {unknown} unknown; expected some of {tuple(CHANGES)}")
  seeds = range(args.seeds)
  job_list = jobs(changes, seeds, args.workdir)
  def write(failures: list[str]) -> None:
    write_results(job_list, changes, seeds, args.workdir, args.results, failures)

  write([])
  if not args.report_only:
    start = time.perf_counter()
    write(grid_runs.run_jobs(job_list, args.workers, write)[1])
    print(f"{(time.perf_counter() - start) / 60:.0f} min", flush=True)


if __name__ == "__main__":
  main()
