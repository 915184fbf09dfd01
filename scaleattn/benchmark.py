"""`python -m scaleattn.benchmark`: the speed and memory record (scaleattn/perf/measure.py)."""
from absl import app

from scaleattn.perf.measure import main

if __name__ == "__main__":
  app.run(main)
