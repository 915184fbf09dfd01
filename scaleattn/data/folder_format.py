"""The image-folder format: the layout (images/, masks/, classes file, splits/), the class table, the masks and how
their values become labels, the stems and the splits. Both the `image_folder` builder and the label doctor read a
folder through this module; the format itself is described in image_folder.py's docstring."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from scaleattn.data.builder_base import DataError
from scaleattn.data.preprocessing import IGNORE_LABEL

IMAGES, MASKS, SPLITS = "images", "masks", "splits"
CLASSES_TXT, CLASSES_JSON = "classes.txt", "classes.json"
CLASSES_KEYS = ("names", "colours", "ignore", "ignore_colour")
SPLIT_NAMES = ("train", "validation", "test")
REQUIRED_SPLITS = ("train", "validation")
VALIDATION_FRACTION, SPLIT_SEED = 0.1, 0
MAX_CLASSES = IGNORE_LABEL  # labels 0..254 stored as uint8, 255 = ignore
MASK_KINDS = {"1": "index", "L": "index", "I": "index", "I;16": "index", "I;16B": "index", "I;16L": "index",
              "P": "palette", "RGB": "colour", "RGBA": "colour"}  # any other Pillow mode is not a mask
LAYOUT = ("Put images/NAME.jpg (any image format), masks/NAME.png (same stems) and classes.txt (one class name per "
          "line) or classes.json into one folder and pass it as config.dataset.manual_dir; see "
          "scaleattn/data/image_folder.py for the mask modes and split lists.")

Colour = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class ClassTable:
  """A folder's classes: names (index = label), the colours of colour masks (None: no colour masks), the value that
  marks ignored pixels in index masks and the colour that marks them in colour masks."""
  path: str
  names: tuple[str, ...]
  colours: tuple[Colour, ...] | None = None
  ignore: int = IGNORE_LABEL
  ignore_colour: Colour | None = None

  def colour_classes(self) -> dict[Colour, int]:
    """Colour -> label value (the ignore value for the ignore colour); empty without colours."""
    table = {} if self.colours is None else dict(zip(self.colours, range(len(self.names)), strict=True))
    if self.ignore_colour is not None:
      table[self.ignore_colour] = self.ignore
    return table


def _colour(value, what: str, problems: list[str]) -> Colour | None:
  if (isinstance(value, list) and len(value) == 3
      and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
    return tuple(value)
  problems.append(f"{what}={value!r}: expected [r, g, b] with integers 0..255")
  return None


def _table(path: str, raw: dict) -> ClassTable:
  """A ClassTable from classes.json's object; a DataError listing every problem."""
  problems = [f"unknown key {k!r}; expected some of {CLASSES_KEYS}" for k in raw if k not in CLASSES_KEYS]
  names = raw.get("names")
  if not (isinstance(names, list) and all(isinstance(n, str) and n.strip() for n in names)):
    problems.append(f"names={names!r}: expected a list of non-empty class names")
    names = []
  colours = raw.get("colours")
  if colours is not None:
    if not isinstance(colours, list) or len(colours) != len(names):
      problems.append(f"colours: expected a list of {len(names)} [r, g, b] colours, one per name")
      colours = []
    colours = [_colour(c, f"colours[{k}]", problems) for k, c in enumerate(colours)]
    repeated = sorted({c for c in colours if c is not None and colours.count(c) > 1})
    if repeated:
      problems.append(f"colours {[list(c) for c in repeated]} are given to more than one class")
  ignore = raw.get("ignore", IGNORE_LABEL)
  if not isinstance(ignore, int) or isinstance(ignore, bool) or not len(names) <= ignore <= 65535:
    problems.append(f"ignore={ignore!r}: expected an integer from {len(names)} (past the last class) to 65535")
  ignore_colour = raw.get("ignore_colour")
  if ignore_colour is not None:
    ignore_colour = _colour(ignore_colour, "ignore_colour", problems)
    if ignore_colour is not None and colours and ignore_colour in colours:
      problems.append(f"ignore_colour={list(ignore_colour)} is also the colour of class "
                      f"{names[colours.index(ignore_colour)]!r}")
  if problems:
    raise DataError(f"{path}: " + "; ".join(problems))
  return ClassTable(path, tuple(names), tuple(colours) if colours is not None else None, ignore, ignore_colour)


