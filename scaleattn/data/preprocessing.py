"""Joint image/label preprocessing in NumPy, as in DeepLab: mean subtraction, padding to the crop size with the
mean (label 255), random crop, random mirror and optional random scaling; evaluation pads whole images to a
fixed size and returns a validity mask, so shapes stay static on accelerators."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

IGNORE_LABEL = 255  # void: padding, object borders; ignored by every loss and metric
CAFFE_MEAN_RGB = (122.675, 116.669, 104.008)  # DeepLab's Caffe mean (BGR 104.008, 116.669, 122.675) as RGB


def random_scale(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 scale_range: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Rescales by a factor drawn uniformly from `scale_range` (bilinear image, nearest label)."""
  lo, hi = scale_range
  if lo == hi == 1.0:
    return image, label
  f = rng.uniform(lo, hi)
  h, w = label.shape
  size = (max(1, round(w * f)), max(1, round(h * f)))
  return (np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)),
          np.asarray(Image.fromarray(label).resize(size, Image.NEAREST)))


def pad_to(image: np.ndarray, label: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads (bottom and right) a mean-subtracted image with 0, i.e. the mean, and its label with 255."""
  ph, pw = max(height - image.shape[0], 0), max(width - image.shape[1], 0)
  return (np.pad(image, ((0, ph), (0, pw), (0, 0))),
          np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_LABEL))


def train_example(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *, crop_size: int,
                  mean_rgb: Sequence[float], mirror: bool, scale_range: Sequence[float]) -> dict[str, np.ndarray]:
  """One augmented training example: float32 image minus mean [crop, crop, 3], int32 label [crop, crop]."""
  image, label = random_scale(image, label, rng, scale_range)
  image = image.astype(np.float32) - np.asarray(mean_rgb, np.float32)
  image, label = pad_to(image, label, crop_size, crop_size)
  top = int(rng.integers(0, image.shape[0] - crop_size + 1))
  left = int(rng.integers(0, image.shape[1] - crop_size + 1))
  image = image[top:top + crop_size, left:left + crop_size]
  label = label[top:top + crop_size, left:left + crop_size]
  if mirror and rng.random() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  return {"image": np.ascontiguousarray(image), "label": np.ascontiguousarray(label, dtype=np.int32)}


def eval_example(image: np.ndarray, label: np.ndarray, *, eval_size: int, mean_rgb: Sequence[float],
                 instance_size: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """A whole image padded to eval_size x eval_size, with 'mask' True on its real pixels."""
  h, w = label.shape
  if h > eval_size or w > eval_size:
    raise ValueError(f"image of {h}x{w} is larger than config.input.eval_size={eval_size}")
  padded, lab = pad_to(image.astype(np.float32) - np.asarray(mean_rgb, np.float32), label, eval_size, eval_size)
  mask = np.zeros((eval_size, eval_size), bool)
  mask[:h, :w] = True
  out = {"image": padded, "label": lab.astype(np.int32), "mask": mask}
  if instance_size is not None:
    out["instance_size"] = np.pad(instance_size.astype(np.float32), ((0, eval_size - h), (0, eval_size - w)))
  return out


def padding_example(size: int, *, with_mask: bool, with_instance_size: bool) -> dict[str, np.ndarray]:
  """A size x size example that counts nowhere: the mean image, every label IGNORE_LABEL (and mask False)."""
  out = {"image": np.zeros((size, size, 3), np.float32),
         "label": np.full((size, size), IGNORE_LABEL, np.int32)}
  if with_mask:
    out["mask"] = np.zeros((size, size), bool)
  if with_instance_size:
    out["instance_size"] = np.zeros((size, size), np.float32)
  return out
