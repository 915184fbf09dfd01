"""The label doctor: checks an `image_folder` dataset (layout in folder_format.py) by reading it exactly as the
builder does, and reports the mask modes, the classes' share of the pixels in each split and every problem with
the file at fault. The builder runs it before writing anything and stops on errors.

  python -m scaleattn.doctor DIR      # exit status 0: no errors (warnings allowed), 1: errors

Errors, found in files whose labels would be wrong or that cannot be used:
  layout          DIR, images/ or masks/ missing; no images
  classes_file    classes.txt / classes.json missing, unreadable or invalid
  unreadable      an image or mask that does not decode fully
  no_mask         an image without a mask of the same stem (unlabelled images are not skipped silently: a stem
  no_image        a mask without an image                   mismatch usually means a naming problem)
  duplicate_stem  two files with one stem in images/ or masks/
  size_mismatch   a mask of another size than its image
  lossy_mask      a JPEG mask (its edges hold values of no class)
  unsupported_mode  a mask neither index ('1', 'L', 'I', 'I;16'), palette ('P') nor colour ('RGB', 'RGBA')
  out_of_range    index or palette values outside 0..C-1 other than the ignore value
  one_based       no 0 in any index or palette mask while some reach C: labels 1..C, or a class missing
  rgb_without_colours  a colour mask and no colours in classes.json
  unknown_colour  a colour mask's colours that are neither a class's nor the ignore colour
  palette_conflict  a palette mask drawing an index in the colour classes.json gives another class
  split_file      a split list with an unknown name, none for train or validation, or listing nothing
  split_stem      a split list naming a stem with no image, or a stem twice
  too_few_images  fewer than 2 image/mask pairs (a train and a validation split are needed)
Warnings, which may be intended:
  palette_reordered  as palette_conflict, against the VOC colour map when classes.json gives no colours
  mixed_masks     colour masks beside index or palette masks
  class_absent    a class with no pixel in train
  unused_image    pairs in no split list

Masks read the wrong way, as far as the files tell: a palette mask is always read by its indices, so when its
palette draws index i in the colour of class j (the table's, or VOC's without a table) the picture and the labels
disagree (palette_conflict / palette_reordered); a colour mask without a colour table cannot be read, and is
said to be grey (an index mask saved as RGB) or VOC-coloured (a palette mask flattened to RGB) when it is; an
index mask's out-of-range values that are the grey levels of the classes' colours (the table's, or VOC's) mark a
colour mask converted to greyscale.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from scaleattn.data import builder_base, folder_format
from scaleattn.data.builder_base import DataError
from scaleattn.data.folder_format import ClassTable, Mask
from scaleattn.visualize import voc_palette

ERROR, WARNING = "error", "warning"
SHOWN_IN_BUILD_ERROR = 20  # errors listed when the doctor stops a build; the command lists them all
_EXAMPLES = 5  # values, colours or stems quoted in one message


@dataclasses.dataclass(frozen=True)
class Problem:
  severity: str  # ERROR or WARNING
  kind: str
  path: str  # the file (or folder) at fault
  message: str


@dataclasses.dataclass(frozen=True)
class PairCheck:
  """What one image/mask pair showed: problems, the mask's mode, pixels per label value 0..C-1 then ignore (None
  when the values are unknown), pixels per out-of-range value of an index or palette mask, the image's size."""
  problems: list[Problem]
  mode: str | None = None
  counts: np.ndarray | None = None
  out_of_range: dict[int, int] = dataclasses.field(default_factory=dict)
  image_size: tuple[int, int] | None = None


def _message(e: DataError, path: str) -> str:
  return str(e).removeprefix(f"{path}: ")


def _n(count: int, word: str) -> str:
  return f"{count} {word}{'s' * (count != 1)}"


def _colours(values: np.ndarray) -> str:
  return ", ".join(str(list(map(int, c))) for c in values[:_EXAMPLES]) + (" ..." if len(values) > _EXAMPLES else "")


def _reference(table: ClassTable) -> tuple[dict[int, int], str]:
  """Colour code -> label value that a mask's colours are compared with: the table's colours, else the VOC colour
  map (its first C colours and colour 255 for the ignore value); and what to call them."""
  if table.colours is not None:
    codes = {int(folder_format.colour_codes(np.asarray(c))): v for c, v in table.colour_classes().items()}
    return codes, os.path.basename(table.path)
  voc = folder_format.colour_codes(voc_palette())
  return {int(voc[255]): table.ignore, **{int(voc[j]): j for j in range(len(table.names))}}, "the VOC colour map"


