"""Consecutive 2-process runs of the smoke config on this machine (4 CPU devices per process, gloo collectives, a
checkpoint every 4 steps), counting the runs that stall: a process still running and both logs silent for --quiet_s
seconds (or the run past --limit_s). A stalled run's processes get their CPU use over 10 s measured (a blocked
process uses none, a spinning one a core), their Python stacks (py-spy) and every thread's native stack (gdb)
dumped next to their logs, when those tools are installed, then are killed; the record keeps what the native
stacks show (launch/process_pairs.py). --pjrt_nproc sets XLA's CPU client pool instead of scaleattn's reserve;
--load_processes starts that many CPU-bound NumPy loops (a core each) at the runs' own priority beside every run,
as a test suite's other worker loads the machine.

  PYTHONPATH=. python launch/multiprocess_soak.py --runs=30 --workdir=workdirs/soak \
      --out=launch/results/multiprocess_soak.json

The watchdog's timeouts are raised past --quiet_s so that a stall is caught here, stacks and all, before the
watchdog would end it. The record lists every run (seconds, exit statuses, stalled or not) with the commit.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

from launch import grid_runs, process_pairs

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 30, "Consecutive 2-process runs.")
flags.DEFINE_string("workdir", "workdirs/soak", "Where the runs' workdirs, logs and stack dumps go.")
flags.DEFINE_float("quiet_s", 90.0, "A run whose logs have not grown for this long while both processes live stalled.")
flags.DEFINE_float("limit_s", 600.0, "A run not finished after this long counts as stalled too.")
flags.DEFINE_integer("steps", 12, "Training steps per run.")
flags.DEFINE_integer("checkpoint_every", 4, "Checkpoint interval in steps.")
flags.DEFINE_integer("pjrt_nproc", 0, "PJRT_NPROC for the runs (XLA's CPU client pool); 0: as scaleattn sets it.")
flags.DEFINE_integer("load_processes", 0, "CPU-bound processes running beside every run, at its priority.")
flags.DEFINE_string("out", "", "JSON record to write (rewritten after every run).")

def _start(data_dir: str, workdir: str) -> list[subprocess.Popen]:
  port, steps = process_pairs.free_port(), FLAGS.steps
  flags_ = [f"--config={os.path.join(process_pairs.REPO, 'configs', 'shapes.py')}:smoke", f"--workdir={workdir}",
            f"--config.dataset.data_dir={data_dir}", f"--config.train.num_steps={steps}",
            f"--config.train.eval_every_steps={steps}",
            f"--config.train.checkpoint_every_steps={FLAGS.checkpoint_every}",
            "--config.train.keep_checkpoints=3", "--config.eval.num_examples=0", "--compilation_cache_dir=",
            "--config.distributed.heartbeat_timeout_seconds=4", "--config.distributed.shutdown_timeout_seconds=22",
            f"--config.train.step_timeout_seconds={int(4 * FLAGS.quiet_s)}",
            f"--config.train.first_steps_timeout_seconds={int(8 * FLAGS.quiet_s)}",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  env = process_pairs.cpu_env(4, FLAGS.pjrt_nproc or None)
  procs = []
  for i in range(2):
    with open(f"{workdir}.process_{i}.log", "w") as log:  # the child keeps its own descriptor
      procs.append(subprocess.Popen([sys.executable, "-m", "scaleattn.main", *flags_, f"--process_id={i}"],
                                    cwd=process_pairs.REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _start_load() -> list[subprocess.Popen]:
  """--load_processes NumPy loops, one core each (single-threaded BLAS)."""
  loop = "import numpy as np\na = np.ones((512, 512), np.float32)\nwhile True:\n  a = np.tanh(a @ a * 1e-3)"
  env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
  return [subprocess.Popen([sys.executable, "-c", loop], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL) for _ in range(FLAGS.load_processes)]


def _cpu_seconds(pid: int) -> float:
  with open(f"/proc/{pid}/stat") as f:
    return process_pairs.cpu_seconds(f.read())


def _cpu_share(procs: list[subprocess.Popen], seconds: float = 10.0) -> list[float | None]:
  """Each live process's CPU use over `seconds`, in cores (None: it had exited)."""
  try:
    before = [_cpu_seconds(p.pid) if p.poll() is None else None for p in procs]
    time.sleep(seconds)
    return [None if b is None or p.poll() is not None else (_cpu_seconds(p.pid) - b) / seconds
            for p, b in zip(procs, before, strict=True)]
  except FileNotFoundError:
    return [None] * len(procs)


