"""TFDS builders of the project's datasets, registered with TFDS on import: scale_shapes (embedded, generated
locally), voc2012_aug (PASCAL VOC 2012 + SBD) and pascal_person_part (both from manual downloads), and
image_folder (a folder of your own, whose classes its config reads from the folder)."""
from __future__ import annotations

import ml_collections

from scaleattn.data import image_folder, pascal_person_part, scale_shapes, voc2012_aug  # noqa: F401 - registers
from scaleattn.data.builder_base import DataError

_CLASS_NAMES = {
    "scale_shapes": scale_shapes.CLASS_NAMES,
    "voc2012_aug": voc2012_aug.CLASS_NAMES,
    "pascal_person_part": pascal_person_part.CLASS_NAMES,
}
__all__ = ["DataError", "class_names"]


def class_names(dataset: str | ml_collections.ConfigDict) -> tuple[str, ...]:
  """Class names of a dataset, given by name or by its config (config.dataset), index = label value. A folder
  dataset's depend on the folder: its config holds them (config.dataset.class_names, see configs/folder.py)."""
  if not isinstance(dataset, str):
    if dataset.get("class_names") is not None:
      return tuple(dataset.class_names)
    dataset = dataset.name
  if dataset not in _CLASS_NAMES:
    raise KeyError(f"unknown dataset {dataset!r}; expected one of {sorted(_CLASS_NAMES)}, or a config.dataset "
                   "whose class_names are set (configs/folder.py reads them from config.dataset.manual_dir)")
  return _CLASS_NAMES[dataset]