def _colour_hint(colours: np.ndarray, table: ClassTable) -> str:
  """Why a colour mask's colours may not be in the table: an index mask saved as RGB, or VOC colours."""
  if np.all(colours == colours[:, :1]):
    return " They are all grey: an index mask saved as RGB? Save it as greyscale ('L') or palette ('P')."
  voc = set(folder_format.colour_codes(voc_palette()[list(range(len(table.names))) + [255]]).tolist())
  if set(folder_format.colour_codes(colours).tolist()) <= voc:
    return (" They are VOC colour-map colours: a palette mask flattened to RGB? Save it as a palette PNG (the "
            "indices are the labels) or give classes.json the VOC colours.")
  return ""


def _palette_problem(mask: Mask, table: ClassTable) -> Problem | None:
  """A palette mask whose palette draws an index in the colour of another label (see the module docstring)."""
  if mask.palette is None:
    return None
  reference, where = _reference(table)
  c = len(table.names)
  meaning = lambda v: table.names[v] if v < c else "ignore"
  conflicts = []
  for v in np.unique(mask.pixels).tolist():
    other = reference.get(int(folder_format.colour_codes(mask.palette[v]))) if v < len(mask.palette) else None
    if (v < c or v == table.ignore) and other is not None and other != v:
      conflicts.append(f"index {v} ({meaning(v)!r}) is drawn in {list(map(int, mask.palette[v]))}, the colour "
                       f"{where} gives to {meaning(other)!r}")
  if not conflicts:
    return None
  advice = "palette masks are read by their indices; re-save it with indices matching the colours, or as RGB"
  if table.colours is None:
    return Problem(WARNING, "palette_reordered", mask.path, "; ".join(conflicts[:_EXAMPLES]) +
                   f": the picture and the labels disagree unless the palette is not meant as VOC's ({advice})")
  return Problem(ERROR, "palette_conflict", mask.path, "; ".join(conflicts[:_EXAMPLES]) + f": {advice}")


def _grey_hint(values: list[int], table: ClassTable) -> str:
  """For an 'L' mask's out-of-range values: the grey levels of the classes' colours, if they are."""
  reference = np.asarray(table.colours) if table.colours is not None else voc_palette()[:len(table.names)]
  grey = np.asarray(Image.fromarray(reference.astype(np.uint8)[None], "RGB").convert("L"))[0]
  if not set(values) <= set(grey.tolist()):
    return ""
  named = sorted({table.names[int(np.flatnonzero(grey == v)[0])] for v in values})
  return (f" They are the grey levels of the colours of {named} in "
          f"{'classes.json' if table.colours is not None else 'the VOC colour map'}: a colour mask converted to "
          "greyscale? Save the labels themselves (or the colour mask with colours in classes.json).")


