"""`image_folder`: a segmentation dataset of your own, from a folder (config.dataset.manual_dir) laid out as

  images/NAME.EXT    the photographs, any format Pillow reads (JPEGs are stored as they are, others as PNG)
  masks/NAME.png     one label PNG per image, same stem: an index mask ('L', 'I;16', '1'), a palette mask ('P',
                     its indices ARE the labels, never converted through RGB) or an RGB colour mask (read through
                     the colours of classes.json; alpha is ignored)
  classes.txt        one class name per line, the first naming label 0; or instead
  classes.json       {"names": [...], "colours": [[r, g, b], ...] (colour masks), "ignore": 255,
                     "ignore_colour": [r, g, b] (colour masks)}: only "names" is required
  splits/            optional: train.txt and validation.txt (and test.txt) listing stems, one per line

Without splits/, validation is round(10%) of the images (at least one), the first ones of a permutation of the
sorted stems drawn with numpy's default_rng(0); train is the rest; there is no test split. Labels are stored as
uint8 with the ignore value mapped to 255, so a folder has at most 255 classes. The build runs the label doctor
(`python -m scaleattn.doctor DIR`) on the folder first and stops, writing nothing, on any error it finds.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from ml_collections.config_dict.config_dict import _Op  # what FieldReference(op=...) takes
from tensorflow_datasets.core import constants

from scaleattn.data import builder_base, doctor
from scaleattn.data.builder_base import DataError
from scaleattn.data.folder_format import (
  CLASSES_JSON,
  CLASSES_TXT,
  IMAGES,
  LAYOUT,
  MASKS,
  SPLITS,
  ClassTable,
  label_values,
  load_mask,
  stored_label,
)

NAME = "image_folder"


def prepared_dir(folder: str) -> str:
  """Where a folder is prepared unless config.dataset.data_dir says otherwise: a data_dir of its own per folder
  and per state of its files (names, sizes, modification times), so a changed folder is prepared anew, never
  read stale, and two folders never share a prepared copy."""
  folder = os.path.abspath(os.path.expanduser(folder))
  digest = hashlib.sha256(folder.encode())
  paths = [os.path.join(folder, n) for n in (CLASSES_TXT, CLASSES_JSON)]
  for sub in (IMAGES, MASKS, SPLITS):
    if os.path.isdir(os.path.join(folder, sub)):
      paths += sorted(e.path for e in os.scandir(os.path.join(folder, sub)) if e.is_file())
  for path in paths:
    if os.path.exists(path):
      stat = os.stat(path)
      digest.update(f"{os.path.relpath(path, folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return os.path.join(constants.DATA_DIR, "image_folders", f"{os.path.basename(folder)}-{digest.hexdigest()[:12]}")


def _of_folder(_, fn: Callable[[str], object], folder: str) -> object:
  return fn(folder)


def from_folder(manual_dir: ml_collections.FieldReference, fn: Callable[[str], object],
                field_type: type) -> ml_collections.FieldReference:
  """A config field computed as fn(manual_dir) each time it is read, so it follows a --config.dataset.manual_dir
  given on the command line (config files are evaluated before flags override their fields); None while
  manual_dir is None. Setting the field (e.g. --config.dataset.num_classes=4) replaces the computation."""
  return ml_collections.FieldReference(field_type(), field_type=field_type, op=_Op(_of_folder, [fn, manual_dir]))


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """A folder of images, masks and a classes file (see the module docstring); class names in the metadata."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),  # JPEG bytes as they came, other images as PNG
            "label": builder_base.label_feature(),
            "file_name": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    folder = builder_base.manual_dir(dl_manager)
    report = doctor.diagnose(folder)
    (logging.warning if report.warnings else logging.info)("%s", report.format())
    if report.errors:
      raise DataError(report.error_message())
    self.info.metadata.update(class_names=list(report.classes.names), split_source=report.split_source)
    return {split: self._generate_examples(report.pairs, stems, report.classes)
            for split, stems in report.splits.items()}

  def _generate_examples(self, pairs: dict[str, tuple[str, str]], stems: list[str], table: ClassTable):
    for stem in stems:
      image_path, mask_path = pairs[stem]
      pixels, stored = builder_base.read_jpeg(image_path)
      label = stored_label(label_values(load_mask(mask_path), table), table)
      builder_base.check_pair(pixels, label, len(table.names), image_path, mask_path)
      yield stem, {"image": stored, "label": label.astype(np.uint8), "file_name": stem}
