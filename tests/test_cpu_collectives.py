"""XLA's CPU client with several devices per process: the thread reserve scaleattn gives it, and the 2-process loop
that deadlocked without it (launch/collective_runahead.py; with XLA's own pool size the same loop stalled in every
run recorded in launch/results/collective_runahead.json)."""
import os

from launch import collective_runahead
from scaleattn.training import distributed


def test_the_reserve_is_twice_the_forced_devices_and_never_overrides(monkeypatch):
  cores = len(os.sched_getaffinity(0))
  monkeypatch.delenv("PJRT_NPROC", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=3")
  distributed.reserve_cpu_client_threads()
  assert os.environ["PJRT_NPROC"] == str(max(cores, 6))
  monkeypatch.setenv("PJRT_NPROC", "5")
  distributed.reserve_cpu_client_threads()
  assert os.environ["PJRT_NPROC"] == "5"
  monkeypatch.delenv("PJRT_NPROC")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  distributed.reserve_cpu_client_threads()
  assert "PJRT_NPROC" not in os.environ


def test_two_processes_dispatching_far_ahead_finish(monkeypatch):
  """400 pairs of all-reducing programs dispatched without waiting, 2 processes x 4 CPU devices, gloo."""
  monkeypatch.delenv("PJRT_NPROC", raising=False)
  run = collective_runahead.one_run(None, timeout_s=180, iterations=400)
  pool = max(len(os.sched_getaffinity(0)), 2 * collective_runahead.DEVICES)
  assert not run["stalled"] and run["exit_codes"] == [0, 0], run
  assert all(line.endswith(f"PJRT_NPROC={pool}") for line in run["finished"]) and len(run["finished"]) == 2, run
