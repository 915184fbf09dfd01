"""The benchmark CLI writes the record the README's performance table is built from: one case per scale set x
precision x scale-execution path (train, then eval), with self-consistent rates and a memory figure no smaller
than the training state it must hold."""
import gzip
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import shapes
from scaleattn.experiment import build_experiment
from scaleattn.perf import measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"name", "scales", "fusion", "batch_size", "precision", "scale_execution", "median_step_s",
            "images_per_s", "gflops_per_s", "peak_gflops_per_s", "compile_s", "gflop_per_step", "peak_memory_bytes",
            "model_gflop_per_step", "model_gflops_per_s", "datasheet_peak_gflops_per_s", "mfu"}


def test_benchmark_cli_writes_one_consistent_case_per_configuration(tmp_path):
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, "-m", "scaleattn.benchmark", "--config=configs/shapes.py:smoke", "--steps=2",
                  "--scales=1,1-0.5", "--scale_execution=loop,vmap", "--precision=float32", "--batch_size=4",
                  "--eval_batch_size=4", f"--out={out}", f"--profile_dir={tmp_path / 'profile'}",
                  "--profile_steps=2"], cwd=ROOT, check=True, capture_output=True, timeout=600,
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
    np.testing.assert_allclose(c["model_gflops_per_s"], c["model_gflop_per_step"] / c["median_step_s"], rtol=1e-9)
    assert c["mfu"] is None and c["datasheet_peak_gflops_per_s"] is None  # a CPU has no data-sheet peak here
    assert c["devices"] == jax.device_count()  # the mesh spans every (fake) device; rates are the whole step's
  assert cases["train-2scale-attention-loop-float32"]["scales"] == [1.0, 0.5]
  # More scales mean more work; the padded vmap path does the 0.5 scale's work at full size.
  assert cases["train-2scale-attention-loop-float32"]["gflop_per_step"] > cases["train-1scale-none-loop-float32"][
      "gflop_per_step"]
  assert cases["train-2scale-attention-vmap-float32"]["gflop_per_step"] > cases[
      "train-2scale-attention-loop-float32"]["gflop_per_step"]
  # The model's count is the same network either way; XLA's count of the plain single-scale step (no Winograd at
  # these widths) is its convolutions plus a little elementwise work.
  assert cases["train-2scale-attention-vmap-float32"]["model_gflop_per_step"] == cases[
      "train-2scale-attention-loop-float32"]["model_gflop_per_step"]
  single = cases["train-1scale-none-loop-float32"]
  assert 0.95 < single["gflop_per_step"] / single["model_gflop_per_step"] < 1.2
  # The step holds at least its parameters and Adam's two moments (float32), counted here from the state tree.
  config = shapes.get_config("smoke")
  config.train.batch_size = 4
  params = build_experiment(config).init_state(jax.random.key(0)).params
  state_bytes = 3 * 4 * sum(x.size for x in jax.tree.leaves(params))
  assert cases["train-2scale-attention-loop-float32"]["peak_memory_bytes"] >= state_bytes
  assert record["cases"] and record["jax"] == jax.__version__
  # Every case was traced, and the trace accounts for a real share of its step time.
  for c in cases.values():
    by_kind = c["ms_per_step_by_op_kind"]
    assert by_kind and min(by_kind.values()) > 0, c["name"]
    assert sum(by_kind.values()) > 0.2 * 1e3 * c["median_step_s"], c["name"]
    assert (tmp_path / "profile" / c["name"]).is_dir()


