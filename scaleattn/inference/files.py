"""Prediction over image files, for any predictor: the files of the inputs, each read, predicted and written (its
segmentation, a heat map per scale and the panel), with progress; an unreadable image is reported and skipped."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from scaleattn import visualize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
# image uint8 [H, W, 3] -> (labels [H, W], fusion weights [H, W, S])
Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def list_images(inputs: Sequence[str]) -> list[str]:
  """Files as given, folders expanded to their images (sorted)."""
  files = []
  for path in inputs:
    if os.path.isdir(path):
      files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    else:
      files.append(path)
  return files


def predict_files(predict: Predict, inputs: Sequence[str], out_dir: str, *, scales: Sequence[float],
                  class_names: Sequence[str] | None = None, skip: tuple[type[Exception], ...] = ()
                  ) -> dict[str, Any]:
  """Runs `predict` on every image of `inputs` (files or folders) and writes its outputs to `out_dir`. An image that
  cannot be read, or whose prediction raises one of `skip`, is logged and skipped. Returns the paths written and,
  per failed image, why."""
  files = list_images(inputs)
  if not files:
    raise FileNotFoundError(f"no images found in {list(inputs)} (extensions {IMAGE_EXTENSIONS})")
  written, failed = [], {}
  start = last_report = time.perf_counter()
  for done, path in enumerate(files, start=1):
    try:
      image = _read(path)
    except (OSError, ValueError) as e:  # what Pillow raises for a missing, truncated or non-image file
      failed[path] = f"{type(e).__name__}: {e}"
      logging.error("Cannot read image %s (%s); skipping it.", path, failed[path])
      continue
    try:
      labels, weights = predict(image)
    except skip as e:
      failed[path] = f"{type(e).__name__}: {e}"
      logging.error("%s: %s; skipping it.", path, failed[path])
      continue
    name = os.path.splitext(os.path.basename(path))[0]
    written += visualize.save_prediction(out_dir, name, image, labels.astype(np.uint8), weights=weights,
                                         scales=scales, class_names=class_names)
    now = time.perf_counter()
    if now - last_report > 10 or done == len(files):
      per_image = (now - start) / done
      logging.info("Predicted %d/%d images, %.2f s per image, %.0f s left.", done, len(files), per_image,
                   (len(files) - done) * per_image)
      last_report = now
  logging.info("Wrote %d files to %s; %d images failed.", len(written), out_dir, len(failed))
  return {"written": written, "failed": failed}


def _read(path: str) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))
