"""Where the benchmark's peak-memory figure comes from: with the cases in one process each reports its program's
buffer assignment; with a process per case (what GPUs and TPUs get) the device's own peak is each case's."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from configs import shapes
from scaleattn.inference.memory import memory_analysis
from scaleattn.perf import measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_case_in_its_own_process_reports_its_own_device_peak(tmp_path):
  """On a device whose allocator peak counts everything since the process started (faked by
  tests/fake_device_peak.py), a small case run after a big one would report the big one's peak; with
  --case_processes=each every case runs in a fresh process and reports its own: the small case's equals the buffer
  assignment of its own step, compiled here."""
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fake_device_peak.py"),
                  "--config=configs/shapes.py:smoke", "--steps=1", "--scales=1", "--scale_execution=loop",
                  "--batch_size=8", "--microbatches=1,4", "--eval_batch_size=0", "--case_processes=each",
                  f"--out={out}"], cwd=ROOT, check=True, capture_output=True, timeout=600,
                 env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  record = json.loads(out.read_text())
  assert record["case_processes"] == "each"
  big, small = record["cases"]  # in this order: one microbatch, then four
  assert (big["microbatches"], small["microbatches"]) == (1, 4)
  assert big["peak_memory_source"] == small["peak_memory_source"] == "device"
  config = shapes.get_config("smoke")
  config.model.scales, config.train.batch_size, config.train.microbatches = (1.0,), 8, 4
  own = memory_analysis(measure.train_runner(config, compile_only=True).compiled)["total_bytes"]
  assert small["peak_memory_bytes"] == own < 0.8 * big["peak_memory_bytes"]


def test_cases_sharing_a_process_report_their_programs_bytes_not_the_device_peak(monkeypatch):
  """In one process the device's peak is the largest case's so far: a case reports its program's buffer assignment
  instead, and the device's own peak only when it ran alone."""
  compiled = jax.jit(lambda x: x * 2).lower(jnp.ones((256, 256))).compile()
  monkeypatch.setattr(measure, "device_memory_stats", lambda: {"peak_bytes_in_use": 10 ** 12})
  assert measure._peak_memory(compiled, alone=False) == {
      "peak_memory_bytes": memory_analysis(compiled)["total_bytes"], "peak_memory_source": "xla_buffer_assignment"}
  assert measure._peak_memory(compiled, alone=True) == {"peak_memory_bytes": 10 ** 12, "peak_memory_source": "device"}
