"""Tiny VOC 2012, SBD and PASCAL-Person-Part trees in their exact on-disk layouts, an image_folder tree, and a
config for the pipeline.

Layouts: VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png (palette PNGs, 255 borders),
ImageSets/Segmentation/{train,val}.txt}; benchmark_RELEASE/dataset/{cls/*.mat (MATLAB struct GTcls with field
Segmentation), train.txt, val.txt}; pascal_person_part_gt/*.png and pascal_person_part_trainval_list/{train,val}.txt
(two columns: /JPEGImages/ID.jpg /SegmentationPart/ID.png).
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile

import ml_collections
import numpy as np
import scipy.io
from PIL import Image

MEAN_RGB = (122.675, 116.669, 104.008)
PALETTE = np.random.default_rng(7).integers(0, 256, (256, 3)).astype(np.uint8)


def save_palette_png(path, label: np.ndarray) -> None:
  im = Image.fromarray(label.astype(np.uint8), mode="P")
  im.putpalette(PALETTE.ravel().tolist())
  im.save(path)


def label_for(index: int, h: int, w: int, num_classes: int) -> np.ndarray:
  """Class (index % (C-1)) + 1 in a block, background elsewhere, and 255 lines like VOC's object borders."""
  label = np.zeros((h, w), np.uint8)
  label[2:h - 2, 3:w // 2] = index % (num_classes - 1) + 1
  label[1, :] = 255
  label[:, w // 2] = 255
  return label


def _save_jpeg(path, rng: np.random.Generator, h: int, w: int) -> None:
  Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(path, quality=90)


def _write_list(path, lines) -> None:
  with open(path, "w") as f:
    f.write("".join(f"{line}\n" for line in lines))


def make_voc(root, voc_train, voc_val, sbd_train, sbd_val, size=(12, 14)) -> dict[str, np.ndarray]:
  """VOCdevkit/VOC2012 and benchmark_RELEASE/dataset under `root`; returns {id: the label the builder must read}.

  Ids in both VOC and SBD get a different SBD label (all 0), so a test sees which file was read.
  """
  voc = os.path.join(root, "VOCdevkit", "VOC2012")
  sbd = os.path.join(root, "benchmark_RELEASE", "dataset")
  for d in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
    os.makedirs(os.path.join(voc, d), exist_ok=True)
  os.makedirs(os.path.join(sbd, "cls"), exist_ok=True)
  rng = np.random.default_rng(0)
  truth = {}
  for k, image_id in enumerate(sorted(set(voc_train + voc_val + sbd_train + sbd_val))):
    _save_jpeg(os.path.join(voc, "JPEGImages", f"{image_id}.jpg"), rng, *size)
    label = label_for(k, *size, 21)
    if image_id in voc_train + voc_val:
      save_palette_png(os.path.join(voc, "SegmentationClass", f"{image_id}.png"), label)
      truth[image_id] = label
    if image_id in sbd_train + sbd_val:
      sbd_label = np.zeros(size, np.uint8) if image_id in truth else np.where(label == 255, 0, label)
      gtcls = {"Segmentation": sbd_label, "Boundaries": np.zeros((1, 1)), "CategoriesPresent": np.unique(sbd_label)}
      scipy.io.savemat(os.path.join(sbd, "cls", f"{image_id}.mat"), {"GTcls": gtcls})
      truth.setdefault(image_id, sbd_label)
  _write_list(os.path.join(voc, "ImageSets", "Segmentation", "train.txt"), voc_train)
  _write_list(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), voc_val)
  _write_list(os.path.join(sbd, "train.txt"), sbd_train)
  _write_list(os.path.join(sbd, "val.txt"), sbd_val)
  return truth


def archive(root) -> None:
  """Replaces the extracted trees by the archives as downloaded: VOCtrainval_11-May-2012.tar and benchmark.tgz."""
  for name, folder, mode in (("VOCtrainval_11-May-2012.tar", "VOCdevkit", "w"),
                             ("benchmark.tgz", "benchmark_RELEASE", "w:gz")):
    with tarfile.open(os.path.join(root, name), mode) as tar:
      tar.add(os.path.join(root, folder), arcname=folder)
    shutil.rmtree(os.path.join(root, folder))


def make_person_part(root, train_ids, val_ids, size=(10, 12)) -> dict[str, np.ndarray]:
  """pascal_person_part_gt/, pascal_person_part_trainval_list/ and VOC JPEGImages; returns {id: label}."""
  voc_images = os.path.join(root, "VOCdevkit", "VOC2012", "JPEGImages")
  gt = os.path.join(root, "pascal_person_part_gt")
  lists = os.path.join(root, "pascal_person_part_trainval_list")
  for d in (voc_images, gt, lists):
    os.makedirs(d, exist_ok=True)
  rng = np.random.default_rng(1)
  truth = {}
  for k, image_id in enumerate(train_ids + val_ids):
    _save_jpeg(os.path.join(voc_images, f"{image_id}.jpg"), rng, *size)
    truth[image_id] = label_for(k, *size, 7)
    save_palette_png(os.path.join(gt, f"{image_id}.png"), truth[image_id])
  for name, ids in (("train", train_ids), ("val", val_ids)):
    _write_list(os.path.join(lists, f"{name}.txt"), [f"/JPEGImages/{i}.jpg /SegmentationPart/{i}.png" for i in ids])
  return truth


FOLDER_CLASSES = ("background", "cat", "dog")
FOLDER_COLOURS = ((0, 0, 0), (200, 30, 30), (30, 200, 30))  # not VOC's, so a test sees which table was used


def make_image_folder(root, n=12, *, mode="L", size=(10, 14), classes=FOLDER_CLASSES, colours=None,
                      ignore_colour=None, palette=PALETTE, ignore=None) -> dict[str, np.ndarray]:
  """An image_folder tree: images/ (even stems JPEG, odd PNG), masks/ in `mode` ('L' or 'I;16' with void drawn as
  `ignore` (default 255), 'P' with `palette`, or 'RGB' through `colours`, void in `ignore_colour`), classes.txt, or
  classes.json when colours or an ignore value are given. Returns {stem: the label the builder must store}."""
  for d in ("images", "masks"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  rng = np.random.default_rng(2)
  truth = {}
  for k in range(n):
    stem = f"img_{k:02d}"
    pixels = rng.integers(0, 255, (*size, 3), np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, "images", f"{stem}.{'png' if k % 2 else 'jpg'}"))
    truth[stem] = label_for(k, *size, len(classes))
    mask_path = os.path.join(root, "masks", f"{stem}.png")
    if mode == "RGB":
      lut = np.zeros((256, 3), np.uint8)
      lut[:len(colours)] = colours
      lut[255] = ignore_colour
      Image.fromarray(lut[truth[stem]]).save(mask_path)
    elif mode == "P":
      im = Image.fromarray(truth[stem], mode="P")
      im.putpalette(np.asarray(palette, np.uint8).ravel().tolist())
      im.save(mask_path)
    else:
      values = np.where(truth[stem] == 255, 255 if ignore is None else ignore, truth[stem].astype(np.int64))
      Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.uint8)).save(mask_path)
  if colours is None and ignore is None:
    _write_list(os.path.join(root, "classes.txt"), classes)
  else:
    with open(os.path.join(root, "classes.json"), "w") as f:
      json.dump({"names": list(classes), **({"colours": [list(c) for c in colours]} if colours else {}),
                 **({"ignore_colour": list(ignore_colour)} if ignore_colour is not None else {}),
                 **({"ignore": ignore} if ignore is not None else {})}, f)
  return truth


def pipeline_config(data_dir, *, name="scale_shapes", builder_config="smoke", num_classes=5, crop_size=49,
                    eval_size=81, train_batch=4, eval_batch=6, mirror=True, scale=(1.0, 1.0), worker_count=0,
                    manual_dir=None, seed=0, microbatches=1) -> ml_collections.ConfigDict:
  """The config fields the input pipeline reads, and nothing else."""
  return ml_collections.ConfigDict({
      "seed": seed,
      "dataset": {"name": name, "data_dir": str(data_dir), "manual_dir": manual_dir, "builder_config": builder_config,
                  "train_split": "train", "eval_split": "validation", "test_split": "test",
                  "num_classes": num_classes},
      "input": {"crop_size": crop_size, "eval_size": eval_size, "mean_rgb": MEAN_RGB, "random_mirror": mirror,
                "random_scale": scale, "worker_count": worker_count, "prefetch": 2},
      "model": {"num_classes": num_classes},
      "train": {"batch_size": train_batch, "microbatches": microbatches},
      "eval": {"batch_size": eval_batch},
  })
