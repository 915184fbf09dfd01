"""The serving artefact: the whole inference function as StableHLO (`jax.export`, any batch size, lowered at export
for the platforms named there) and the trained parameters it takes as its first argument, in one .npz file.

Reading and running it needs jax and NumPy only: this module imports nothing from the rest of the package, so it
can be copied beside an artefact and used where the model code is not installed.

  model = serving.load("model.npz")
  out = model.predict(image)  # uint8 RGB [h, w, 3] with h, w <= model.image_size
  out["labels"], out["scores"], out["weights"]  # [h, w], [h, w, C], [h, w, S]

The program: (params, images, valid) -> {'scores', 'labels', 'weights'}, batch size b free, H x W = image_size:
  images  float32 [b, H, W, 3]  RGB 0..255 minus `mean_rgb`, the image in the top-left corner, 0 elsewhere
  valid   bool    [b, H, W]     True on the image's pixels (the CRF, when included, ignores the others)
  scores  float32 [b, H, W, C]  the fused class scores brought to the input's size (before any CRF)
  labels  int32   [b, H, W]     argmax of `scores`, or of the CRF's marginals when `crf` is true
  weights float32 [b, H, W, S]  the fusion's per-pixel weight of each of `scales`

File (read with allow_pickle=False): `info` (UTF-8 JSON: format tag and version, image size, mean, scales, classes,
flip, crf, the export-time parity check, provenance, and the parameter names in argument order), `program` (the
bytes of `jax.export.Exported.serialize()`) and one array `param/<name>` per parameter.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

FORMAT, VERSION = "scaleattn.serving", 1


def _param_names(params: Any) -> list[str]:
  """'param/backbone/conv1/kernel', ... in the order jax flattens `params` (the program's argument order)."""
  return ["param/" + jax.tree_util.keystr(path, simple=True, separator="/")
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def save(path: str, program: bytes, params: Any, info: dict[str, Any]) -> int:
  """Writes an artefact (temporary name, then renamed); returns its size in bytes."""
  names = _param_names(params)
  arrays = {"info": np.frombuffer(json.dumps({**info, "format": FORMAT, "version": VERSION, "params": names},
                                             sort_keys=True).encode(), np.uint8),
            "program": np.frombuffer(bytes(program), np.uint8),
            **{n: np.asarray(p) for n, p in zip(names, jax.tree.leaves(params), strict=True)}}
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, os.path.basename(path) + ".tmp")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return os.path.getsize(path)


@dataclasses.dataclass(frozen=True, eq=False)
class ServingModel:
  """A loaded artefact: call it on prepared batches, or `predict` on uint8 images."""
  program: jax.export.Exported
  params: Sequence[jax.Array]  # on the default device, in argument order
  info: dict[str, Any]

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(self.info["image_size"])

  @property
  def scales(self) -> tuple[float, ...]:
    return tuple(self.info["scales"])

  @property
  def class_names(self) -> tuple[str, ...] | None:
    return tuple(self.info["class_names"]) if self.info.get("class_names") else None

  @property
  def platforms(self) -> tuple[str, ...]:
    return self.program.platforms

  def __call__(self, images: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """The program's outputs (NumPy) for a prepared batch (see the module docstring)."""
    args, kwargs = self.program.in_tree.unflatten([*self.params, images, valid])
    return jax.device_get(self.program.call(*args, **kwargs))  # compiled once per batch size, then cached

  def prepare(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(images, valid) for the program from uint8 RGB images [h, w, 3], each at most `image_size`: mean
    subtracted, placed top-left, zero (the mean) elsewhere. Larger images are refused, never shrunk."""
    height, width = self.image_size
    batch = np.zeros((len(images), height, width, 3), np.float32)
    valid = np.zeros((len(images), height, width), bool)
    for i, image in enumerate(images):
      image = np.asarray(image)
      if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image {i}: expected uint8 RGB [h, w, 3], got {image.dtype} {image.shape}")
      h, w = image.shape[:2]
      if h > height or w > width:
        raise ValueError(f"image {i} is {h}x{w} pixels (HxW); this artefact handles images up to {height}x{width}. "
                         "Crop or resize it yourself, or export again with a larger --image_size")
      batch[i, :h, :w] = image - np.asarray(self.info["mean_rgb"], np.float32)
      valid[i, :h, :w] = True
    return batch, valid

  def predict(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """'labels' [h, w], 'scores' [h, w, C] and 'weights' [h, w, S] of one uint8 RGB image [h, w, 3]."""
    h, w = np.shape(image)[:2]
    return {k: v[0, :h, :w] for k, v in self(*self.prepare([image])).items()}


def load(path: str) -> ServingModel:
  """The artefact at `path`, its parameters put on the default device."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"serving artefact {path}: no such file; write one with python -m scaleattn.export "
                            "--platforms=...")
  try:
    with np.load(path, allow_pickle=False) as f:
      info = json.loads(f["info"].tobytes())
      if info.get("format") != FORMAT:
        raise ValueError(f"no format tag {FORMAT!r}")
      if info.get("version") != VERSION:
        raise ValueError(f"format version {info.get('version')}, this code reads {VERSION}")
      program = jax.export.deserialize(bytearray(f["program"].tobytes()))
      params = [f[n] for n in info["params"]]
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a scaleattn serving artefact ({type(e).__name__}: {e})") from e
  here = jax.export.default_export_platform()
  if here not in program.platforms:
    raise ValueError(f"{path}: lowered for {', '.join(program.platforms)}; this process runs on {here}. Export it "
                     f"again with {here} in --platforms.")
  return ServingModel(program, jax.device_put(params), info)
