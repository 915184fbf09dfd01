"""The benchmark CLI writes the record the README's performance table is built from: one case per scale set x
precision x scale-execution path (train, then eval), with self-consistent rates and a memory figure no smaller
than the training state it must hold."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from configs import shapes
from scaleattn.state import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"name", "scales", "fusion", "batch_size", "precision", "scale_execution", "median_step_s",
            "images_per_s", "gflops_per_s", "peak_gflops_per_s", "compile_s", "gflop_per_step", "peak_memory_bytes"}


def test_benchmark_cli_writes_one_consistent_case_per_configuration(tmp_path):
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, "-m", "scaleattn.benchmark", "--config=configs/shapes.py:smoke", "--steps=2",
                  "--scales=1,1-0.5", "--scale_execution=loop,vmap", "--precision=float32", "--batch_size=4",
                  "--eval_batch_size=4", f"--out={out}"], cwd=ROOT, check=True, capture_output=True, timeout=600,
                 env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  record = json.loads(out.read_text())
  cases = {c["name"]: c for c in record["cases"]}
  # One scale has no second execution path; two scales are timed both ways; each train case has its eval case.
  assert sorted(cases) == sorted([
      "train-1scale-none-loop-float32", "eval-1scale-none-loop-float32",
      "train-2scale-attention-loop-float32", "eval-2scale-attention-loop-float32",
      "train-2scale-attention-vmap-float32", "eval-2scale-attention-vmap-float32"])
  for c in cases.values():
    assert REQUIRED <= set(c), c["name"]
    assert c["median_step_s"] > 0 and c["peak_gflops_per_s"] > 0
    np.testing.assert_allclose(c["images_per_s"], c["batch_size"] / c["median_step_s"], rtol=1e-9)
    np.testing.assert_allclose(c["gflops_per_s"], c["gflop_per_step"] / c["median_step_s"], rtol=1e-9)
  assert cases["train-2scale-attention-loop-float32"]["scales"] == [1.0, 0.5]
  # More scales mean more work; the padded vmap path does the 0.5 scale's work at full size.
  assert cases["train-2scale-attention-loop-float32"]["gflop_per_step"] > cases["train-1scale-none-loop-float32"][
      "gflop_per_step"]
  assert cases["train-2scale-attention-vmap-float32"]["gflop_per_step"] > cases[
      "train-2scale-attention-loop-float32"]["gflop_per_step"]
  # The step holds at least its parameters and Adam's two moments (float32), counted here from the state tree.
  config = shapes.get_config("smoke")
  config.train.batch_size = 4
  params = build(config).init_state(jax.random.key(0)).params
  state_bytes = 3 * 4 * sum(x.size for x in jax.tree.leaves(params))
  assert cases["train-2scale-attention-loop-float32"]["peak_memory_bytes"] >= state_bytes
  assert record["cases"] and record["jax"] == jax.__version__
