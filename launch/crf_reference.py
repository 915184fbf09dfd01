"""scaleattn's JAX dense CRF against pydensecrf (Kraehenbuehl's densecrf, what DeepLab's CRF is built on), on the
same scores and images, side by side in one process: argmax agreement, mean |Q| difference and seconds per image.

  pip install pydensecrf2  # optional; the scaleattn package never imports it
  PYTHONPATH=. python launch/crf_reference.py --source=synthetic --cases=513x513x21,513x513x5,1024x2048x21 \
      --images=2 --out=launch/results/crf_reference.json
  PYTHONPATH=. python launch/crf_reference.py --source=workdir --workdir=W --cases=513x513x0 --images=3

Scores (--source):
- synthetic: a deterministic image of coloured rectangles and discs on a gradient background with pixel noise, and
  scores that favour each shape's label under smooth and pixel noise (so the CRF has errors to fix), one case per
  --cases entry HxWxC;
- workdir: a trained model's fused scores (the latest checkpoint of a training workdir) on test images of its
  dataset, image and scores brought to HxW (bilinear), as evaluation upsamples them (C is the model's).
Both CRFs run DeepLab-LargeFOV's VOC settings (10 iterations; bilateral weight 4, xy std 121, rgb std 5; Gaussian
weight 3, xy std 3) with densecrf's NORMALIZE_AFTER messages (scaleattn's normalize=True). Times are the median of
--repeats calls per image, the CRFs alternating call by call, after one compiling call per case (jax_compile_s,
which includes that first run).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pydensecrf
import pydensecrf.densecrf as dcrf
from absl import app, flags
from PIL import Image

from scaleattn import crf
from scaleattn.perf.environment import environment

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", "synthetic", ["synthetic", "workdir"], "Where the scores come from.")
flags.DEFINE_string("workdir", None, "source=workdir: a training workdir (config.json and checkpoints/).")
flags.DEFINE_list("cases", ["513x513x21", "513x513x5", "1024x2048x21"], "HxWxC per case (C ignored for workdir).")
flags.DEFINE_integer("images", 2, "Images per case.")
flags.DEFINE_integer("repeats", 3, "Timed calls per image and CRF (the median is reported).")
flags.DEFINE_list("filters", ["lattice"], "scaleattn filters to compare (crf.FILTERS).")
flags.DEFINE_string("out", "", "JSON file to write.")

SETTINGS = {"iterations": 10, "bilateral_weight": 4.0, "bilateral_xy_std": 121.0, "bilateral_rgb_std": 5.0,
            "gaussian_weight": 3.0, "gaussian_xy_std": 3.0}


def synthetic_pair(h: int, w: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(scores [h, w, classes] float32, image [h, w, 3] uint8): shapes of random colours and labels over a gradient
  background (label 0); scores are 2.5 * one-hot(label) + smooth noise (std 1, ~h/16 px blobs) + pixel noise (std 1),
  so about a quarter of the pixels' argmax is wrong before the CRF."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  image = np.stack([40 + 120 * x / w, 60 + 100 * y / h, np.full_like(x, 90.0)], axis=-1)
  labels = np.zeros((h, w), np.int64)
  for k in range(12):
    colour, label = rng.uniform(0, 255, 3), int(rng.integers(1, classes))
    cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.25) * h, rng.uniform(0.05, 0.25) * w
    inside = (np.abs(y - cy) < ry) & (np.abs(x - cx) < rx) if k % 2 else ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
    image[inside], labels[inside] = colour, label
  image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).round().astype(np.uint8)
  coarse = rng.normal(0, 1, (max(h // 32, 2), max(w // 32, 2), classes)).astype(np.float32)
  smooth = np.asarray(jax.image.resize(jnp.asarray(coarse), (h, w, classes), "cubic"))
  scores = 2.5 * np.eye(classes, dtype=np.float32)[labels] + smooth + rng.normal(0, 1, (h, w, classes))
  return scores.astype(np.float32), image


def workdir_pairs(workdir: str, h: int, w: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(scores [h, w, C] float32, image [h, w, 3] uint8) for the first `count` test images of a trained model."""
  from scaleattn import checkpointing  # noqa: PLC0415 (the model's stack is needed for this source only)
  from scaleattn.config.serialization import config_from_json  # noqa: PLC0415
  from scaleattn.data import input_pipeline  # noqa: PLC0415
  from scaleattn.experiment import build_experiment  # noqa: PLC0415
  from scaleattn.inference import predict_scores  # noqa: PLC0415
  from scaleattn.models import resize  # noqa: PLC0415
  with open(os.path.join(workdir, "config.json")) as f:
    config = config_from_json(f.read())
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
    bottom, right = rows.max() + 1, cols.max() + 1
    image = np.clip(batch["image"][i, :bottom, :right] + mean, 0, 255).astype(np.uint8)
    full = resize.resize_bilinear(jnp.asarray(fused[i:i + 1]), batch["image"].shape[1:3])[0, :bottom, :right]
    scores = jax.image.resize(full, (h, w, fused.shape[-1]), "linear")
    out.append((np.asarray(scores, np.float32), np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))))
  return out


