"""TFDS builders of the project's datasets, registered with TFDS on import: scale_shapes (embedded, generated
locally), voc2012_aug (PASCAL VOC 2012 + SBD) and pascal_person_part (both from manual downloads)."""
from __future__ import annotations

from scaleattn.datasets import pascal_person_part, scale_shapes, voc2012_aug
from scaleattn.datasets.label_io import DataError

_CLASS_NAMES = {
    "scale_shapes": scale_shapes.CLASS_NAMES,
    "voc2012_aug": voc2012_aug.CLASS_NAMES,
    "pascal_person_part": pascal_person_part.CLASS_NAMES,
}
__all__ = ["DataError", "class_names"]


def class_names(name: str) -> tuple[str, ...]:
  """Class names of a dataset, index = label value."""
  if name not in _CLASS_NAMES:
    raise KeyError(f"unknown dataset {name!r}; expected one of {sorted(_CLASS_NAMES)}")
  return _CLASS_NAMES[name]
