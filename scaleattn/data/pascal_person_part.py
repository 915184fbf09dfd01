"""`pascal_person_part`: PASCAL-Person-Part (Chen et al. 2014), 7 classes, 1,716 train / 1,817 val.

Manual directory: `pascal_person_part_gt/*.png` (palette PNGs), `pascal_person_part_trainval_list/{train,val}.txt`
(two columns: image path, label path; only the file names are used) and the VOC 2012 images
(`VOCdevkit/VOC2012/JPEGImages`, or the VOC tar).
"""
from __future__ import annotations

import os

from scaleattn.data import builder_base, voc2012_aug

CLASS_NAMES = ("background", "head", "torso", "upper_arms", "lower_arms", "upper_legs", "lower_legs")
MANUAL = ("Put the PASCAL-Person-Part annotations (pascal_person_part_gt/ and pascal_person_part_trainval_list/, "
          "from http://liangchiehchen.com/projects/DeepLab.html) and the VOC 2012 images (VOCdevkit/VOC2012/ or "
          f"{voc2012_aug.VOC_TAR}) into the manual directory (config.dataset.manual_dir).")


class PascalPersonPart(builder_base.PhotoSegmentationBuilder):
  """PASCAL-Person-Part human part segmentation (7 classes)."""

  CLASS_NAMES = CLASS_NAMES
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL

  def _split_generators(self, dl_manager):
    manual = builder_base.manual_dir(dl_manager)
    gt = builder_base.require(os.path.join(manual, "pascal_person_part_gt"), "pascal_person_part_gt/", MANUAL)
    lists = builder_base.require(os.path.join(manual, "pascal_person_part_trainval_list"),
                             "pascal_person_part_trainval_list/", MANUAL)
    voc = voc2012_aug.locate(manual, os.path.join("VOCdevkit", "VOC2012"), voc2012_aug.VOC_TAR, dl_manager, MANUAL)
    return {split: self._generate_examples(os.path.join(lists, f"{split}.txt"), gt, voc)
            for split in ("train", "val")}

  def _generate_examples(self, list_path: str, gt: str, voc: str):
    with open(builder_base.require(list_path, "split list", MANUAL)) as f:
      rows = [line.split() for line in f if line.strip()]
    for row in rows:
      if len(row) != 2:
        raise builder_base.DataError(f"{list_path}: expected two columns (image, label), got {' '.join(row)!r}")
      image_id = os.path.splitext(os.path.basename(row[0]))[0]
      pair = builder_base.read_pair(os.path.join(voc, "JPEGImages", f"{image_id}.jpg"),
                                os.path.join(gt, os.path.basename(row[1])), builder_base.read_palette_png,
                                len(CLASS_NAMES))
      yield image_id, {**pair, "file_name": image_id}
