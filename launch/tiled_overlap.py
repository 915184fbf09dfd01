"""What the tiles' overlap buys: tiled against whole-image inference of a trained model on large images.

  PYTHONPATH=. python launch/tiled_overlap.py --workdir=W --out=launch/results/tiled_overlap.json

`--images` scale_shapes images of `--size` px, generated as the `small` builder config draws its images (the
same object sizes and outlines, more objects, seeds no split uses), go through the workdir's latest checkpoint
of `--config` whole (the eval-mode model at the image's own size) and tiled at each of `--tiles` x `--overlaps`
(the backbone's exact overlap marked; `config.eval.tiles_per_step` tiles per call). Per setting: the labels'
agreement with the whole image's and the mean and largest |difference| of the fused scores on the output grid,
mIoU of both against the ground truth, the pixels the backbone computes per image pixel, and seconds per image
(median over the images; whole and tiled alternate image by image, after one compiling call each).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from scaleattn import checkpointing
from scaleattn.data import scale_shapes
from scaleattn.experiment import build_experiment
from scaleattn.inference import forward, tiling
from scaleattn.models import resize
from scaleattn.perf.environment import environment

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/shapes.py", "The trained model's config.", lock_config=False)
flags.DEFINE_string("workdir", None, "The trained run (its latest checkpoint).", required=True)
flags.DEFINE_integer("images", 8, "Images generated.")
flags.DEFINE_integer("size", 701, "Their height and width (px).")
flags.DEFINE_integer("objects", 60, "Objects drawn per image, at most.")
flags.DEFINE_integer("seed", 9001, "Generation seed (the splits use others).")
flags.DEFINE_list("tiles", ["113", "257"], "Tile sizes (113: prediction's eval_size tiles for configs/shapes.py).")
flags.DEFINE_list("overlaps", ["0", "16", "32", "56", "64", "128"], "Overlaps (px); those not below a tile skip it.")
flags.DEFINE_string("out", "launch/results/tiled_overlap.json", "JSON file to write.")


def _miou(labels: np.ndarray, truth: np.ndarray, classes: int) -> float:
  """Mean IoU over the classes present in either map."""
  confusion = np.bincount(truth.ravel() * classes + labels.ravel(), minlength=classes ** 2).reshape(classes, classes)
  inter, union = np.diag(confusion), confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
  return float(np.mean(inter[union > 0] / union[union > 0]))


def main(argv):
  del argv
  config = FLAGS.config
  exp = build_experiment(config)
  params, step = checkpointing.restore_weights(exp, FLAGS.workdir)
  model, classes = exp.eval_model, config.model.num_classes
  small = next(c for c in scale_shapes.CONFIGS if c.name == "small")
  drawing = dataclasses.replace(small, name="tiled_overlap", min_image=FLAGS.size, max_image=FLAGS.size,
                                max_objects=FLAGS.objects)
  examples = [scale_shapes.generate(drawing, i, FLAGS.seed) for i in range(FLAGS.images)]
  mean = np.asarray(config.input.mean_rgb, np.float32)
  exact = tiling.exact_overlap(model)
  settings = [(t, o) for t in map(int, FLAGS.tiles) for o in sorted({*map(int, FLAGS.overlaps), exact}) if o < t]
  forwards = {s: tiling.TiledForward(model, *s, tiles_per_step=config.eval.tiles_per_step) for s in settings}

  @jax.jit
  def whole_step(params: Any, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    fused = forward.predict_scores(params, image, exp=exp, flip=False).fused
    return fused, forward.predict_labels(fused, image, jnp.ones(image.shape[:3], bool), exp=exp)

  def whole(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return jax.device_get(whole_step(params, image))

  def tiled(setting: tuple[int, int], image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = forwards[setting](params, image)
    labels, _ = forwards[setting].upsample(out.fused, out.weights, *image.shape[1:3])
    return out.fused, labels

  runs = {"whole": whole, **{s: (lambda x, s=s: tiled(s, x)) for s in settings}}
  first = examples[0]["image"][None].astype(np.float32) - mean
  compile_s = {}
  for name, run in runs.items():  # one compiling call each
    start = time.perf_counter()
    run(first)
    compile_s[name] = time.perf_counter() - start
  seconds = {name: [] for name in runs}
  results = {name: [] for name in runs}
  for example in examples:
    image = example["image"][None].astype(np.float32) - mean
    for name, run in runs.items():
      start = time.perf_counter()
      results[name].append(run(image))
      seconds[name].append(time.perf_counter() - start)
  truth = [e["label"].astype(np.int64) for e in examples]
  scale_pixels = sum(math.prod(resize.scaled_size(FLAGS.size, s) for _ in range(2)) for s in model.scales)

  def summary(name: str | tuple[int, int], tile: int | None = None, overlap: int | None = None) -> dict:
    """Seconds and mIoU of a run; for a tiled one also its agreement with the whole image's and its cost."""
    out = {"seconds_per_image": float(np.median(seconds[name])), "first_call_s": compile_s[name],
           "miou": float(np.mean([_miou(labels[0], t, classes) for (_, labels), t in zip(results[name], truth,
                                                                                        strict=True)]))}
    if tile is None:
      return out
    fused_diff = [np.abs(f - w) for (f, _), (w, _) in zip(results[name], results["whole"], strict=True)]
    agree = [np.mean(labels == w) for (_, labels), (_, w) in zip(results[name], results["whole"], strict=True)]
    tiles = tiling.tile_count(model, tile, overlap, FLAGS.size, FLAGS.size)
    per_step = forwards[(tile, overlap)].tiles_per_step
    return {"tile": tile, "overlap": overlap, "exact": overlap >= exact, **out,
            "label_agreement": float(np.mean(agree)), "min_label_agreement": float(np.min(agree)),
            "mean_abs_score_diff": float(np.mean([d.mean() for d in fused_diff])),
            "max_abs_score_diff": float(max(d.max() for d in fused_diff)), "tiles": tiles,
            "computed_per_image_pixel": -(-tiles // per_step) * per_step * tile ** 2 / scale_pixels,
            "seconds_vs_whole": float(np.median(seconds[name]) / np.median(seconds["whole"]))}

  doc = {**environment(), "command": " ".join(["PYTHONPATH=. python launch/tiled_overlap.py", *sys.argv[1:]]),
         "workdir": FLAGS.workdir,
         "checkpoint_step": step, "images": FLAGS.images, "size": FLAGS.size, "scales": list(model.scales),
         "exact_overlap": exact, "tiles_per_step": config.eval.tiles_per_step, "whole": summary("whole"),
         "tiled": [summary((t, o), t, o) for t, o in settings]}
  with open(FLAGS.out, "w") as f:
    json.dump(doc, f, indent=2)
  print(json.dumps(doc, indent=2))


if __name__ == "__main__":
  app.run(main)
