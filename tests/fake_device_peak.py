"""`python -m scaleattn.benchmark` on a fake device that keeps an allocator peak, for tests: its memory_stats report
the largest XLA buffer assignment of any step this process has built, as a GPU's or TPU's `peak_bytes_in_use` counts
every allocation since the process started.

  python tests/fake_device_peak.py [the flags of python -m scaleattn.benchmark]
"""
import runpy
import sys

from scaleattn.inference.memory import memory_analysis
from scaleattn.perf import measure

_peak = 0


def _tracked(build):
  def build_and_track(*args, **kwargs):
    global _peak
    runner = build(*args, **kwargs)
    _peak = max(_peak, memory_analysis(runner.compiled)["total_bytes"])
    return runner
  return build_and_track


measure.train_runner = _tracked(measure.train_runner)
measure.eval_runner = _tracked(measure.eval_runner)
measure.device_memory_stats = lambda: {"peak_bytes_in_use": _peak}
sys.argv[0] = "scaleattn.benchmark"
runpy.run_module("scaleattn.benchmark", run_name="__main__", alter_sys=True)
