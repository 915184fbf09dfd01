"""scaleattn's JAX dense CRF against pydensecrf (Kraehenbuehl's densecrf, what DeepLab's CRF is built on), on the
same scores and images: argmax agreement, mean |Q| difference and seconds per image.

  pip install pydensecrf2  # optional; the scaleattn package never imports it
  PYTHONPATH=. python launch/crf_reference.py --workdir=W --size=513 --images=3 --out=FILE.json

Scores: a trained model's fused scores (the latest checkpoint of a training workdir, e.g. the default
`configs/shapes.py` run) on test images of its dataset, image and scores brought to size x size (bilinear), as
evaluation upsamples them. Both CRFs run DeepLab-LargeFOV's VOC settings (10 iterations; bilateral weight 4, xy std
121, rgb std 5; Gaussian weight 3, xy std 3). pydensecrf runs with each of its message normalisations; scaleattn's
`normalize=True` (the kernel's row sum, after filtering) is densecrf's NORMALIZE_AFTER.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pydensecrf.densecrf as dcrf
from absl import app, flags
from PIL import Image

from scaleattn import checkpointing, crf, export, input_pipeline
from scaleattn.inference import predict_scores
from scaleattn.models import resize
from scaleattn.perf.environment import environment
from scaleattn.state import build_experiment

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (config.json and checkpoints/).")
flags.DEFINE_integer("size", 513, "Image side the CRFs run at.")
flags.DEFINE_integer("images", 3, "Test images compared.")
flags.DEFINE_string("out", "", "JSON file to write.")
flags.mark_flags_as_required(["workdir"])

SETTINGS = {"iterations": 10, "bilateral_weight": 4.0, "bilateral_xy_std": 121.0, "bilateral_rgb_std": 5.0,
            "gaussian_weight": 3.0, "gaussian_xy_std": 3.0}
NORMALIZATIONS = {"NORMALIZE_AFTER": dcrf.NORMALIZE_AFTER, "NORMALIZE_SYMMETRIC": dcrf.NORMALIZE_SYMMETRIC,
                  "NO_NORMALIZATION": dcrf.NO_NORMALIZATION}


def inputs(workdir: str, size: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(scores [size, size, C] float32, image [size, size, 3] uint8) for the first `count` test images."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = export.config_from_json(f.read())
  exp = build_experiment(config)
  params, _ = checkpointing.restore_params(workdir, config.train, exp.abstract_state)
  data = input_pipeline.create_datasets(config, data_devices=exp.mesh.size)
  batch = next(iter(data.eval_batches(config.dataset.test_split or config.dataset.eval_split)))
  fused = jax.device_get(jax.jit(lambda p, x: predict_scores(p, x, exp=exp, flip=False).fused)(params,
                                                                                              batch["image"]))
  mean = np.asarray(config.input.mean_rgb, np.float32)
  out = []
  for i in range(count):
    rows, cols = np.nonzero(batch["mask"][i])
    h, w = rows.max() + 1, cols.max() + 1
    image = np.clip(batch["image"][i, :h, :w] + mean, 0, 255).astype(np.uint8)
    full = resize.resize_bilinear(jnp.asarray(fused[i:i + 1]), batch["image"].shape[1:3])[0, :h, :w]  # as evaluation
    scores = jax.image.resize(full, (size, size, fused.shape[-1]), "linear")
    out.append((np.asarray(scores, np.float32),
                np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))))
  return out


def pydensecrf_q(scores: np.ndarray, image: np.ndarray, normalization: int) -> np.ndarray:
  h, w, c = scores.shape
  logp = jax.nn.log_softmax(jnp.asarray(scores), axis=-1)
  d = dcrf.DenseCRF2D(w, h, c)
  d.setUnaryEnergy(np.ascontiguousarray(-np.asarray(logp).reshape(-1, c).T, np.float32))
  d.addPairwiseGaussian(sxy=SETTINGS["gaussian_xy_std"], compat=SETTINGS["gaussian_weight"],
                        normalization=normalization)
  d.addPairwiseBilateral(sxy=SETTINGS["bilateral_xy_std"], srgb=SETTINGS["bilateral_rgb_std"],
                         rgbim=np.array(image, np.uint8, order="C"), compat=SETTINGS["bilateral_weight"],
                         normalization=normalization)
  return np.asarray(d.inference(SETTINGS["iterations"])).T.reshape(h, w, c)


def main(argv):
  del argv
  pairs = inputs(FLAGS.workdir, FLAGS.size, FLAGS.images)
  run = jax.jit(lambda s, x: crf.dense_crf(s[None], x[None], normalize=True, **SETTINGS)[0])
  t = time.perf_counter()
  jax.block_until_ready(run(*pairs[0]))
  compile_s = time.perf_counter() - t
  rows = []
  for i, (scores, image) in enumerate(pairs):
    t = time.perf_counter()
    ours = np.asarray(jax.block_until_ready(run(scores, image)))
    row = {"image": i, "jax_s": time.perf_counter() - t,
           "changed_by_crf": float(np.mean(ours.argmax(-1) != scores.argmax(-1)))}
    for name, normalization in NORMALIZATIONS.items():
      t = time.perf_counter()
      theirs = pydensecrf_q(scores, image, normalization)
      row[f"pydensecrf_{name}_s"] = time.perf_counter() - t
      row[f"argmax_agreement_{name}"] = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
      row[f"mean_abs_q_difference_{name}"] = float(np.mean(np.abs(ours - theirs)))
    print(json.dumps(row), flush=True)
    rows.append(row)
  summary = {k: float(np.median([r[k] for r in rows])) for k in rows[0] if k != "image"}
  print(json.dumps({"median": summary, "jax_compile_s": compile_s}), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      command = " ".join(["PYTHONPATH=. python launch/crf_reference.py", *sys.argv[1:]])
      json.dump({**environment(), "command": command, "size": FLAGS.size, "settings": SETTINGS, "jax_compile_s": compile_s,
                 "median": summary, "images": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
