"""What the 2-process CPU launchers share (multiprocess_soak.py, collective_runahead.py): a free port for the
coordinator, the processes' environment, their CPU time, and every thread's native stack of a process that stalled,
with what such a dump shows of XLA's CPU client (launch threads blocked on a device's full queue of unfinished
programs, threads in an all-reduce, the Python thread waiting in Execute: the deadlock in docs/reliability.md)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(devices: int, pjrt_nproc: int | None = None) -> dict[str, str]:
  """This environment for a process of `devices` CPU devices with gloo collectives, running this checkout;
  PJRT_NPROC (XLA's CPU client pool) is `pjrt_nproc`, or left to scaleattn (`distributed.initialize`)."""
  env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             PYTHONPATH=REPO)
  if pjrt_nproc is not None:
    env["PJRT_NPROC"] = str(pjrt_nproc)
  return env


def cpu_seconds(stat: str) -> float:
  """User + system CPU time, all threads, from a /proc/PID/stat line (the name in parentheses may hold spaces)."""
  fields = stat.rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dump_native_stacks(paths: dict[int, str]) -> list[str]:
  """Writes `thread apply all bt` of every process (pid -> path) at once, so that a pair is stopped together (one
  stopped alone misses its heartbeats and the other is terminated before its turn); returns the paths written."""
  if not shutil.which("gdb"):
    return []
  files = {pid: open(path, "w") for pid, path in paths.items()}  # noqa: SIM115 - closed below
  gdbs = {pid: subprocess.Popen(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 16"], stdout=f,
                                stderr=subprocess.STDOUT) for pid, f in files.items()}
  written = []
  for pid, gdb in gdbs.items():
    try:
      gdb.wait(timeout=300)
      written.append(paths[pid])
    except subprocess.TimeoutExpired:
      gdb.kill()
    files[pid].close()
  return written


def native_stack_summary(text: str) -> dict:
  """Counts in a gdb dump: threads, threads blocked launching on a full device queue, threads inside an
  all-reduce (gloo's between processes, the in-process rendezvous within one), and whether the Python (first)
  thread waits in Execute."""
  main_thread = text[text.find("Thread 1 "):]
  return {"threads": text.count("\nThread ") + text.startswith("Thread "),
          "launch_blocked_on_full_queue": text.count("Semaphore::ScopedAcquire"),
          "in_all_reduce": text.count("AllReduceThunk::Execute("),
          "python_thread_in_execute": "LoadedExecutable::Execute" in main_thread}
