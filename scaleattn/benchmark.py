"""`python -m scaleattn.benchmark`: the speed and memory record (scaleattn/perf/benchmark.py)."""
from absl import app

from scaleattn.perf.benchmark import main

if __name__ == "__main__":
  app.run(main)
