"""Every thread's native stack of a live process (gdb, when installed), and what such a dump shows of XLA's CPU
client: launch threads blocked on a device's full queue of unfinished programs, threads in gloo's all-reduce, the
Python thread waiting in Execute (the 2-process CPU deadlock, docs/reliability.md)."""
from __future__ import annotations

import shutil
import subprocess


def dump(pid: int, path: str) -> bool:
  """Writes `thread apply all bt` of process `pid` to `path`; False when gdb is not installed."""
  if not shutil.which("gdb"):
    return False
  with open(path, "w") as f:
    subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 16"], stdout=f,
                   stderr=subprocess.STDOUT, timeout=300, check=False)
  return True


def summary(path: str) -> dict:
  """Counts in a dump: threads, threads blocked launching on a full device queue, threads in gloo's all-reduce,
  and whether the Python (first) thread waits in Execute."""
  with open(path) as f:
    text = f.read()
  main_thread = text[text.find("\nThread 1 "):]
  return {"threads": text.count("\nThread ") + text.startswith("Thread "),
          "launch_blocked_on_full_queue": text.count("Semaphore::ScopedAcquire"),
          "in_gloo_allreduce": text.count(" in gloo::allreduce"),
          "python_thread_in_execute": "LoadedExecutable::Execute" in main_thread}
