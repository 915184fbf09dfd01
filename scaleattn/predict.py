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
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from scaleattn import checkpointing, visualize
from scaleattn.models import resize
from scaleattn.state import Setup, build, predict_scores

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


def restore_params(setup: Setup, workdir: str) -> Any:
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), setup.config.train)
  state = ckpts.restore(setup.abstract_state)
  ckpts.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; train first")
  return state.params


def _fit(image: np.ndarray, size: int) -> np.ndarray:
  """Shrinks (keeping the aspect ratio) an image larger than `size` so that it fits in size x size."""
  h, w = image.shape[:2]
  if max(h, w) <= size:
    return image
  f = size / max(h, w)
  new = (max(1, min(size, round(w * f))), max(1, min(size, round(h * f))))
  return np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))


@functools.partial(jax.jit, static_argnames=("setup",))
def full_resolution(params: Any, images: jax.Array, *, setup: Setup) -> tuple[jax.Array, jax.Array]:
  """Prediction and fusion weights upsampled to the input grid (x8, bilinear, as in the paper's test)."""
  out = predict_scores(params, images, setup=setup, flip=setup.config.eval.flip)
  size = images.shape[1:3]
  pred = jnp.argmax(resize.resize_bilinear(out.fused.astype(jnp.float32), size), axis=-1)
  return pred, resize.resize_bilinear(out.weights.astype(jnp.float32), size)


def save_outputs(setup: Setup, params: Any, image: np.ndarray, name: str, out_dir: str) -> list[str]:
  """Runs one uint8 RGB image (any size) and writes its segmentation, weight maps and panel."""
  cfg = setup.config
  size = cfg.input.eval_size
  fitted = _fit(image, size)
  h, w = fitted.shape[:2]
  padded = np.zeros((1, size, size, 3), np.float32)
  padded[0, :h, :w] = fitted.astype(np.float32) - np.asarray(cfg.input.mean_rgb, np.float32)
  pred, weights = jax.device_get(full_resolution(params, padded, setup=setup))
  return visualize.save_prediction(out_dir, name, fitted, pred[0, :h, :w].astype(np.uint8),
                                   weights=weights[0, :h, :w], scales=tuple(cfg.model.scales))


def predict_files(config: ml_collections.ConfigDict, workdir: str, inputs: Sequence[str], out_dir: str,
                  params: Any | None = None) -> dict[str, Any]:
  """Predicts every readable image; an unreadable one is reported and skipped, the others go on."""
  setup = build(config)
  params = restore_params(setup, workdir) if params is None else params
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
    written += save_outputs(setup, params, image, name, out_dir)
  logging.info("Wrote %d files to %s; %d unreadable inputs.", len(written), out_dir, len(failed))
  return {"written": written, "failed": failed}


def save_eval_examples(setup: Setup, params: Any, batch: dict[str, np.ndarray], out_dir: str,
                       num_examples: int) -> list[str]:
  """Writes outputs for the first examples of an evaluation batch (mean added back, padding cropped)."""
  mean = np.asarray(setup.config.input.mean_rgb, np.float32)
  written = []
  for i in range(min(num_examples, len(batch["image"]))):
    rows, cols = np.nonzero(batch["mask"][i])
    if not len(rows):
      continue
    crop = batch["image"][i, :rows.max() + 1, :cols.max() + 1]
    image = np.clip(crop + mean, 0, 255).astype(np.uint8)
    written += save_outputs(setup, params, image, f"example_{i:03d}", out_dir)
  return written
