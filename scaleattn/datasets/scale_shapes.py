"""`scale_shapes`: an embedded benchmark where scale matters, generated locally and deterministically.

Objects of four classes (disk, square, triangle, cross) whose identity is their global outline; fill colour and
stripe texture are drawn from the same distributions for every class. Sizes span 12-150 px (log-uniform) on
images of 161-193 px, with one large and one small object in every image, smaller objects drawn on top of larger
ones (occlusion), and a background of smooth colour blotches and clutter strokes. A narrow network at scale 1
cannot see a large object's outline; at scale 0.5 the small ones blur away.
Each pixel also records the size (bounding diameter, px) of the object it belongs to, 0 on background.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

CLASS_NAMES = ("background", "disk", "square", "triangle", "cross")


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
  """Sizes of one builder config."""
  num_train: int
  num_validation: int
  num_test: int
  min_image: int = 161
  max_image: int = 193
  min_object: float = 12.0
  max_object: float = 150.0


SPECS = {
    "default": ShapesSpec(num_train=3000, num_validation=200, num_test=300),
    "smoke": ShapesSpec(num_train=32, num_validation=8, num_test=8, min_image=65, max_image=81,
                        min_object=6.0, max_object=60.0),
}
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
  """Inside-test of a class's outline in object coordinates (u, v), for a bounding radius."""
  if cls == 1:
    return u * u + v * v <= radius * radius
  if cls == 2:
    half = radius / np.sqrt(2.0)
    return (np.abs(u) <= half) & (np.abs(v) <= half)
  if cls == 3:  # equilateral triangle inscribed in the circle of `radius`
    inside = np.ones(u.shape, bool)
    for k in range(3):
      a = 2 * np.pi * k / 3 + np.pi / 2
      inside &= u * np.cos(a) + v * np.sin(a) <= radius / 2
    return inside
  arm = 0.3 * radius / np.sqrt(1.09)
  reach = radius / np.sqrt(1.09)
  return ((np.abs(u) <= arm) & (np.abs(v) <= reach)) | ((np.abs(v) <= arm) & (np.abs(u) <= reach))


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """A striped two-colour fill: the same distribution for every class."""
  c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
  angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
  t = (np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period
  mix = (0.5 + 0.5 * np.sin(t))[..., None]
  return c1 * mix + c2 * (1 - mix)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  image = np.zeros((h, w, 3), np.float32) + rng.uniform(40, 215, 3)
  for _ in range(6):  # smooth blotches
    cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, 60)
    g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))[..., None]
    image += g * rng.uniform(-80, 80, 3)
  for _ in range(rng.integers(4, 10)):  # clutter strokes: thin random segments
    y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
    angle, length, width = rng.uniform(0, np.pi), rng.uniform(10, 60), rng.uniform(1, 2.5)
    d = np.abs(-(xx - x0) * np.sin(angle) + (yy - y0) * np.cos(angle))
    along = (xx - x0) * np.cos(angle) + (yy - y0) * np.sin(angle)
    image[(d <= width) & (np.abs(along) <= length / 2)] = rng.uniform(0, 255, 3)
  image += rng.normal(0, 6, image.shape)
  return image


def generate(spec: ShapesSpec, index: int, seed: int) -> dict[str, np.ndarray]:
  """Example `index` of a split: image uint8 [H,W,3], label uint8 [H,W], instance_size uint16 [H,W]."""
  rng = np.random.default_rng([seed, index])
  h = int(rng.integers(spec.min_image // 2, spec.max_image // 2 + 1)) * 2 + 1
  w = int(rng.integers(spec.min_image // 2, spec.max_image // 2 + 1)) * 2 + 1
  image = _background(rng, h, w)
  label = np.zeros((h, w), np.uint8)
  size_map = np.zeros((h, w), np.uint16)
  lo, hi = np.log(spec.min_object), np.log(spec.max_object)
  mid = np.log(np.sqrt(spec.min_object * spec.max_object))
  sizes = [np.exp(rng.uniform(mid + 0.3 * (hi - mid), hi)), np.exp(rng.uniform(lo, mid - 0.3 * (mid - lo)))]
  sizes += [np.exp(rng.uniform(lo, hi)) for _ in range(rng.integers(0, 4))]
  sizes = sorted(min(s, 0.95 * min(h, w)) for s in sizes)[::-1]  # large first: small ones occlude them
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  for size in sizes:
    cls = int(rng.integers(1, len(CLASS_NAMES)))
    radius = size / 2
    cy, cx = rng.uniform(radius * 0.5, h - radius * 0.5), rng.uniform(radius * 0.5, w - radius * 0.5)
    theta = rng.uniform(0, 2 * np.pi)
    u = np.cos(theta) * (xx - cx) + np.sin(theta) * (yy - cy)
    v = -np.sin(theta) * (xx - cx) + np.cos(theta) * (yy - cy)
    mask = _shape_mask(cls, u, v, radius)
    image[mask] = _texture(rng, yy, xx)[mask]
    label[mask] = cls
    size_map[mask] = int(round(size))
  return {"image": np.clip(image, 0, 255).astype(np.uint8), "label": label, "instance_size": size_map}


class ScaleShapes(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of `scale_shapes`; configs 'default' (3000/200/300) and 'smoke' (32/8/8, small images)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=str(spec)) for name, spec in SPECS.items()]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.Image(shape=(None, None, 1)),
            "instance_size": tfds.features.Tensor(shape=(None, None), dtype=np.uint16,
                                                  encoding=tfds.features.Encoding.ZLIB),
            "file_name": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(class_names=CLASS_NAMES),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    spec = SPECS[self.builder_config.name]
    counts = {"train": spec.num_train, "validation": spec.num_validation, "test": spec.num_test}
    return {split: self._generate_examples(spec, split, n) for split, n in counts.items()}

  def _generate_examples(self, spec: ShapesSpec, split: str, count: int):
    for i in range(count):
      ex = generate(spec, i, SPLIT_SEEDS[split])
      name = f"{split}_{i:05d}"
      yield name, {"image": ex["image"], "label": ex["label"][..., None], "instance_size": ex["instance_size"],
                   "file_name": name}
