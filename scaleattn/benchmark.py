"""Train-step benchmark: `python -m scaleattn.benchmark --config=configs/voc.py --steps=10 --out=bench.json`.

For each case (scale execution 'loop' and 'vmap', float32 and bfloat16 where asked) it times the jitted train
step on a random batch: median of `--steps` steps after compilation (compile time reported apart), images/s,
achieved GFLOP/s from XLA's cost analysis, and the same machine's measured float32 matmul peak.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from scaleattn import sharding, train
from scaleattn.state import build

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/voc.py", "Model config to time.", lock_config=False)
flags.DEFINE_integer("steps", 10, "Timed steps per case (after one compiling step).")
flags.DEFINE_integer("batch_size", 1, "Global batch size.")
flags.DEFINE_list("scale_execution", ["loop", "vmap"], "Scale-execution paths to time.")
flags.DEFINE_list("precision", ["float32"], "Compute dtypes to time (float32, bfloat16).")
flags.DEFINE_list("scales", [], "Scale sets to time, e.g. '1' and '1-0.75-0.5' (default: the config's).")
flags.DEFINE_string("out", "", "JSON file to write.")


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Measured float32 matmul throughput of the default device: the denominator of the efficiency."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / min(times) / 1e9


def time_case(config, steps: int) -> dict:
  setup = build(config)
  p_train, _ = train.jit_steps(setup)
  crop, b = config.input.crop_size, config.train.batch_size
  rng = np.random.default_rng(0)
  local = {"image": rng.normal(0, 50, (b, crop, crop, 3)).astype(np.float32),
           "label": rng.integers(0, config.model.num_classes, (b, crop, crop)).astype(np.int32)}
  batch = sharding.global_batch(setup.mesh, local)
  state = setup.init_state(jax.random.key(0))
  key = jax.random.key(1)
  t = time.perf_counter()
  compiled = p_train.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  state, m = p_train(state, batch, key)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = p_train(state, batch, key)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  median = float(np.median(times))
  memory = jax.devices()[0].memory_stats() or {}
  return {"median_step_s": median, "min_step_s": float(min(times)), "compile_s": compile_s,
          "images_per_s": b / median, "gflop_per_step": flops / 1e9, "gflops_per_s": flops / median / 1e9,
          "peak_memory_bytes": memory.get("peak_bytes_in_use")}


def main(argv):
  del argv
  base = FLAGS.config
  scale_sets = [tuple(float(s) for s in x.split("-")) for x in FLAGS.scales] or [tuple(base.model.scales)]
  peak = matmul_peak_gflops()
  logging.info("Measured float32 matmul peak: %.1f GFLOP/s", peak)
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
  except OSError:
    commit = ""
  cases = []
  for scales in scale_sets:
    for precision in FLAGS.precision:
      for execution in (FLAGS.scale_execution if len(scales) > 1 else ["loop"]):
        config = base.copy_and_resolve_references()
        config.model.scales, config.model.dtype, config.model.scale_execution = scales, precision, execution
        config.train.batch_size = FLAGS.batch_size
        result = time_case(config, FLAGS.steps)
        case = {"name": f"{len(scales)}scale-{config.model.fusion}-{execution}-{precision}", "scales": list(scales),
                "fusion": config.model.fusion, "extra_supervision": config.loss.extra_supervision,
                "batch_size": FLAGS.batch_size, "crop_size": config.input.crop_size, "precision": precision,
                "scale_execution": execution, "peak_gflops_per_s": peak, **result}
        logging.info("%s", case)
        print(json.dumps(case), flush=True)
        cases.append(case)
  record = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "commit": commit, "xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": cases}
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(record, f, indent=2)


if __name__ == "__main__":
  app.run(main)
