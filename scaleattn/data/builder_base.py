"""Reading and checking the files of the manual datasets: JPEG images, palette PNG labels read as indices (never
through RGB) and SBD .mat labels. Every problem is a DataError naming the file, so a build stops on the first bad
file (TFDS then removes its temporary output, leaving nothing half-written)."""
from __future__ import annotations

import os
import sys

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from scaleattn.data.preprocessing import IGNORE_LABEL


class DataError(ValueError):
  """A dataset file that cannot be used; the message names the file and the problem."""


def read_jpeg(path: str) -> tuple[np.ndarray, bytes | np.ndarray]:
  """An image's pixels (uint8 [H, W, 3], fully decoded, so a truncated file fails here) and what to store:
  the file's own bytes for an RGB JPEG (no second lossy encoding), else the pixels."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(path) as im:
      stored_as_is = im.format == "JPEG" and im.mode == "RGB"
      pixels = np.asarray(im.convert("RGB"))
  except Exception as e:  # any failure to parse a file is that file's problem: missing, truncated, not an image
    raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
  return pixels, (data if stored_as_is else pixels)


def read_palette_png(path: str) -> np.ndarray:
  """A VOC-style indexed PNG as its palette indices (uint8 [H, W])."""
  try:
    with Image.open(path) as im:
      mode = im.mode
      indices = np.asarray(im) if mode in ("P", "L") else None
  except Exception as e:  # as in read_jpeg
    raise DataError(f"{path}: cannot read label ({type(e).__name__}: {e})") from e
  if indices is None:
    raise DataError(f"{path}: expected an indexed ('P') or greyscale ('L') label PNG, got mode {mode!r}")
  return indices.astype(np.uint8)


def read_sbd_mat(path: str) -> np.ndarray:
  """SBD's cls/*.mat: the class map GTcls.Segmentation (uint8 [H, W])."""
  try:
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    segmentation = np.asarray(mat["GTcls"].Segmentation)
  except Exception as e:  # scipy fails on damaged files with anything from IndexError to MatReadError
    raise DataError(f"{path}: cannot read SBD label GTcls.Segmentation ({type(e).__name__}: {e})") from e
  if segmentation.ndim != 2:
    raise DataError(f"{path}: GTcls.Segmentation has shape {segmentation.shape}, expected a 2-D class map")
  return segmentation.astype(np.uint8)


def check_pair(image: np.ndarray, label: np.ndarray, num_classes: int, image_path: str, label_path: str) -> None:
  """Label values in 0..C-1 or 255, and the label the same size as the image."""
  if image.shape[:2] != label.shape:
    raise DataError(f"{label_path}: label is {label.shape[0]}x{label.shape[1]} but image {image_path} is "
                    f"{image.shape[0]}x{image.shape[1]}")
  bad = np.setdiff1d(np.unique(label), np.r_[np.arange(num_classes), IGNORE_LABEL])
  if bad.size:
    raise DataError(f"{label_path}: label values {bad.tolist()} outside 0..{num_classes - 1} (and 255 = void)")


def require(path: str, what: str, advice: str) -> str:
  """`path` if it exists, else a DataError saying what is missing, where it was looked for, and what to do."""
  if not os.path.exists(path):
    raise DataError(f"{what} not found at {path}. {advice}")
  return path


def manual_dir(dl_manager) -> str:
  """The manual directory; TFDS's complaint (with the builder's download instructions) as a DataError if it is
  missing or empty."""
  try:
    return os.fspath(dl_manager.manual_dir)
  except AssertionError as e:  # how TFDS reports a missing or empty manual directory
    raise DataError(str(e)) from e


def read_pair(image_path: str, label_path: str, read_label, num_classes: int) -> dict[str, object]:
  """A checked (image, label) pair as TFDS feature values: 'image' (bytes or pixels) and 'label' uint8 [H, W]."""
  pixels, stored = read_jpeg(image_path)
  label = read_label(label_path)
  check_pair(pixels, label, num_classes, image_path, label_path)
  return {"image": stored, "label": label}


def label_feature() -> tfds.features.Tensor:
  """Labels as zlib-compressed uint8 [H, W] tensors: smaller than PNG and faster to decode."""
  return tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)


def photo_features() -> tfds.features.FeaturesDict:
  """Features of the datasets built from VOC photographs: the JPEG as it came, its label, the image id."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "label": label_feature(),
      "file_name": tfds.features.Text(),
  })


class PhotoSegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What the builders over VOC photographs share: version, features and class names (set CLASS_NAMES); the
  subclass's module docstring describes the dataset."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Images stored as the original JPEG bytes, labels as zlib-compressed uint8 [H, W]."}
  CLASS_NAMES: tuple[str, ...] = ()

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(description=sys.modules[type(self).__module__].__doc__,
                                          features=photo_features(),
                                          metadata=tfds.core.MetadataDict(class_names=self.CLASS_NAMES))
