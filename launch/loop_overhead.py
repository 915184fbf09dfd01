"""The training loop's step time against the same train step run alone, one after the other in one process: what the
loop's host work (batches, metric windows, hooks, preemption checks) costs per step.

  PYTHONPATH=. python launch/loop_overhead.py --config=configs/shapes.py --steps=300 \
      --out=launch/results/loop_overhead.json

Isolated: `scaleattn.perf.measure.train_runner` (a fixed batch, the state carried from step to step; median of
--steps calls). Loop: `train_and_evaluate` for --steps steps with evaluation and checkpoints only at the end, its
`step_time_s` (wall time per step of each logging window) taken from the windows after the first, which compiles.
The two are alternated --rounds times; the file records every figure and the fp32 matmul peak measured beside them.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from scaleattn.perf import measure
from scaleattn.perf.environment import environment
from scaleattn.training import loop

FLAGS = flags.FLAGS  # --config, --steps (timed by each side) and --out are the benchmark's own flags
flags.DEFINE_integer("log_every", 50, "The loop's logging window (config.train.log_every_steps).")
flags.DEFINE_integer("rounds", 2, "Isolated/loop alternations.")


def isolated_step_s(config) -> float:
  runner = measure.train_runner(config)
  return float(np.median(measure.call_times(runner.run, FLAGS.steps, warmup=2)))


def loop_step_s(config) -> list[float]:
  """Seconds per step of each logging window after the first."""
  from clu import metric_writers  # noqa: PLC0415

  windows: list[float] = []
  write = metric_writers.LoggingWriter.write_scalars

  def record(self, step, scalars):
    if "step_time_s" in scalars:
      windows.append(float(scalars["step_time_s"]))
    return write(self, step, scalars)

  metric_writers.LoggingWriter.write_scalars = record
  try:
    with tempfile.TemporaryDirectory() as workdir:
      loop.train_and_evaluate(config, os.path.join(workdir, "run"))
  finally:
    metric_writers.LoggingWriter.write_scalars = write
  return windows[1:]


def main(argv):
  del argv
  config = FLAGS.config
  config.train.num_steps = FLAGS.steps
  config.train.log_every_steps = FLAGS.log_every
  config.train.eval_every_steps = config.train.checkpoint_every_steps = FLAGS.steps
  config.eval.num_examples = 0
  rounds = []
  for _ in range(FLAGS.rounds):
    isolated = isolated_step_s(config)
    windows = loop_step_s(config)
    rounds.append({"isolated_step_s": isolated, "loop_window_step_s": windows,
                   "loop_step_s": float(np.median(windows)), "loop_over_isolated": float(np.median(windows)) / isolated})
    print(json.dumps(rounds[-1]), flush=True)
  record = {"command": " ".join(["PYTHONPATH=. python launch/loop_overhead.py", *sys.argv[1:]]),
            **environment(), "matmul_peak_gflops": measure.matmul_peak_gflops(), "steps": FLAGS.steps,
            "batch_size": config.train.batch_size, "rounds": rounds,
            "loop_over_isolated_median": float(np.median([r["loop_over_isolated"] for r in rounds])),
            "date": time.strftime("%Y-%m-%d")}
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(record, f, indent=1)
  print(json.dumps({k: record[k] for k in ("loop_over_isolated_median", "matmul_peak_gflops")}))


if __name__ == "__main__":
  app.run(main)
