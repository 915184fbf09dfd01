"""Reading and checking segmentation files: palette PNGs read as indices (never through RGB), SBD .mat labels,
and images; every problem is reported with the file it came from."""
from __future__ import annotations

import os

import numpy as np
import scipy.io
from PIL import Image

IGNORE_LABEL = 255


class DataError(ValueError):
  """A dataset file that cannot be used; the message names the file and the problem."""


def read_image(path: str) -> np.ndarray:
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def read_palette_png(path: str) -> np.ndarray:
  """A VOC-style indexed PNG as its palette indices (uint8 [H, W])."""
  try:
    with Image.open(path) as im:
      if im.mode not in ("P", "L"):
        raise DataError(f"{path}: expected an indexed ('P') or greyscale label PNG, got mode {im.mode!r}")
      return np.asarray(im).astype(np.uint8)
  except (OSError, ValueError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{path}: cannot read label ({type(e).__name__}: {e})") from e


def read_sbd_mat(path: str) -> np.ndarray:
  """SBD's cls/*.mat: the class map GTcls.Segmentation (uint8 [H, W])."""
  try:
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    return np.asarray(mat["GTcls"].Segmentation).astype(np.uint8)
  except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
    raise DataError(f"{path}: cannot read SBD label GTcls.Segmentation ({type(e).__name__}: {e})") from e


def check_pair(image: np.ndarray, label: np.ndarray, num_classes: int, image_path: str, label_path: str) -> None:
  """Label values in 0..C-1 or 255, and the same size as the image."""
  if image.shape[:2] != label.shape:
    raise DataError(f"{label_path}: label is {label.shape[0]}x{label.shape[1]} but image {image_path} is "
                    f"{image.shape[0]}x{image.shape[1]}")
  bad = np.setdiff1d(np.unique(label), np.r_[np.arange(num_classes), IGNORE_LABEL])
  if bad.size:
    raise DataError(f"{label_path}: label values {bad.tolist()} outside 0..{num_classes - 1} (and 255 = void)")


def require(path: str, what: str, advice: str) -> str:
  if not os.path.exists(path):
    raise DataError(f"{what} not found at {path}. {advice}")
  return path