def check_pair(image_path: str, mask_path: str, table: ClassTable | None) -> PairCheck:
  """Reads one pair as the builder would and notes every problem (the label values only with a class table)."""
  problems, size = [], None
  try:
    size = builder_base.read_jpeg(image_path)[0].shape[:2]
  except DataError as e:
    problems.append(Problem(ERROR, "unreadable", image_path, _message(e, image_path)))
  try:
    mask = folder_format.load_mask(mask_path)
  except DataError as e:
    return PairCheck(problems + [Problem(ERROR, "unreadable", mask_path, _message(e, mask_path))], image_size=size)
  if mask.format == "JPEG":
    return PairCheck(problems + [Problem(ERROR, "lossy_mask", mask_path, "a JPEG mask: lossy compression leaves "
                                         "values of no class along edges; save masks as PNG")], mask.mode, None,
                     image_size=size)
  if mask.kind is None:
    return PairCheck(problems + [Problem(ERROR, "unsupported_mode", mask_path, f"mode {mask.mode!r}: expected an "
                                         f"index, palette or colour mask, one of {tuple(folder_format.MASK_KINDS)}")],
                     mask.mode, image_size=size)
  if size is not None and mask.pixels.shape[:2] != size:
    problems.append(Problem(ERROR, "size_mismatch", mask_path, f"mask is {mask.pixels.shape[0]}x"
                            f"{mask.pixels.shape[1]} but image {folder_format.IMAGES}/{os.path.basename(image_path)} "
                            f"is {size[0]}x{size[1]}"))
  if table is None:
    return PairCheck(problems, mask.mode, image_size=size)
  if mask.kind == "colour" and table.colours is None:
    colours = np.unique(mask.pixels.reshape(-1, 3), axis=0)
    return PairCheck(problems + [Problem(ERROR, "rgb_without_colours", mask_path, f"an RGB colour mask "
                                         f"({_n(len(colours), 'colour')}: {_colours(colours)}) but "
                                         f"{os.path.basename(table.path)} gives no "
                                         f"colours to read it with.{_colour_hint(colours, table)}")],
                     mask.mode, image_size=size)
  values = folder_format.label_values(mask, table)
  if mask.kind == "colour" and np.any(values < 0):
    unknown, counts = np.unique(mask.pixels[values < 0], axis=0, return_counts=True)
    order = np.argsort(-counts)
    problems.append(Problem(ERROR, "unknown_colour", mask_path, f"{_n(int(counts.sum()), 'pixel')} in "
                            f"{_n(len(unknown), 'colour')} not in {os.path.basename(table.path)}: "
                            f"{_colours(unknown[order])}."
                            f"{_colour_hint(unknown, table)}"))
  if mask.kind == "palette" and (problem := _palette_problem(mask, table)) is not None:
    problems.append(problem)
  c = len(table.names)
  counts = np.bincount(values[(values >= 0) & (values < c)], minlength=c)
  out_of_range = {}
  if mask.kind != "colour":
    bad, bad_counts = np.unique(values[(values >= c) & (values != table.ignore)], return_counts=True)
    out_of_range = dict(zip(bad.tolist(), bad_counts.tolist(), strict=True))
  return PairCheck(problems, mask.mode, np.append(counts, np.sum(values == table.ignore)), out_of_range, size)


def _out_of_range(path: str, mode: str, values: dict[int, int], table: ClassTable) -> Problem:
  shown = sorted(values)[:_EXAMPLES]
  return Problem(ERROR, "out_of_range", path, f"{_n(sum(values.values()), 'pixel')} with values "
                 f"{shown}{' ...' if len(values) > _EXAMPLES else ''} outside 0..{len(table.names) - 1} (and the "
                 f"ignore value {table.ignore})." + (_grey_hint(sorted(values), table) if mode == "L" else ""))


@dataclasses.dataclass
class Report:
  """What the doctor found in a folder; `splits` and `pairs` are what the builder writes when there is no error."""
  folder: str
  classes: ClassTable | None
  num_images: int
  pairs: dict[str, tuple[str, str]]  # stem -> (image, mask)
  splits: dict[str, list[str]]
  split_source: str
  modes: dict[str, int]  # Pillow mode of the masks -> count
  counts: dict[str, np.ndarray]  # split -> pixels per label 0..C-1, then ignore
  largest: tuple[int, int] | None  # (height, width) of the largest image
  problems: list[Problem]

  @property
  def errors(self) -> list[Problem]:
    return [p for p in self.problems if p.severity == ERROR]

  @property
  def warnings(self) -> list[Problem]:
    return [p for p in self.problems if p.severity == WARNING]

  def mask_kinds(self) -> str:
    kinds = sorted({folder_format.MASK_KINDS.get(m, m) for m in self.modes})
    return f"{' and '.join(kinds)} masks" if kinds else "no masks"

  def summary(self) -> str:
    e, w = len(self.errors), len(self.warnings)
    return (f"{self.num_images} images, {len(self.classes.names) if self.classes else '?'} classes, "
            f"{self.mask_kinds()}: {e} error{'s' * (e != 1)}, {w} warning{'s' * (w != 1)}")

  def _line(self, p: Problem) -> str:
    return f"  {p.severity:7s} {p.kind:19s} {os.path.relpath(p.path, self.folder)}: {p.message}"

  def format(self) -> str:
    lines = [f"Label doctor: {self.folder}"]
    if self.classes:
      c = self.classes
      lines.append(f"{os.path.basename(c.path)}: {len(c.names)} classes ({', '.join(c.names)}), ignore value "
                   f"{c.ignore}" + (f", colours {[list(x) for x in c.colours]}" if c.colours else "")
                   + (f", ignore colour {list(c.ignore_colour)}" if c.ignore_colour else ""))
    lines.append(f"masks: {self.mask_kinds()} ({', '.join(f'{m}: {n}' for m, n in sorted(self.modes.items()))})")
    lines.append(f"splits: {self.split_source}")
    for split, stems in self.splits.items():
      counts = self.counts.get(split)
      share = ""
      if self.classes and counts is not None and counts.sum():
        names = [*self.classes.names, "ignore"]
        share = ", ".join(f"{n} {100 * k / counts.sum():.1f}%" for n, k in zip(names, counts, strict=True))
      lines.append(f"  {split} ({len(stems)} image{'s' * (len(stems) != 1)}): {share}")
    if self.largest:
      lines.append(f"largest image: {self.largest[0]}x{self.largest[1]} (config.input.eval_size must be at least "
                   f"{max(self.largest)})")
    lines += ["problems:", *map(self._line, self.problems)] if self.problems else []
    return "\n".join([*lines, self.summary()])

  def error_message(self) -> str:
    """The build's error: the first errors, how to see them all, the summary."""
    errors = self.errors
    more = len(errors) - SHOWN_IN_BUILD_ERROR
    return "\n".join([f"{self.folder}: the label doctor found errors; nothing was written:",
                      *map(self._line, errors[:SHOWN_IN_BUILD_ERROR]),
                      *([f"  ... and {more} more: python -m scaleattn.doctor {self.folder}"] if more > 0
                        else []),
                      self.summary()])


