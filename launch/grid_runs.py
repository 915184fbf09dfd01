"""What the experiment grids under launch/ share: one resumable run per (cell, seed) directory, a pool of
core-pinned worker processes, summary statistics over seeds, and where the numbers were measured."""
from __future__ import annotations

import json
import multiprocessing
import os
import platform
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent import futures

import ml_collections
import numpy as np


def _pin(core_queue) -> None:
  """Pool initializer: pin this worker to a core of its own before JAX starts its thread pools."""
  if core_queue is not None:
    os.sched_setaffinity(0, {core_queue.get()})


def cached_json(path: str, compute: Callable[[], dict]) -> dict:
  """The JSON at `path`, or `compute()` written there atomically (a finished piece of work is never redone)."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = compute()
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)
  return result


def run_cell(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) one run, evaluates it on the test split and writes `result.json`; returns it."""
  def compute() -> dict:
    from scaleattn.evaluation import segmentation
    from scaleattn.training import loop  # noqa: PLC0415 - JAX starts after the worker is pinned.
    attempts_path = os.path.join(workdir, "attempts.json")  # > 1: resumed, the time covers the last attempt only
    os.makedirs(workdir, exist_ok=True)
    attempts = (json.load(open(attempts_path)) if os.path.exists(attempts_path) else 0) + 1
    with open(attempts_path, "w") as f:
      json.dump(attempts, f)
    start = time.perf_counter()
    validation = loop.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    test = segmentation.evaluate(test_only(config), workdir)["test"]
    return {"train_seconds": seconds, "attempts": attempts, "steps": config.train.num_steps,
            "validation": {k: v for k, v in validation.items() if np.isscalar(v)}, "test": test}
  return cached_json(os.path.join(workdir, "result.json"), compute)


def test_only(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config evaluating the test split alone."""
  config = config.copy_and_resolve_references()
  config.dataset.eval_split = None
  return config


RESTARTS = 3  # a job whose pool broke under it (a worker's watchdog exited 75, a kill) starts again this often


def pinned_pool(workers: int) -> futures.ProcessPoolExecutor:
  """A pool of `workers` spawned processes, each pinned to its own core when more than one (use it in `with`).
  Unlike multiprocessing.Pool, a worker that dies breaks the pool (BrokenProcessPool on its pending futures)
  instead of leaving its job waiting forever."""
  cores = None
  if workers > 1:
    cores = multiprocessing.get_context("spawn").Queue()
    for core in sorted(os.sched_getaffinity(0))[:workers]:
      cores.put(core)
  return futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_pin,
                                     initargs=(cores,))


def run_pool(jobs: Sequence[tuple[Callable, tuple]], workers: int) -> list:
  """Runs fn(*args) for every job on a `pinned_pool`, results in job order. When a worker dies, the jobs it broke
  start again on a new pool (a run resumes from its last checkpoint), each at most RESTARTS times."""
  results: dict[int, object] = {}
  broken: Counter[int] = Counter()
  while len(results) < len(jobs):
    with pinned_pool(workers) as pool:
      pending = {i: pool.submit(fn, *args) for i, (fn, args) in enumerate(jobs) if i not in results}
      for i, future in pending.items():
        try:
          results[i] = future.result()
        except futures.process.BrokenProcessPool:
          broken[i] += 1
          if broken[i] > RESTARTS:
            raise RuntimeError(f"run_pool: job {i} ({jobs[i][0].__name__}) lost its worker {broken[i]} times") from None
  return [results[i] for i in range(len(jobs))]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mean_of_finite(values: Sequence[float]) -> float:
  """Mean over seeds of a per-bin statistic; NaN (no pixels in the bin) where no seed has one."""
  finite = [v for v in values if np.isfinite(v)]
  return float(np.mean(finite)) if finite else float("nan")


def machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
  except OSError:
    pass
  return f"{model}, {os.cpu_count()} CPU cores, {platform.system()}"


def commit() -> str:
  return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