def read_classes(folder: str) -> ClassTable:
  """The folder's classes.txt or classes.json, checked: 2..255 distinct names; a DataError naming the file."""
  txt, js = os.path.join(folder, CLASSES_TXT), os.path.join(folder, CLASSES_JSON)
  if not os.path.isdir(folder):
    raise DataError(f"{folder}: no such folder. {LAYOUT}")
  if os.path.exists(txt) and os.path.exists(js):
    raise DataError(f"{folder}: both {CLASSES_TXT} and {CLASSES_JSON}; keep one")
  try:
    if os.path.exists(js):
      with open(js, encoding="utf-8-sig") as f:  # -sig: a byte-order mark, as some editors write, is no name
        raw = json.load(f)
      if not isinstance(raw, dict):
        raise DataError(f"{js}: expected an object with \"names\" (and optionally {CLASSES_KEYS[1:]}), got "
                        f"{type(raw).__name__}")
      table = _table(js, raw)
    elif os.path.exists(txt):
      with open(txt, encoding="utf-8-sig") as f:
        lines = f.read().rstrip().split("\n")
      if "" in (line.strip() for line in lines):
        raise DataError(f"{txt}: line {[line.strip() for line in lines].index('') + 1} is empty; every line up to "
                        "the last names a class (line k = label k-1)")
      table = ClassTable(txt, tuple(line.strip() for line in lines))
    else:
      raise DataError(f"{folder}: no {CLASSES_TXT} or {CLASSES_JSON}. {LAYOUT}")
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{js if os.path.exists(js) else txt}: cannot read ({type(e).__name__}: {e})") from e
  repeated = sorted({n for n in table.names if table.names.count(n) > 1})
  if repeated or not 2 <= len(table.names) <= MAX_CLASSES:
    raise DataError(f"{table.path}: {len(table.names)} class names{f', {repeated} repeated' if repeated else ''}; "
                    f"expected 2 to {MAX_CLASSES} distinct names (background counts as a class)")
  return table


def class_names(folder: str) -> tuple[str, ...]:
  return read_classes(folder).names


def num_classes(folder: str) -> int:
  return len(class_names(folder))


def list_stems(directory: str) -> tuple[dict[str, str], dict[str, list[str]]]:
  """The files of `directory` (not hidden, not in subfolders) by stem, and the stems that several files share."""
  files = sorted(e.path for e in os.scandir(directory) if e.is_file() and not e.name.startswith("."))
  by_stem: dict[str, list[str]] = {}
  for path in files:
    by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)
  return {s: p[0] for s, p in by_stem.items()}, {s: p for s, p in by_stem.items() if len(p) > 1}


def read_split_lists(folder: str) -> dict[str, list[str]] | None:
  """splits/NAME.txt -> its stems (blank lines skipped) for every .txt in splits/; None without splits/."""
  directory = os.path.join(folder, SPLITS)
  if not os.path.isdir(directory):
    return None
  lists = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".txt"):
      with open(os.path.join(directory, name), encoding="utf-8-sig") as f:
        lists[name[:-4]] = [line.strip() for line in f if line.strip()]
  return lists


def seeded_splits(stems: list[str]) -> dict[str, list[str]]:
  """train / validation when the folder has no split lists: see the module docstring."""
  order = sorted(stems)
  permuted = [order[i] for i in np.random.default_rng(SPLIT_SEED).permutation(len(order))]
  k = max(1, round(VALIDATION_FRACTION * len(order)))
  return {"train": sorted(permuted[k:]), "validation": sorted(permuted[:k])}


@dataclasses.dataclass(frozen=True)
class Mask:
  """A decoded mask file: its format and mode as Pillow reads them, its pixels ([H, W] for index and palette
  masks, [H, W, 3] RGB for colour masks) and a palette mask's palette ([N, 3] uint8)."""
  path: str
  format: str
  mode: str
  pixels: np.ndarray
  palette: np.ndarray | None

  @property
  def kind(self) -> str | None:
    """'index', 'palette', 'colour', or None for a Pillow mode that is not a mask."""
    return MASK_KINDS.get(self.mode)


def load_mask(path: str) -> Mask:
  """The mask file fully decoded, its palette indices kept as they are; a DataError if it cannot be read."""
  try:
    with Image.open(path) as im:
      fmt, mode = im.format or "", im.mode
      pixels = np.asarray(im.convert("RGB") if mode == "RGBA" else im)
      palette = im.getpalette()
  except Exception as e:  # as label_io: any failure to parse a file is that file's problem
    raise DataError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from e
  palette = np.asarray(palette, np.uint8).reshape(-1, 3) if mode == "P" and palette else None
  return Mask(path, fmt, mode, pixels, palette)


def colour_codes(rgb: np.ndarray) -> np.ndarray:
  """One int per colour (r << 16 | g << 8 | b) of [..., 3] uint8 colours."""
  rgb = np.asarray(rgb, np.int64)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def label_values(mask: Mask, table: ClassTable) -> np.ndarray:
  """The label value of every pixel (int64 [H, W]): an index or palette mask's own values; for a colour mask the
  class of each colour in the table (the ignore value for the ignore colour, -1 for a colour not in it)."""
  if mask.kind in ("index", "palette"):
    return mask.pixels.astype(np.int64)
  if mask.kind != "colour" or table.colours is None:
    raise DataError(f"{mask.path}: a mode-{mask.mode!r} mask cannot be read with {table.path}, which has no colours")
  codes, inverse = np.unique(colour_codes(mask.pixels), return_inverse=True)
  lookup = {int(colour_codes(np.asarray(c))): v for c, v in table.colour_classes().items()}
  return np.asarray([lookup.get(int(c), -1) for c in codes], np.int64)[inverse.reshape(mask.pixels.shape[:2])]


def stored_label(values: np.ndarray, table: ClassTable) -> np.ndarray:
  """Label values as stored: classes kept, the ignore value -> 255, anything else -> -1 (which check_pair
  rejects)."""
  valid = (values >= 0) & (values < len(table.names))
  return np.where(values == table.ignore, IGNORE_LABEL, np.where(valid, values, -1))
