"""The launchers' worker pool when a worker dies mid-job (its step watchdog exits 75, the machine kills it): the job
starts again on a new pool, a job that keeps dying fails after grid_runs.RESTARTS restarts, and nothing waits
forever (multiprocessing.Pool left such a job pending without end)."""
import os

import pool_probe
import pytest

from launch import grid_runs


def test_run_pool_restarts_a_job_whose_worker_died(tmp_path):
  marker = str(tmp_path / "died")
  assert grid_runs.run_pool([(pool_probe.dies_once, (marker,)), (pool_probe.square, (3,))], workers=1) == ["done", 9]
  assert os.path.exists(marker)


def test_run_pool_gives_up_on_a_job_that_always_dies():
  with pytest.raises(RuntimeError, match=f"job 0 \\(always_dies\\): its pool broke under it {grid_runs.RESTARTS + 1} "
                                         "times"):
    grid_runs.run_pool([(pool_probe.always_dies, ())], workers=1)


def test_only_the_jobs_running_when_a_pool_breaks_are_charged(tmp_path):
  """Five jobs that each die once, one at a time: five broken pools, none charged more than once."""
  jobs = [(pool_probe.dies_once, (str(tmp_path / f"died_{i}"),)) for i in range(grid_runs.RESTARTS + 2)]
  assert grid_runs.run_pool([*jobs, (pool_probe.square, (4,))], workers=1) == ["done"] * len(jobs) + [16]


def test_grid_jobs_restart_after_a_dead_worker_and_a_dead_end_skips_its_dependants(tmp_path):
  out = {name: str(tmp_path / f"{name}.done") for name in ("first", "after_first", "dying")}
  first = grid_runs.Job("first", 0, pool_probe.dies_once, (str(tmp_path / "marker"), out["first"]), (out["first"],))
  after_first = grid_runs.Job("after_first", 0, pool_probe.dies_once, (out["first"], out["after_first"]),
                       (out["after_first"],), first)
  dying = grid_runs.Job("dying", 1, pool_probe.always_dies, (), (out["dying"],))
  orphan = grid_runs.Job("orphan", 1, pool_probe.square, (2,), (str(tmp_path / "never"),), dying)
  reports = []
  _, failures = grid_runs.run_jobs([first, after_first, dying, orphan], 1, lambda f: reports.append(list(f)))
  assert os.path.exists(out["first"]) and os.path.exists(out["after_first"])
  assert failures == [f"dying seed 1: its pool broke under it {grid_runs.RESTARTS + 1} times",
                      "orphan seed 1: not run (dying seed 1 is not finished and not among these jobs, or failed)"]
  assert len(reports) == 3  # after 'first', 'after_first' and the end of 'dying'
