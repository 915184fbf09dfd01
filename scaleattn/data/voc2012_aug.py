"""`voc2012_aug`: PASCAL VOC 2012 segmentation with the SBD annotations (Hariharan et al. 2011), 21 classes.

Splits: train_aug = VOC train + SBD train + SBD val - VOC val (10,582 images), train (1,464), val (1,449).
Labels come from VOC's palette PNGs where VOC has one, else from SBD's cls/*.mat; 255 stays void.
"""
from __future__ import annotations

import os

from scaleattn.data import builder_base

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_TAR = "VOCtrainval_11-May-2012.tar"
SBD_TGZ = "benchmark.tgz"
MANUAL = (f"Download {VOC_TAR} (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) and {SBD_TGZ} "
          "(http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz) "
          "and put both, extracted (VOCdevkit/VOC2012/, benchmark_RELEASE/) or not, into the manual directory "
          "(config.dataset.manual_dir).")


def locate(manual_dir: str, extracted: str, archive: str, dl_manager, advice: str) -> str:
  """The folder `extracted` under manual_dir, or inside `archive` (in manual_dir), which is extracted once."""
  if os.path.isdir(os.path.join(manual_dir, extracted)):
    return os.path.join(manual_dir, extracted)
  archive_path = builder_base.require(os.path.join(manual_dir, archive), f"{extracted}/ (or {archive})", advice)
  return builder_base.require(os.path.join(os.fspath(dl_manager.extract(archive_path)), extracted),
                          f"{extracted}/ inside {archive}", advice)


def read_ids(path: str) -> list[str]:
  """Image ids of a split list (first column of each non-empty line)."""
  with open(builder_base.require(path, "split list", MANUAL)) as f:
    return [line.split()[0] for line in f if line.strip()]


class Voc2012Aug(builder_base.PhotoSegmentationBuilder):
  """VOC 2012 + SBD semantic segmentation (21 classes)."""

  CLASS_NAMES = CLASS_NAMES
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL

  def _split_generators(self, dl_manager):
    manual = builder_base.manual_dir(dl_manager)
    voc = locate(manual, os.path.join("VOCdevkit", "VOC2012"), VOC_TAR, dl_manager, MANUAL)
    sbd = os.path.join(locate(manual, "benchmark_RELEASE", SBD_TGZ, dl_manager, MANUAL), "dataset")
    seg_sets = os.path.join(voc, "ImageSets", "Segmentation")
    voc_train, voc_val = read_ids(os.path.join(seg_sets, "train.txt")), read_ids(os.path.join(seg_sets, "val.txt"))
    sbd_ids = read_ids(os.path.join(sbd, "train.txt")) + read_ids(os.path.join(sbd, "val.txt"))
    excluded = set(voc_val)
    train_aug = sorted(set(voc_train + sbd_ids) - excluded)
    voc_labelled = set(voc_train) | set(voc_val)
    return {"train_aug": self._generate_examples(voc, sbd, train_aug, voc_labelled),
            "train": self._generate_examples(voc, sbd, voc_train, voc_labelled),
            "val": self._generate_examples(voc, sbd, voc_val, voc_labelled)}

  def _generate_examples(self, voc: str, sbd: str, ids: list[str], voc_labelled: set[str]):
    for image_id in ids:
      if image_id in voc_labelled:
        label_path, read_label = os.path.join(voc, "SegmentationClass", f"{image_id}.png"), builder_base.read_palette_png
      else:
        label_path, read_label = os.path.join(sbd, "cls", f"{image_id}.mat"), builder_base.read_sbd_mat
      pair = builder_base.read_pair(os.path.join(voc, "JPEGImages", f"{image_id}.jpg"), label_path, read_label,
                                len(CLASS_NAMES))
      yield image_id, {**pair, "file_name": image_id}
