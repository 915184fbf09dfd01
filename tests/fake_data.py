"""Tiny VOC 2012, SBD and PASCAL-Person-Part trees in their exact on-disk layouts."""
from __future__ import annotations

import os

import numpy as np
import scipy.io
from PIL import Image

from scaleattn import visualize


def save_palette_png(path, label):
  im = Image.fromarray(label.astype(np.uint8), mode="P")
  im.putpalette(visualize.voc_palette().ravel().tolist())
  im.save(path)


def label_for(index: int, h: int, w: int, num_classes: int) -> np.ndarray:
  """A label with class (index % (C-1)) + 1 in a block, background elsewhere, and a 255 border like VOC's."""
  label = np.zeros((h, w), np.uint8)
  label[2:h - 2, 3:w // 2] = index % (num_classes - 1) + 1
  label[1, :] = 255
  label[:, w // 2] = 255
  return label


def make_voc(root, voc_train, voc_val, sbd_train, sbd_val, size=(12, 14)):
  """VOCdevkit/VOC2012 and benchmark_RELEASE/dataset under `root`; returns {id: label} of the true labels."""
  voc = os.path.join(root, "VOCdevkit", "VOC2012")
  sbd = os.path.join(root, "benchmark_RELEASE", "dataset")
  for d in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
    os.makedirs(os.path.join(voc, d), exist_ok=True)
  os.makedirs(os.path.join(sbd, "cls"), exist_ok=True)
  rng = np.random.default_rng(0)
  truth = {}
  all_ids = sorted(set(voc_train + voc_val + sbd_train + sbd_val))
  for k, image_id in enumerate(all_ids):
    h, w = size
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(os.path.join(voc, "JPEGImages", f"{image_id}.jpg"))
    label = label_for(k, h, w, 21)
    if image_id in voc_train or image_id in voc_val:
      save_palette_png(os.path.join(voc, "SegmentationClass", f"{image_id}.png"), label)
      truth[image_id] = label
    if image_id in sbd_train or image_id in sbd_val:
      sbd_label = label.copy()
      sbd_label[sbd_label == 255] = 0  # SBD has no void border
      cls = {"Segmentation": sbd_label, "Boundaries": np.zeros(1), "CategoriesPresent": np.unique(sbd_label)}
      scipy.io.savemat(os.path.join(sbd, "cls", f"{image_id}.mat"), {"GTcls": cls})
      truth.setdefault(image_id, sbd_label)
  for name, ids in (("train", voc_train), ("val", voc_val)):
    with open(os.path.join(voc, "ImageSets", "Segmentation", f"{name}.txt"), "w") as f:
      f.write("".join(f"{i}\n" for i in ids))
  for name, ids in (("train", sbd_train), ("val", sbd_val)):
    with open(os.path.join(sbd, f"{name}.txt"), "w") as f:
      f.write("".join(f"{i}\n" for i in ids))
  return truth


def make_person_part(root, train_ids, val_ids, size=(10, 12)):
  """pascal_person_part_gt/, pascal_person_part_trainval_list/ and VOC JPEGImages; returns {id: label}."""
  voc_images = os.path.join(root, "VOCdevkit", "VOC2012", "JPEGImages")
  gt = os.path.join(root, "pascal_person_part_gt")
  lists = os.path.join(root, "pascal_person_part_trainval_list")
  for d in (voc_images, gt, lists):
    os.makedirs(d, exist_ok=True)
  rng = np.random.default_rng(1)
  truth = {}
  for k, image_id in enumerate(train_ids + val_ids):
    Image.fromarray(rng.integers(0, 255, size + (3,), np.uint8)).save(os.path.join(voc_images, f"{image_id}.jpg"))
    truth[image_id] = label_for(k, *size, 7)
    save_palette_png(os.path.join(gt, f"{image_id}.png"), truth[image_id])
  for name, ids in (("train", train_ids), ("val", val_ids)):
    with open(os.path.join(lists, f"{name}.txt"), "w") as f:
      f.write("".join(f"/JPEGImages/{i}.jpg /SegmentationPart/{i}.png\n" for i in ids))
  return truth