def _dump_stacks(procs: list[subprocess.Popen], workdir: str) -> tuple[list[str], list[dict]]:
  """Each live process's Python stacks (py-spy) and native stacks (gdb) beside its log, and what the native show."""
  paths, live = [], [(i, p) for i, p in enumerate(procs) if p.poll() is None]
  if shutil.which("py-spy"):
    for i, p in live:
      with open(f"{workdir}.python_stacks_{i}.txt", "w") as f:
        subprocess.run(["py-spy", "dump", "--pid", str(p.pid)], stdout=f, stderr=subprocess.STDOUT, timeout=300,
                       check=False)
      paths.append(f"{workdir}.python_stacks_{i}.txt")
  native = process_pairs.dump_native_stacks({p.pid: f"{workdir}.native_stacks_{i}.txt" for i, p in live})
  summaries = []
  for path in native:
    with open(path) as f:
      summaries.append(process_pairs.native_stack_summary(f.read()))
  return paths + native, summaries


def one_run(data_dir: str, workdir: str) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  start = time.time()
  load = _start_load()
  try:
    procs = _start(data_dir, workdir)
    sizes, changed, stalled, stacks, native, cpu = None, time.time(), False, [], [], []
    while any(p.poll() is None for p in procs):
      time.sleep(2)
      now = [os.path.getsize(f"{workdir}.process_{i}.log") for i in range(2)]
      if now != sizes:
        sizes, changed = now, time.time()
      if time.time() - changed > FLAGS.quiet_s or time.time() - start > FLAGS.limit_s:
        stalled, cpu = True, _cpu_share(procs)
        stacks, native = _dump_stacks(procs, workdir)
        for p in procs:
          p.kill()
          p.wait()
        break
  finally:
    for p in load:
      p.kill()
      p.wait()
  codes = [p.returncode for p in procs]
  return {"seconds": time.time() - start, "exit_codes": codes, "stalled": stalled,
          "ok": not stalled and codes == [0, 0], "stacks": [os.path.basename(p) for p in stacks],
          "native_stacks": native, "stalled_cpu_cores": cpu}


def main(argv):
  del argv
  from configs import shapes  # noqa: PLC0415
  from scaleattn.data import input_pipeline  # noqa: PLC0415
  os.makedirs(FLAGS.workdir, exist_ok=True)
  data_dir = os.path.abspath(os.path.join(FLAGS.workdir, "data"))
  config = shapes.get_config("smoke")
  config.dataset.data_dir = data_dir
  input_pipeline.create_datasets(config)  # prepared once, before the processes read it
  record = {"command": " ".join(["PYTHONPATH=. python launch/multiprocess_soak.py", *sys.argv[1:]]),
            "commit": grid_runs.commit(), "machine": grid_runs.machine(),
            "load_processes": FLAGS.load_processes, "pjrt_nproc": FLAGS.pjrt_nproc or "scaleattn's",
            "runs": []}
  for k in range(FLAGS.runs):
    run = {"run": k, **one_run(data_dir, os.path.abspath(os.path.join(FLAGS.workdir, f"run{k}")))}
    print(json.dumps(run), flush=True)
    record["runs"].append(run)
    record["summary"] = {"runs": len(record["runs"]), "ok": sum(r["ok"] for r in record["runs"]),
                         "stalled": sum(r["stalled"] for r in record["runs"]),
                         "max_seconds": max(r["seconds"] for r in record["runs"])}
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
  app.run(main)
