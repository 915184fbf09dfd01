"""The 2-process CPU stall, reproduced without a model: 2 processes x 4 CPU devices (gloo) dispatch a program with an
all-reduce and a second one reducing its output, --iterations times without waiting, as a training loop runs ahead
of a loaded machine (--processes=1: one process of 4 devices, the same loop). Each setting of XLA's CPU client pool
is tried --runs times, alternating; a run whose processes are all still alive after --timeout_s stalled (they are
then killed, after their native stacks are dumped with gdb when it is installed; the record counts the threads
waiting where the deadlock waits); one that exits with an error crashed.

  PYTHONPATH=. python launch/collective_runahead.py --runs=5 --out=launch/results/collective_runahead.json

Settings: 'project' (what `scaleattn.training.distributed.initialize` sets: PJRT_NPROC = max(cores, 2 x devices))
and 'xla_default' (PJRT_NPROC = max(cores, devices): the pool XLA sizes by itself).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from launch import grid_runs, process_pairs

FLAGS = flags.FLAGS
DEVICES = 4


def define_flags() -> None:
  """The command line's flags, defined only when this file runs (importers such as the tests define their own)."""
  flags.DEFINE_integer("runs", 5, "Runs per setting.")
  flags.DEFINE_integer("processes", 2, "Processes per run (1 or 2), each of 4 CPU devices.")
  flags.DEFINE_integer("iterations", 400, "Pairs of programs each process dispatches before it waits.")
  flags.DEFINE_float("timeout_s", 90.0, "A run not finished by then stalled.")
  flags.DEFINE_string("workdir", "workdirs/collective_runahead", "Where the processes' logs and a stalled run's "
                      "native stacks go; the record keeps what the stacks show.")
  flags.DEFINE_string("out", "", "JSON record to write.")
  flags.DEFINE_integer("process_id", -1, "Internal: run as process PROCESS_ID of the pair.")
  flags.DEFINE_string("coordinator", "", "Internal: the pair's coordinator address.")


def child() -> None:
  """One process of the pair: start the runtime as scaleattn does, then dispatch without waiting."""
  import jax  # noqa: PLC0415 - the environment is set by the driver
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: PLC0415

  from scaleattn.training import distributed  # noqa: PLC0415
  distributed.initialize(FLAGS.coordinator if FLAGS.processes > 1 else "", FLAGS.processes, FLAGS.process_id)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rows, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
  x = jax.make_array_from_process_local_data(rows, np.ones((DEVICES, 128, 128), np.float32))
  step = jax.jit(lambda x: jnp.tanh(x @ x * 1e-3 + x.mean(0)), out_shardings=rows)  # all-reduce of the mean
  total = jax.jit(jnp.sum, out_shardings=replicated)  # another all-reduce, like a step's metrics
  start, sums = time.perf_counter(), []
  for _ in range(FLAGS.iterations):
    x = step(x)
    sums.append(total(x))
  jax.block_until_ready((x, sums))
  print(f"done in {time.perf_counter() - start:.1f} s with PJRT_NPROC={os.environ.get('PJRT_NPROC')}", flush=True)


def one_run(pool: int | None, timeout_s: float, iterations: int, logs: str, processes: int = 2) -> dict:
  """`processes` processes with PJRT_NPROC=`pool` (None: as scaleattn sets it), their output in
  `logs`.process_I.log: 'stalled' when all are still alive after `timeout_s` (their native stacks are then dumped
  beside the logs), 'crashed' when one exited with an error."""
  env = dict(process_pairs.cpu_env(DEVICES, pool), TF_CPP_MIN_LOG_LEVEL="3")
  address = f"127.0.0.1:{process_pairs.free_port()}"
  procs = []
  for i in range(processes):
    with open(f"{logs}.process_{i}.log", "w") as log:  # the child keeps its own descriptor
      procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--process_id={i}",
                                     f"--coordinator={address}", f"--iterations={iterations}",
                                     f"--processes={processes}"], cwd=process_pairs.REPO,
                                    env=env, stdout=log, stderr=subprocess.STDOUT))
  start = time.time()
  while any(p.poll() is None for p in procs) and time.time() - start < timeout_s:
    time.sleep(1)
  seconds, stalled = time.time() - start, all(p.poll() is None for p in procs)
  stacks = []
  for path in process_pairs.dump_native_stacks({p.pid: f"{logs}.stacks_{i}.txt" for i, p in enumerate(procs)}
                                               if stalled else {}):
    with open(path) as f:
      stacks.append(process_pairs.native_stack_summary(f.read()))
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  done = []
  for i in range(processes):
    with open(f"{logs}.process_{i}.log") as f:
      done += [line.strip() for line in f if line.startswith("done in")]
  return {"seconds": round(seconds, 1), "stalled": stalled, "crashed": not stalled and len(done) < processes,
          "exit_codes": [p.returncode for p in procs], "finished": done, "stacks": stacks}


def main(argv) -> None:
  del argv
  if FLAGS.process_id >= 0:
    child()
    return
  cores = len(os.sched_getaffinity(0))
  settings = {"project": None, "xla_default": max(cores, DEVICES)}
  record = {"command": " ".join(["PYTHONPATH=. python launch/collective_runahead.py", *sys.argv[1:]]),
            "cores": cores, "processes": FLAGS.processes, "devices_per_process": DEVICES,
            "iterations": FLAGS.iterations, "timeout_s": FLAGS.timeout_s, "commit": grid_runs.commit(),
            "machine": grid_runs.machine(),
            "settings": {"project": f"scaleattn's reserve, PJRT_NPROC = max(cores, 2 x devices) = "
                                    f"{max(cores, 2 * DEVICES)}",
                         "xla_default": f"XLA's own pool, PJRT_NPROC = max(cores, devices) = {max(cores, DEVICES)}"},
            "runs": []}
  os.makedirs(FLAGS.workdir, exist_ok=True)
  for k in range(FLAGS.runs):
    for name, pool in settings.items():
      run = {"setting": name, "run": k,
             **one_run(pool, FLAGS.timeout_s, FLAGS.iterations, os.path.join(FLAGS.workdir, f"{name}_{k}"),
                      FLAGS.processes)}
      print(json.dumps(run), flush=True)
      record["runs"].append(run)
  record["summary"] = {name: {key: sum(r[key] for r in record["runs"] if r["setting"] == name)
                              for key in ("stalled", "crashed")} | {"runs": FLAGS.runs} for name in settings}
  print(json.dumps(record["summary"]), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