def _listing(folder: str, problems: list[Problem]) -> tuple[dict[str, str], dict[str, str]]:
  """Images and masks by stem; layout, duplicate-stem and unmatched-file problems."""
  found = []
  for sub in (folder_format.IMAGES, folder_format.MASKS):
    path = os.path.join(folder, sub)
    if not os.path.isdir(path):
      problems.append(Problem(ERROR, "layout", path, f"no {sub}/ folder. {folder_format.LAYOUT}"))
      found.append({})
      continue
    files, duplicates = folder_format.list_stems(path)
    for stem, paths in duplicates.items():
      problems.append(Problem(ERROR, "duplicate_stem", paths[1], f"{len(paths)} files have the stem {stem!r}: "
                              f"{[os.path.basename(p) for p in paths]}; keep one"))
    found.append(files)
  images, masks = found
  if os.path.isdir(os.path.join(folder, folder_format.IMAGES)) and not images:
    problems.append(Problem(ERROR, "layout", os.path.join(folder, folder_format.IMAGES), "no image files (subfolders "
                            "are not read)"))
  for stem in sorted(set(images) - set(masks)):
    problems.append(Problem(ERROR, "no_mask", images[stem], f"no mask masks/{stem}.png"))
  for stem in sorted(set(masks) - set(images)):
    problems.append(Problem(ERROR, "no_image", masks[stem], f"no image images/{stem}.*"))
  return images, masks


def _splits(folder: str, images: dict[str, str], pairs: dict[str, tuple[str, str]],
            problems: list[Problem]) -> tuple[dict[str, list[str]], str]:
  """The splits the builder writes (from the lists, else seeded) and how they were made; problems with the lists."""
  lists = folder_format.read_split_lists(folder)
  directory = os.path.join(folder, folder_format.SPLITS)
  if lists is None:
    if len(pairs) < 2:
      problems.append(Problem(ERROR, "too_few_images", folder, f"{_n(len(pairs), 'image/mask pair')}: at least 2 are "
                              "needed, for a train and a validation split"))
      return {}, "none"
    return (folder_format.seeded_splits(list(pairs)),
            f"no {folder_format.SPLITS}/: {folder_format.VALIDATION_FRACTION:.0%} validation by a permutation of the "
            f"sorted stems with seed {folder_format.SPLIT_SEED}")
  for name in sorted(set(lists) - set(folder_format.SPLIT_NAMES)):
    problems.append(Problem(ERROR, "split_file", os.path.join(directory, f"{name}.txt"), "not a split name; "
                            f"expected {', '.join(f'{n}.txt' for n in folder_format.SPLIT_NAMES)}"))
  for name in folder_format.REQUIRED_SPLITS:
    if name not in lists:
      problems.append(Problem(ERROR, "split_file", directory, f"no {name}.txt (a {name} split is needed)"))
  seen: dict[str, str] = {}
  splits = {}
  for name in (n for n in folder_format.SPLIT_NAMES if n in lists):
    path = os.path.join(directory, f"{name}.txt")
    if not lists[name]:
      problems.append(Problem(ERROR, "split_file", path, "lists no image"))
    for stem in lists[name]:
      if stem in seen:
        problems.append(Problem(ERROR, "split_stem", path, f"{stem!r} is also listed in {seen[stem]}.txt"))
      elif stem not in images:
        problems.append(Problem(ERROR, "split_stem", path, f"{stem!r}: no image images/{stem}.*"))
      seen.setdefault(stem, name)
    splits[name] = [s for s in dict.fromkeys(lists[name]) if s in pairs and seen[s] == name]
  unused = sorted(set(pairs) - set(seen))
  if unused:
    problems.append(Problem(WARNING, "unused_image", directory, f"{_n(len(unused), 'image/mask pair')} in no split "
                            f"list, so not used: {unused[:_EXAMPLES]}{' ...' if len(unused) > _EXAMPLES else ''}"))
  return splits, f"the lists in {folder_format.SPLITS}/"