def test_memory_only_cases_record_the_step_memory_per_microbatch_count_and_remat(tmp_path):
  """XLA's buffer assignment of the train step per microbatch count and remat setting, compiled, never run: slicing
  the batch shrinks the temporaries a step needs. (XLA:CPU drops the optimisation barriers that keep
  rematerialisation from being undone, so on CPU remat shows no saving; the cases are still recorded.)"""
  out = tmp_path / "memory.json"
  subprocess.run([sys.executable, "-m", "scaleattn.benchmark", "--config=configs/shapes.py:smoke", "--memory_only",
                  "--scales=1-0.5", "--scale_execution=loop", "--batch_size=8", "--microbatches=1,4",
                  "--remat=per_block", "--config.model.conv_impl=xla", f"--out={out}"], cwd=ROOT, check=True,
                 capture_output=True, timeout=600,
                 env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  record = json.loads(out.read_text())
  temp = {(c["microbatches"], c["remat"]): c["memory"]["temp_size_in_bytes"] for c in record["cases"]}
  assert sorted(temp) == [(1, "per_block"), (4, "per_block")]
  assert temp[(4, "per_block")] < 0.75 * temp[(1, "per_block")]
  for c in record["cases"]:
    m = c["memory"]
    assert m["total_bytes"] == (m["argument_size_in_bytes"] + m["output_size_in_bytes"] + m["temp_size_in_bytes"]
                                - m["alias_size_in_bytes"])
    assert "median_step_s" not in c
  assert "--memory_only" in record["command"]


@pytest.mark.parametrize("kind, precision, gflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e3), ("NVIDIA H100 PCIe", "bfloat16", 756.5e3),
    ("NVIDIA H200", "bfloat16", 989.4e3), ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e3),
    ("TPU v5 lite", "bfloat16", 197e3), ("TPU v5", "bfloat16", 459e3), ("TPU v4", "bfloat16", 275e3),
    ("NVIDIA H100 80GB HBM3", "float32", None), ("cpu", "bfloat16", None)])
def test_datasheet_peak_tells_device_variants_apart(kind, precision, gflops):
  """NVIDIA's and Google's published dense bf16 peaks; a PCIe H100 or a v5e is not taken for its bigger sibling."""
  assert measure.datasheet_peak_gflops(kind, precision) == gflops


def test_time_by_op_kind_sums_complete_events_of_the_programs_instructions(tmp_path):
  hlo = """HloModule m
  %fusion.1 = f32[4]{0} fusion(%p), kind=kLoop, calls=%c1
  %fusion.12 = f32[4]{0} fusion(%p), kind=kLoop, calls=%c2
  ROOT %convolution.3 = f32[4]{0} convolution(%a, %b)
"""
  events = [
      {"ph": "X", "name": "fusion.1", "ts": 0, "dur": 3000},
      {"ph": "X", "name": "fusion.12", "ts": 5, "dur": 1000},
      {"ph": "X", "name": "fusion.1", "ts": 9000, "dur": 2000},
      {"ph": "X", "name": "kernel_abc", "args": {"hlo_op": "convolution.3"}, "ts": 0, "dur": 8000},
      {"ph": "X", "name": "$python frame", "ts": 0, "dur": 99000},  # not an instruction
      {"ph": "X", "name": "fusion.7", "ts": 0, "dur": 99000},  # not in this program
      {"ph": "i", "name": "fusion.1", "ts": 0},  # an instant, no duration
  ]
  trace_dir = tmp_path / "plugins" / "profile" / "run"
  trace_dir.mkdir(parents=True)
  with gzip.open(trace_dir / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  # Two traced steps: fusion 3 + 1 + 2 ms, convolution 8 ms, halved.
  assert measure.time_by_op_kind(str(tmp_path), hlo, steps=2) == {"convolution": 4.0, "fusion": 3.0}


def test_inference_runner_records_each_program_of_whole_and_tiled_prediction():
  """The benchmark's two prediction paths run; the tiled path's tile step is the same program for two image sizes
  larger than a tile, and what grows with the image (about 4x for 4x the pixels) is the host memory it holds between
  its steps."""
  config = shapes.get_config("smoke")
  config.eval.tile_overlap = 32
  whole, whole_bytes, whole_host, _ = measure.inference_runner(config, 90, 150, 0)
  tiled, tiled_bytes, tiled_host, _ = measure.inference_runner(config, 360, 600, 129)  # scale 0.5 too is larger
  _, larger_bytes, larger_host, _ = measure.inference_runner(config, 720, 1200, 129)
  assert set(whole_bytes) == {"whole"} and whole_host == 0
  assert set(tiled_bytes) == {"tile_step", "fuse_window", "upsample_window"}
  assert tiled_bytes["tile_step"] == larger_bytes["tile_step"] > 0
  assert 3.5 < larger_host / tiled_host < 4.5
  assert tiled.compile_s > 0 and whole.compile_s > 0
  whole.run()
  tiled.run()
