"""The layout registry: which converter a weights file needs, decided from the names inside it.

A source file is first read into a flat state dict (name -> NumPy array) by `read_any`, which picks the reader from
the file's content, never its suffix:
  PyTorch .pth/.pt (zip or legacy pickle; no PyTorch needed)  names as in the file ('features.0.weight')
  .safetensors                                                names as in the file
  Caffe .caffemodel (V1 'layers' or V2 'layer')               '<layer>/<field>': Convolution and InnerProduct give
      'weight' and 'bias' (Caffe's shapes: [O, I, kh, kw], [O, I] or legacy [1, 1, O, I]); BatchNorm gives 'mean'
      and 'variance' (already divided by Caffe's scale factor); Scale gives 'gamma' and 'beta'; any other layer
      with blobs gives '0', '1', ...
  .npz                                                        the array names ('backbone/conv1_1/kernel')

A `Layout` then recognises a state dict by its names and converts it to this project's parameter tree:
  Layout(name, description, matches, convert, input_order)
    matches(names: set[str]) -> bool      True when the names are this layout's (cheap, no arrays read).
    convert(state, *, source, mean_rgb, **options) -> Tree
                                          `source` names the file in errors; `mean_rgb` is the mean the pipeline
                                          subtracts from RGB 0..255 (config.input.mean_rgb), which the first
                                          convolution absorbs together with any channel flip (BGR sources); the
                                          result is {'backbone': {layer: {'kernel' HWIO, 'bias'}}} plus 'fusion'
                                          entries when the source has an attention head. Layers the source lacks
                                          (e.g. fc8) are simply absent. Missing required names: ValueError naming
                                          `source`, the missing names and the names found.
    input_order 'rgb' | 'bgr'             what the source network was trained on (logged; convert does the flip).
  register(layout)                        adds a layout; the first registered layout that matches wins, so a
                                          layout must not match another's files.

  read_any(path) -> dict[str, np.ndarray]
  find_layout(names, source) -> Layout    the matching layout, or a ValueError listing what is registered.
  convert_file(path, *, mean_rgb, **options) -> (layout name, Tree)   read + find + convert, logging the layout.

Layouts live beside the formats they describe (`scaleattn.weights.vgg` registers the VGG-16 ones); importing
`scaleattn.weights` registers all of them.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

StateDict = dict[str, np.ndarray]
Tree = dict[str, Any]

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"


@dataclasses.dataclass(frozen=True)
class Layout:
  """A family of weight files recognised by their names, and how to turn one into this project's parameters."""
  name: str
  description: str
  matches: Callable[[set[str]], bool]
  convert: Callable[..., Tree]
  input_order: str = "rgb"

  def __post_init__(self):
    if self.input_order not in ("rgb", "bgr"):
      raise ValueError(f"Layout {self.name!r}: input_order={self.input_order!r}, expected 'rgb' or 'bgr'")


_LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
  """Adds `layout` to the registry (a second layout of the same name is an error)."""
  if layout.name in _LAYOUTS:
    raise ValueError(f"Layout {layout.name!r} is already registered")
  _LAYOUTS[layout.name] = layout
  return layout


def layouts() -> tuple[Layout, ...]:
  return tuple(_LAYOUTS.values())


def find_layout(names: set[str], source: str) -> Layout:
  """The first registered layout whose `matches` accepts `names`."""
  for layout in _LAYOUTS.values():
    if layout.matches(names):
      return layout
  sample = ", ".join(sorted(names)[:12]) + (", ..." if len(names) > 12 else "")
  known = "\n  ".join(f"{l.name}: {l.description}" for l in _LAYOUTS.values())
  raise ValueError(f"{source}: no known weights layout has these names ({len(names)} arrays: {sample}). "
                   f"Known layouts:\n  {known}")


def read_any(path: str) -> StateDict:
  """The flat state dict in `path`, read by the reader its content asks for (see the module docstring)."""
  from scaleattn.weights import caffe, safetensors, torch_pickle  # noqa: PLC0415 - they import this module.

  path_ = epath.Path(path)
  if not path_.exists():
    raise FileNotFoundError(f"{path}: no such file")
  with path_.open("rb") as f:
    head = f.read(16)
  if head.startswith(_ZIP_MAGIC):
    if torch_pickle.is_torch_zip(path):
      return torch_pickle.read(path)
    with path_.open("rb") as f, np.load(f) as data:
      return {k: data[k] for k in data.files}
  if head.startswith(_PICKLE_PROTO):
    return torch_pickle.read(path)
  if safetensors.looks_like(head):
    return safetensors.read(path)
  if caffe.looks_like(head):
    return caffe.read(path)
  raise ValueError(f"{path}: not a weights file this project reads (expected a PyTorch .pth, .safetensors, Caffe "
                   f".caffemodel or .npz; the file starts with {head[:8]!r})")


def convert_file(path: str, *, mean_rgb: Sequence[float], **options: Any) -> tuple[str, Tree]:
  """Reads `path`, recognises its layout and converts it; returns the layout's name and the parameter tree."""
  state = read_any(path)
  layout = find_layout(set(state), path)
  logging.info("%s: layout %s (%s), %s input.", path, layout.name, layout.description, layout.input_order.upper())
  accepted = inspect.signature(layout.convert).parameters
  if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
    options = {k: v for k, v in options.items() if k in accepted}  # each layout takes the options of its model
  return layout.name, layout.convert(state, source=path, mean_rgb=mean_rgb, **options)



def missing_error(source: str, what: str, missing: Sequence[str], found: Mapping[str, Any] | set[str]) -> ValueError:
  """The error for a source lacking names a layout needs: lists the missing names beside the names found."""
  found_names = sorted(found)
  return ValueError(f"{source}: not a complete {what}; missing {', '.join(missing)}; found {len(found_names)} "
                    f"arrays: {', '.join(found_names)}")
