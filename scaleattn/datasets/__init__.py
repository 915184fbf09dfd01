"""TFDS builders of the project's datasets, registered on import: scale_shapes (embedded, generated locally),
voc2012_aug (PASCAL VOC 2012 + SBD) and pascal_person_part (manual downloads)."""
from __future__ import annotations

from scaleattn.datasets import scale_shapes

_CLASS_NAMES = {"scale_shapes": scale_shapes.CLASS_NAMES}


def register() -> None:
  """Importing this package registers the builders with TFDS; this makes the dependency explicit."""


def class_names(name: str) -> tuple[str, ...]:
  if name not in _CLASS_NAMES:
    raise KeyError(f"unknown dataset {name!r}; expected one of {sorted(_CLASS_NAMES)}")
  return _CLASS_NAMES[name]
