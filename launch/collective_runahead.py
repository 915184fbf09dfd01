"""The 2-process CPU stall, reproduced without a model: 2 processes x 4 CPU devices (gloo) dispatch a program with an
all-reduce and a second one reducing its output, --iterations times without waiting, as a training loop runs ahead
of a loaded machine. Each setting of XLA's CPU client pool is tried --runs times, alternating; a run whose processes
are still alive after --timeout_s stalled (both are then killed, after their native stacks are dumped with gdb when
it is installed; the record counts the threads waiting where the deadlock waits).

  PYTHONPATH=. python launch/collective_runahead.py --runs=5 --out=launch/results/collective_runahead.json

Settings: 'project' (what `scaleattn.training.distributed.initialize` sets: PJRT_NPROC = max(cores, 2 x devices))
and 'xla_default' (PJRT_NPROC = max(cores, devices): the pool XLA sizes by itself).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from absl import app, flags

from launch import native_stacks

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 5, "Runs per setting.")
flags.DEFINE_integer("iterations", 400, "Pairs of programs each process dispatches before it waits.")
flags.DEFINE_float("timeout_s", 90.0, "A run not finished by then stalled.")
flags.DEFINE_string("stacks_dir", "workdirs/collective_runahead", "Where a stalled run's gdb stacks go ('': not "
                    "dumped); the record keeps what they show.")
flags.DEFINE_string("out", "", "JSON record to write.")
flags.DEFINE_integer("process_id", -1, "Internal: run as process PROCESS_ID of the pair.")
flags.DEFINE_string("coordinator", "", "Internal: the pair's coordinator address.")

DEVICES = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child() -> None:
  """One process of the pair: start the runtime as scaleattn does, then dispatch without waiting."""
  import jax  # noqa: PLC0415 - the environment is set by the driver
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: PLC0415

  from scaleattn.training import distributed  # noqa: PLC0415
  distributed.initialize(FLAGS.coordinator, 2, FLAGS.process_id)
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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def one_run(pool: int | None, timeout_s: float, iterations: int, stacks: str = "") -> dict:
  """A pair of processes with PJRT_NPROC=`pool` (None: as the project sets it); whether it finished in time."""
  env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", **({} if pool is None else {"PJRT_NPROC": str(pool)}))
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--process_id={i}",
                             f"--coordinator={address}", f"--iterations={iterations}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  start = time.time()
  while any(p.poll() is None for p in procs) and time.time() - start < timeout_s:
    time.sleep(1)
  seconds, stalled = time.time() - start, any(p.poll() is None for p in procs)
  summaries = []
  if stalled:
    for i, p in enumerate(procs):
      if stacks and p.poll() is None and native_stacks.dump(p.pid, f"{stacks}.process_{i}.txt"):
        summaries.append(native_stacks.summary(f"{stacks}.process_{i}.txt"))
      p.kill()
  outputs = [p.communicate()[0] for p in procs]
  done = [line for out in outputs for line in out.splitlines() if line.startswith("done in")]
  return {"seconds": round(seconds, 1), "stalled": stalled, "exit_codes": [p.returncode for p in procs],
          "finished": done, "stacks": summaries, "output_tail": [] if len(done) == 2 else [out[-2000:] for out in outputs]}


def main(argv) -> None:
  del argv
  if FLAGS.process_id >= 0:
    child()
    return
  cores = len(os.sched_getaffinity(0))
  settings = {"project": None, "xla_default": max(cores, DEVICES)}
  record = {"command": " ".join(["PYTHONPATH=. python launch/collective_runahead.py", *sys.argv[1:]]),
            "cores": cores, "devices_per_process": DEVICES, "iterations": FLAGS.iterations,
            "timeout_s": FLAGS.timeout_s, "settings": {k: v or f"max(cores, 2 x devices) = {max(cores, 2 * DEVICES)}"
                                                       for k, v in settings.items()}, "runs": []}
  from launch import grid_runs  # noqa: PLC0415
  record.update(commit=grid_runs.commit(), machine=grid_runs.machine())
  if FLAGS.stacks_dir:
    os.makedirs(FLAGS.stacks_dir, exist_ok=True)
  for k in range(FLAGS.runs):
    for name, pool in settings.items():
      stacks = os.path.join(FLAGS.stacks_dir, f"{name}_{k}") if FLAGS.stacks_dir else ""
      run = {"setting": name, "run": k, **one_run(pool, FLAGS.timeout_s, FLAGS.iterations, stacks)}
      print(json.dumps({key: v for key, v in run.items() if key != "output_tail"}), flush=True)
      record["runs"].append(run)
  record["summary"] = {name: {"runs": sum(r["setting"] == name for r in record["runs"]),
                              "stalled": sum(r["setting"] == name and r["stalled"] for r in record["runs"])}
                       for name in settings}
  print(json.dumps(record["summary"]), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  app.run(main)
