"""What the experiment grids under launch/ share: one resumable run per (cell, seed) directory, a pool of
core-pinned worker processes, summary statistics over seeds, and where the numbers were measured."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import platform
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool

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
  """A pool of `workers` spawned processes, each pinned to its own core when more than one. Unlike
  multiprocessing.Pool, a worker that dies breaks the pool (BrokenProcessPool on its futures) instead of leaving
  its job waiting forever."""
  cores = None
  if workers > 1:
    cores = multiprocessing.get_context("spawn").Queue()
    for core in sorted(os.sched_getaffinity(0))[:workers]:
      cores.put(core)
  return futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_pin,
                                     initargs=(cores,))


def _abandon(pool: futures.ProcessPoolExecutor) -> None:
  """Ends a pool now, its running jobs with it (they resume from their checkpoints when run again)."""
  for process in list(getattr(pool, "_processes", {}).values()):  # no public way to stop a running job
    process.terminate()
  pool.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass(eq=False)
class Job:
  """One run: `fn(*args)` in a pool worker. With `outputs`, it is finished when every one of those files exists
  (and is then never run again); it starts only once `after` (if any) is finished."""
  name: str
  seed: int | None
  fn: Callable
  args: tuple
  outputs: tuple[str, ...] = ()
  after: Job | None = None

  def finished(self) -> bool:
    return bool(self.outputs) and all(os.path.exists(p) for p in self.outputs)

  def __str__(self) -> str:
    return self.name if self.seed is None else f"{self.name} seed {self.seed}"


def run_jobs(job_list: Sequence[Job], workers: int, on_finished: Callable[[list[str]], None] = lambda _: None
             ) -> tuple[list, list[str]]:
  """Runs the unfinished jobs, at most `workers` at a time on a `pinned_pool`, each as soon as the one it comes
  after is finished, earliest in the list first; calls `on_finished(failures so far)` after each. A worker that
  dies breaks the pool: the jobs that were running on it start again first, on a new pool, each at most RESTARTS
  times. A job that raises, or whose `after` failed, is a failure; the others go on. Returns every job's result
  (None where it did not run or failed) and the failures."""
  pending = [j for j in job_list if not j.finished()]
  results: dict[int, object] = {}
  running: dict[int, tuple[Job, futures.Future]] = {}
  failures: list[str] = []
  broken: Counter[int] = Counter()
  pool = pinned_pool(workers)
  try:
    while pending or running:
      for job in list(pending):
        if len(running) >= workers:
          break
        if job.after is None or job.after.finished():
          try:
            future = pool.submit(job.fn, *job.args)
          except BrokenProcessPool:
            if not running:  # nothing ran on it: the pool cannot start its workers
              raise
            break  # a worker died since the last wait: the next wait returns at once and the pool is replaced
          pending.remove(job)
          running[id(job)] = (job, future)
          print(f"started {job}", flush=True)
        elif not any(job.after is j for j in pending) and not any(job.after is j for j, _ in running.values()):
          pending.remove(job)
          failures.append(f"{job}: not run ({job.after} is not finished and not among these jobs, or failed)")
      futures.wait([future for _, future in running.values()], return_when=futures.FIRST_COMPLETED)
      done = [k for k, (_, future) in running.items() if future.done()]
      restart = any(isinstance(running[k][1].exception(), BrokenProcessPool) for k in done)
      if restart:
        pool.shutdown(wait=True)  # every job running on the broken pool has ended with it
        done = list(running)
      for key in done:
        job, future = running.pop(key)
        try:
          results[key] = future.result()
          print(f"finished {job}", flush=True)
        except BrokenProcessPool:
          broken[key] += 1
          if broken[key] <= RESTARTS:
            pending.insert(0, job)
            print(f"restarting {job}: its pool broke (a worker died)", flush=True)
            continue
          failures.append(f"{job}: its pool broke under it {broken[key]} times")
          print(f"FAILED {failures[-1]}", flush=True)
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the others
          failures.append(f"{job}: {type(e).__name__}: {e}")
          print(f"FAILED {failures[-1]}", flush=True)
        on_finished(failures)
      if restart:
        pool = pinned_pool(workers)
  except BaseException:
    _abandon(pool)
    raise
  pool.shutdown(wait=True)
  return [results.get(id(j)) for j in job_list], failures


def run_pool(jobs: Sequence[tuple[Callable, tuple]], workers: int) -> list:
  """fn(*args) for every job (`run_jobs`, without files or order between them), results in job order; raises
  RuntimeError listing the jobs that failed once every other one has run."""
  results, failures = run_jobs([Job(f"job {i} ({fn.__name__})", None, fn, args) for i, (fn, args) in
                                enumerate(jobs)], workers)
  if failures:
    raise RuntimeError("run_pool: " + "; ".join(failures))
  return results


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