def pydensecrf_q(scores: np.ndarray, image: np.ndarray) -> np.ndarray:
  """densecrf's Q [h, w, C] with the same unary (-log softmax) and kernels, NORMALIZE_AFTER."""
  h, w, c = scores.shape
  logp = scores - scores.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  d = dcrf.DenseCRF2D(w, h, c)
  d.setUnaryEnergy(np.ascontiguousarray(-logp.reshape(-1, c).T, np.float32))
  d.addPairwiseGaussian(sxy=SETTINGS["gaussian_xy_std"], compat=SETTINGS["gaussian_weight"],
                        normalization=dcrf.NORMALIZE_AFTER)
  d.addPairwiseBilateral(sxy=SETTINGS["bilateral_xy_std"], srgb=SETTINGS["bilateral_rgb_std"],
                         rgbim=np.ascontiguousarray(image), compat=SETTINGS["bilateral_weight"],
                         normalization=dcrf.NORMALIZE_AFTER)
  return np.asarray(d.inference(SETTINGS["iterations"])).T.reshape(h, w, c)


def alternated_times(fns: dict[str, Callable[[], np.ndarray]], repeats: int) -> dict[str, tuple[float, np.ndarray]]:
  """(median seconds, last result) per function over `repeats` rounds, one call of each per round: drift in the
  machine's speed then touches them alike."""
  times, out = {name: [] for name in fns}, {}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      out[name] = fn()
      times[name].append(time.perf_counter() - t)
  return {name: (float(np.median(times[name])), out[name]) for name in fns}


def run_case(case: str) -> dict:
  h, w, c = (int(v) for v in case.split("x"))
  if FLAGS.source == "synthetic":
    pairs = [synthetic_pair(h, w, c, seed) for seed in range(FLAGS.images)]
  else:
    pairs = workdir_pairs(FLAGS.workdir, h, w, FLAGS.images)
  row = {"case": case, "classes": pairs[0][0].shape[-1], "images": []}
  # One jitted function per filter, reused for every image: a new one would trace and compile again.
  runs = {name: jax.jit(lambda s, x, f=name: crf.dense_crf(s[None], x[None], filter=f, normalize=True, **SETTINGS)[0])
          for name in FLAGS.filters}
  for name, run in runs.items():
    t = time.perf_counter()
    jax.block_until_ready(run(*pairs[0]))
    row[f"jax_{name}_compile_s"] = time.perf_counter() - t
  for i, (scores, image) in enumerate(pairs):
    fns = {"pydensecrf": lambda s=scores, x=image: pydensecrf_q(s, x)}
    for name, run in runs.items():
      fns[name] = lambda s=scores, x=image, r=run: np.asarray(jax.block_until_ready(r(s, x)))
    timed = alternated_times(fns, FLAGS.repeats)
    theirs_s, theirs = timed["pydensecrf"]
    item = {"image": i, "pydensecrf_s": theirs_s,
            "pydensecrf_changed_by_crf": float(np.mean(theirs.argmax(-1) != scores.argmax(-1)))}
    for name in runs:
      ours_s, ours = timed[name]
      item[f"jax_{name}_s"] = ours_s
      item[f"jax_{name}_argmax_agreement"] = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
      item[f"jax_{name}_mean_abs_q_difference"] = float(np.mean(np.abs(ours - theirs)))
    print(json.dumps({"case": case, **item}), flush=True)
    row["images"].append(item)
  row["median"] = {k: float(np.median([it[k] for it in row["images"]])) for k in row["images"][0] if k != "image"}
  return row


def main(argv):
  del argv
  command = " ".join(["PYTHONPATH=. python launch/crf_reference.py", *sys.argv[1:]])
  result = {**environment(), "command": command, "source": FLAGS.source, "settings": SETTINGS,
            "normalization": "NORMALIZE_AFTER (normalize=True)", "pydensecrf2": pydensecrf_version(), "cases": []}
  for case in FLAGS.cases:
    result["cases"].append(run_case(case))
    if FLAGS.out:  # after every case: the large ones take minutes
      with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1)


def pydensecrf_version() -> str:
  from importlib import metadata  # noqa: PLC0415
  try:
    return metadata.version("pydensecrf2")
  except metadata.PackageNotFoundError:
    return getattr(pydensecrf, "__version__", "unknown")


if __name__ == "__main__":
  app.run(main)
