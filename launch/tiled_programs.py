"""How many programs predicting images of many sizes compiles: `--sizes` random sizes, all larger than
config.input.eval_size (so each runs tiled, as `--mode=predict` runs it), through one `predict.Predictor`.

  PYTHONPATH=. python launch/tiled_programs.py --out=launch/results/tiled_programs_cpu.json

Records the compilations JAX logs (`jax_log_compiles`) after the first 2 sizes and after all of them, the tiled
forward's own count and compile time, and seconds per image after the first two. The parameters are the model's
random initialisation (compilation does not depend on them) unless `--workdir` names a trained run.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from scaleattn import checkpointing
from scaleattn.experiment import build_experiment
from scaleattn.inference import predict
from scaleattn.perf.environment import environment

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/shapes.py", "The model's config.", lock_config=False)
flags.DEFINE_string("workdir", "", "A trained run (its latest checkpoint); default: random parameters.")
flags.DEFINE_integer("sizes", 20, "Distinct image sizes.")
flags.DEFINE_integer("largest", 4, "The largest side, in multiples of eval_size.")
flags.DEFINE_string("out", "launch/results/tiled_programs_cpu.json", "JSON file to write.")


def main(argv):
  del argv
  config = FLAGS.config
  exp = build_experiment(config)
  params = (checkpointing.restore_weights(exp, FLAGS.workdir)[0] if FLAGS.workdir
            else exp.init_state(jax.random.key(0)).weights)
  size = config.input.eval_size
  sizes = []
  rng = np.random.default_rng(0)
  while len(sizes) < FLAGS.sizes:
    candidate = tuple(int(n) for n in rng.integers(size + 1, FLAGS.largest * size + 1, 2))
    if candidate not in sizes:
      sizes.append(candidate)
  records: list[str] = []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record.getMessage())
  logging.getLogger("jax").addHandler(handler)
  predictor = predict.Predictor(exp, params)
  counts, seconds = [], []
  with jax.log_compiles(True):
    for h, w in sizes:
      image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
      start = time.perf_counter()
      predictor.image(image)
      seconds.append(time.perf_counter() - start)
      counts.append(sum("Finished XLA compilation" in r for r in records))
  tiled = predictor.plan.tiled
  doc = {**environment(), "command": " ".join(["PYTHONPATH=. python launch/tiled_programs.py", *sys.argv[1:]]),
         "eval_size": size, "tile": tiled.tile, "overlap": tiled.overlap, "tiles_per_step": tiled.tiles_per_step,
         "scales": list(exp.eval_model.scales), "sizes": [list(s) for s in sizes],
         "jax_compilations_after_each_image": counts, "programs": tiled.programs, "compile_s": tiled.compile_s,
         "seconds_per_image_after_two": float(np.median(seconds[2:])), "first_two_images_s": seconds[:2]}
  with open(FLAGS.out, "w") as f:
    json.dump(doc, f, indent=2)
  print(json.dumps(doc, indent=2))


if __name__ == "__main__":
  app.run(main)