def diagnose(folder: str) -> Report:
  """Checks the folder; never raises for a problem with the data, which goes into the report."""
  folder = os.fspath(folder)
  problems: list[Problem] = []
  if not os.path.isdir(folder):
    problems.append(Problem(ERROR, "layout", folder, f"no such folder. {folder_format.LAYOUT}"))
    return Report(folder, None, 0, {}, {}, "none", {}, {}, None, problems)
  try:
    table = folder_format.read_classes(folder)
  except DataError as e:
    table = None
    path = next((p for p in (os.path.join(folder, n) for n in (folder_format.CLASSES_JSON, folder_format.CLASSES_TXT))
                 if str(e).startswith(f"{p}: ")), folder)
    problems.append(Problem(ERROR, "classes_file", path, _message(e, path)))
  images, masks = _listing(folder, problems)
  pairs = {s: (images[s], masks[s]) for s in sorted(set(images) & set(masks))}
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # decoding releases the GIL
    checks = dict(zip(pairs, pool.map(lambda p: check_pair(*p, table), pairs.values()), strict=True))
  for check in checks.values():
    problems += check.problems
  if table is not None:
    index_checks = [k for k in checks.values() if folder_format.MASK_KINDS.get(k.mode) in ("index", "palette")]
    c = len(table.names)
    reaching = [s for s, k in checks.items() if c in k.out_of_range]
    one_based = bool(reaching) and not any(k.counts is not None and k.counts[0] for k in index_checks)
    if one_based:
      problems.append(Problem(ERROR, "one_based", os.path.join(folder, folder_format.MASKS), f"no mask has label 0 "
                              f"while {len(reaching)} reach {c} (= the number of classes), e.g. {reaching[:3]}: the "
                              f"labels look 1-based; subtract 1 (keeping the ignore value {table.ignore}), or add "
                              f"the class of label 0 at the top of {os.path.basename(table.path)}"))
    for stem, k in checks.items():
      values = {v: n for v, n in k.out_of_range.items() if not (one_based and v == c)}
      if values:
        problems.append(_out_of_range(pairs[stem][1], k.mode, values, table))
  modes = collections.Counter(k.mode for k in checks.values() if k.mode is not None)
  kinds = {folder_format.MASK_KINDS.get(m) for m in modes}
  if "colour" in kinds and kinds & {"index", "palette"}:
    problems.append(Problem(WARNING, "mixed_masks", os.path.join(folder, folder_format.MASKS), f"colour masks beside "
                            f"index or palette masks ({dict(modes)}): each is read by its own mode, but a mix often "
                            "means some masks were converted"))
  splits, source = _splits(folder, images, pairs, problems)
  counts = {split: sum((checks[s].counts for s in stems if checks[s].counts is not None),
                       np.zeros(len(table.names) + 1, np.int64)) for split, stems in splits.items()} if table else {}
  if table is not None and "train" in counts and counts["train"].sum():
    train = counts["train"]
    for name in (n for n, k in zip(table.names, train, strict=False) if k == 0):
      problems.append(Problem(WARNING, "class_absent", table.path, f"class {name!r} has no pixel in train (the "
                              f"ignore value {table.ignore} covers {100 * train[-1] / train.sum():.1f}% of train's "
                              "pixels)"))
  sizes = [k.image_size for k in checks.values() if k.image_size is not None]
  largest = max(sizes, key=max) if sizes else None
  return Report(folder, table, len(images), pairs, splits, source, dict(modes), counts, largest, problems)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m scaleattn.doctor", description=__doc__.split("\n\n")[0])
  parser.add_argument("folder", help="the folder of images/, masks/ and classes.txt or classes.json")
  report = diagnose(parser.parse_args(argv).folder)
  print(report.format())
  return 1 if report.errors else 0
