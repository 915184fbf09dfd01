"""Predictions on image files: colour-coded segmentations and, per scale, the fusion weights as heat maps.

Images keep a static shape on the accelerator: each is padded (with the mean) to `config.input.eval_size`,
after shrinking it to fit when larger, and the outputs are cropped back.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from scaleattn import checkpointing, inference, visualize
from scaleattn.state import Experiment, build_experiment

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def list_images(inputs: Sequence[str]) -> list[str]:
  """Files as given, folders expanded to their images (sorted)."""
  files = []
  for path in inputs:
    if os.path.isdir(path):
      files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    else:
      files.append(path)
  return files


def _fit(image: np.ndarray, size: int) -> np.ndarray:
  """Shrinks (keeping the aspect ratio) an image larger than `size` so that it fits in size x size."""
  h, w = image.shape[:2]
  if max(h, w) <= size:
    return image
  f = size / max(h, w)
  new = (max(1, min(size, round(w * f))), max(1, min(size, round(h * f))))
  return np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))


@functools.partial(jax.jit, static_argnames=("exp",))
def full_resolution(params: Any, images: jax.Array, valid: jax.Array, *, exp: Experiment
                    ) -> tuple[jax.Array, jax.Array]:
  """Prediction and fusion weights at the images' resolution; `valid` marks the real pixels of padded images."""
  out = inference.predict_scores(params, images, exp=exp, flip=exp.config.eval.flip)
  return (inference.predict_labels(out.fused, images, valid, exp=exp), inference.to_input_size(out.weights, images))


def save_outputs(exp: Experiment, params: Any, image: np.ndarray, name: str, out_dir: str) -> list[str]:
  """Runs one uint8 RGB image (any size) and writes its segmentation, weight maps and panel."""
  cfg = exp.config
  size = cfg.input.eval_size
  fitted = _fit(image, size)
  h, w = fitted.shape[:2]
  padded = np.zeros((1, size, size, 3), np.float32)
  padded[0, :h, :w] = fitted.astype(np.float32) - np.asarray(cfg.input.mean_rgb, np.float32)
  valid = np.zeros((1, size, size), bool)
  valid[0, :h, :w] = True
  pred, weights = jax.device_get(full_resolution(params, padded, valid, exp=exp))
  return visualize.save_prediction(out_dir, name, fitted, pred[0, :h, :w].astype(np.uint8),
                                   weights=weights[0, :h, :w], scales=tuple(cfg.model.scales))


def predict_files(config: ml_collections.ConfigDict, workdir: str, inputs: Sequence[str], out_dir: str,
                  params: Any | None = None) -> dict[str, Any]:
  """Predicts every readable image; an unreadable one is reported and skipped, the others go on."""
  exp = build_experiment(config)
  if params is None:
    params, _ = checkpointing.restore_params(workdir, config.train, exp.abstract_state)
  written, failed = [], []
  files = list_images(inputs)
  if not files:
    raise FileNotFoundError(f"no images found in {list(inputs)} (extensions {IMAGE_EXTENSIONS})")
  for path in files:
    try:
      with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
      logging.error("Cannot read image %s (%s: %s); skipping it.", path, type(e).__name__, e)
      failed.append(path)
      continue
    name = os.path.splitext(os.path.basename(path))[0]
    written += save_outputs(exp, params, image, name, out_dir)
  logging.info("Wrote %d files to %s; %d unreadable inputs.", len(written), out_dir, len(failed))
  return {"written": written, "failed": failed}


def save_eval_examples(exp: Experiment, params: Any, batch: dict[str, np.ndarray], out_dir: str,
                       num_examples: int) -> list[str]:
  """Writes outputs for the first examples of an evaluation batch (mean added back, padding cropped)."""
  mean = np.asarray(exp.config.input.mean_rgb, np.float32)
  written = []
  for i in range(min(num_examples, len(batch["image"]))):
    rows, cols = np.nonzero(batch["mask"][i])
    if not len(rows):
      continue
    crop = batch["image"][i, :rows.max() + 1, :cols.max() + 1]
    image = np.clip(crop + mean, 0, 255).astype(np.uint8)
    written += save_outputs(exp, params, image, f"example_{i:03d}", out_dir)
  return written
