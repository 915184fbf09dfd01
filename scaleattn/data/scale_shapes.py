"""`scale_shapes`: an embedded benchmark where scale matters, generated locally and deterministically.

Four object classes (disk, square, triangle, cross) whose identity is their outline only: fill colour and texture
are drawn from the same distributions for every class. Object extents span 12-150 px (log-uniform) on images of
161-193 px, with one large and one small object in every image, later (smaller) objects drawn over earlier ones
(occlusion), on a background of smooth colour blotches, fine noise and thin clutter strokes. A small network at
scale 1 cannot take in a large object's outline; at scale 0.5 the small ones blur away.

Learnability choices (a small unnormalised net must learn it on a CPU budget): few, distinct silhouettes drawn
upright with small rotations only, object colour kept away from the colour beneath it, and moderate clutter.
Every pixel also records the extent (px) of the object it belongs to in 'instance_size', 0 on background.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from scaleattn.data import builder_base

SHAPES = ("disk", "square", "triangle", "cross")
# Outlines none of SHAPES has, for pretraining a backbone that has never seen the evaluation classes.
PRETRAIN_SHAPES = ("ring", "star", "ellipse", "ell", "bowtie")
CLASS_NAMES = ("background",) + SHAPES
PRETRAIN_CLASS_NAMES = ("background",) + PRETRAIN_SHAPES
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Split sizes and generation ranges; pass one to `tfds.builder("scale_shapes", config=...)` for other sizes."""
  num_train: int = 3000
  num_validation: int = 200
  num_test: int = 300
  min_image: int = 161  # image height and width: odd, uniform in [min_image, max_image]
  max_image: int = 193
  min_object: float = 12.0  # object extent (px), log-uniform
  max_object: float = 150.0
  max_objects: int = 5  # per image; at least 2 (one large, one small)
  max_rotation: float = 20.0  # degrees either way
  min_contrast: float = 70.0  # RGB distance between an object's colour and the mean colour beneath it
  clutter_strokes: tuple[int, int] = (3, 8)
  shapes: tuple[str, ...] = SHAPES  # label k draws shapes[k - 1]
  seed_offset: int = 0  # added to SPLIT_SEEDS: other images than another config's of the same sizes


CONFIGS = (
    ShapesConfig(name="default", description="3000 train / 200 validation / 300 test, 161-193 px images"),
    ShapesConfig(name="small", description="4000 train / 300 validation / 500 test, 97-113 px images, objects "
                 "8-96 px (configs/shapes.py)", num_train=4000, num_validation=300, num_test=500, min_image=97,
                 max_image=113, min_object=8.0, max_object=96.0),
    ShapesConfig(name="smoke", description="32/8/8 examples of 65-81 px, for tests", num_train=32,
                 num_validation=8, num_test=8, min_image=65, max_image=81, min_object=6.0, max_object=60.0),
    ShapesConfig(name="pretrain", description="8000/300/500 examples as 'small', of the other outlines "
                 "(PRETRAIN_SHAPES) on images of their own seeds: the stand-in for ImageNet pretraining "
                 "(configs/shapes_pretrain.py)", num_train=8000, num_validation=300, num_test=500, min_image=97,
                 max_image=113, min_object=8.0, max_object=96.0, shapes=PRETRAIN_SHAPES, seed_offset=100),
)


def _inside(shape: str, u: np.ndarray, v: np.ndarray, extent: float) -> np.ndarray:
  """Inside-test of an outline in object coordinates (u right, v down) for an extent (box side) in px."""
  half = extent / 2
  if shape == "disk":
    return u * u + v * v <= half * half
  if shape == "square":
    return (np.abs(u) <= half) & (np.abs(v) <= half)
  if shape == "triangle":  # upright equilateral, base `extent`, centred on its centroid
    height = extent * np.sqrt(3) / 2
    return (v <= height / 3) & (np.abs(u) <= (v + 2 * height / 3) * half / height)
  if shape == "cross":  # two bars of width 0.36 * extent
    arm = 0.18 * extent
    return ((np.abs(u) <= half) & (np.abs(v) <= arm)) | ((np.abs(v) <= half) & (np.abs(u) <= arm))
  if shape == "ring":  # an annulus, hole 0.55 of the outer diameter
    r2 = u * u + v * v
    return (r2 <= half * half) & (r2 >= (0.55 * half) ** 2)
  if shape == "star":  # five points; the radius runs linearly from 0.42 (notches) to 1 (tips) of `half`
    period = 2 * np.pi / 5
    phase = np.mod(np.arctan2(u, -v), period) / period
    return np.sqrt(u * u + v * v) <= half * (0.42 + 1.16 * np.abs(phase - 0.5))
  if shape == "ellipse":  # lying, height 0.45 of its width
    return (u / half) ** 2 + (v / (0.45 * half)) ** 2 <= 1
  inside_box = (np.abs(u) <= half) & (np.abs(v) <= half)
  if shape == "ell":  # bars of width 0.36 * extent up the left and along the bottom
    return inside_box & ((u <= 0.36 * extent - half) | (v >= half - 0.36 * extent))
  if shape == "bowtie":  # two triangles meeting at their tips, a waist of 0.2 * extent
    return inside_box & (np.abs(v) <= 0.1 * extent + 0.8 * np.abs(u))
  raise ValueError(f"scale_shapes: unknown shape {shape!r}; expected one of {SHAPES + PRETRAIN_SHAPES}")


def _window(shape: tuple[int, int], cy: float, cx: float, radius: float) -> tuple[slice, slice, np.ndarray, np.ndarray]:
  """The pixel window around (cy, cx) clipped to the image, and its pixel-centre coordinates."""
  h, w = shape
  y0, y1 = max(0, int(cy - radius)), min(h, int(cy + radius) + 2)
  x0, x1 = max(0, int(cx - radius)), min(w, int(cx + radius) + 2)
  yy, xx = np.meshgrid(np.arange(y0, y1, dtype=np.float32), np.arange(x0, x1, dtype=np.float32), indexing="ij")
  return slice(y0, y1), slice(x0, x1), yy, xx


def _fill(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, colour: np.ndarray) -> np.ndarray:
  """A texture around `colour` (stripes, checks or plain), drawn the same way whatever the class."""
  second = np.clip(colour + rng.normal(0, 35, 3), 0, 255)
  period, angle = rng.uniform(4, 14), rng.uniform(0, np.pi)
  kind = rng.integers(3)
  a = (np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / period)
  if kind == 0:
    mix = 0.5 + 0.5 * np.sin(a)
  elif kind == 1:
    b = (-np.sin(angle) * xx + np.cos(angle) * yy) * (2 * np.pi / period)
    mix = (np.sin(a) * np.sin(b) > 0).astype(np.float32)
  else:
    mix = np.zeros_like(xx)
  return colour * (1 - mix[..., None]) + second * mix[..., None]


def _background(rng: np.random.Generator, cfg: ShapesConfig, h: int, w: int) -> np.ndarray:
  """Smooth colour blotches (separable Gaussians) plus thin straight clutter strokes."""
  image = np.empty((h, w, 3), np.float32)
  image[:] = rng.uniform(40, 215, 3)
  ys, xs = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
  for _ in range(6):
    cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, 50)
    g = np.exp(-(ys - cy) ** 2 / (2 * s * s))[:, None] * np.exp(-(xs - cx) ** 2 / (2 * s * s))[None, :]
    image += g[..., None] * rng.uniform(-60, 60, 3).astype(np.float32)
  for _ in range(rng.integers(cfg.clutter_strokes[0], cfg.clutter_strokes[1] + 1)):
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    angle, length, width = rng.uniform(0, np.pi), rng.uniform(10, 60), rng.uniform(0.7, 2.0)
    rows, cols, yy, xx = _window((h, w), cy, cx, length / 2 + width)
    across = np.abs(-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle))
    along = np.abs((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle))
    image[rows, cols][(across <= width) & (along <= length / 2)] = rng.uniform(0, 255, 3)
  return image


def _object_colour(rng: np.random.Generator, beneath: list[np.ndarray], min_contrast: float) -> np.ndarray:
  """A uniform RGB colour at least `min_contrast` from every colour in `beneath` (rejection sampling, class-blind)."""
  colour = rng.uniform(0, 255, 3)
  for _ in range(50):
    if all(np.linalg.norm(colour - b) >= min_contrast for b in beneath):
      break
    colour = rng.uniform(0, 255, 3)
  return colour


def generate(cfg: ShapesConfig, index: int, seed: int) -> dict[str, np.ndarray]:
  """Example `index` of the split with `seed`: image uint8 [H,W,3], label uint8 [H,W], instance_size uint16 [H,W].

  Objects are placed largest first; a placement may only cover objects at least twice its extent (a small thing
  in front of a large one), so same-sized objects never merge into one blob. An object that finds no such place
  in a few tries is left out.
  """
  rng = np.random.default_rng([seed, index])
  h, w = (int(rng.integers(cfg.min_image // 2, cfg.max_image // 2 + 1)) * 2 + 1 for _ in range(2))
  image = _background(rng, cfg, h, w)
  background = image.copy()
  instance = np.zeros((h, w), np.uint8)  # 0 = background, k = the k-th drawn object
  drawn: list[tuple[int, float, np.ndarray]] = [(0, 0.0, np.zeros(3))]  # (class, extent, colour) per instance
  lo, hi = np.log(cfg.min_object), np.log(cfg.max_object)
  third = (hi - lo) / 3
  logs = [rng.uniform(hi - third, hi), rng.uniform(lo, lo + third)]  # one large, one small
  logs += list(rng.uniform(lo, hi, rng.integers(0, cfg.max_objects - 1)))
  extents = sorted((min(float(np.exp(x)), 0.95 * min(h, w)) for x in logs), reverse=True)
  for extent in extents:
    cls = int(rng.integers(1, len(cfg.shapes) + 1))
    theta = np.deg2rad(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    margin = 0.3 * extent
    for _ in range(10):
      cy, cx = rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)
      rows, cols, yy, xx = _window((h, w), cy, cx, extent / np.sqrt(2))
      u = np.cos(theta) * (xx - cx) + np.sin(theta) * (yy - cy)
      v = -np.sin(theta) * (xx - cx) + np.cos(theta) * (yy - cy)
      mask = _inside(cfg.shapes[cls - 1], u, v, extent)
      covered = np.unique(instance[rows, cols][mask])
      if mask.any() and all(drawn[k][1] >= 2 * extent for k in covered if k):
        break
    else:
      continue
    beneath = [background[rows, cols][mask].mean(0)] + [drawn[k][2] for k in covered if k]
    colour = _object_colour(rng, beneath, cfg.min_contrast)
    image[rows, cols][mask] = _fill(rng, yy, xx, colour)[mask]
    instance[rows, cols][mask] = len(drawn)
    drawn.append((cls, extent, colour))
  image += rng.normal(0, 5, image.shape).astype(np.float32)
  classes = np.array([c for c, _, _ in drawn], np.uint8)
  sizes = np.array([round(e) for _, e, _ in drawn], np.uint16)
  return {"image": np.clip(image, 0, 255).astype(np.uint8), "label": classes[instance],
          "instance_size": sizes[instance]}


class ScaleShapes(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of `scale_shapes`; configs 'default' (3000/200/300), 'small', 'smoke' (32/8/8, small images)
  and 'pretrain' (other outlines)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "2.0.0": "Upright shapes, contrasting colours, lighter clutter, labels stored as zlib tensors."}
  BUILDER_CONFIGS = list(CONFIGS)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": builder_base.label_feature(),
            "instance_size": tfds.features.Tensor(shape=(None, None), dtype=np.uint16,
                                                  encoding=tfds.features.Encoding.ZLIB),
            "file_name": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(class_names=("background",) + tuple(self.builder_config.shapes)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    counts = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
    return {split: self._generate_examples(split, n) for split, n in counts.items()}

  def _generate_examples(self, split: str, count: int):
    for i in range(count):
      name = f"{split}_{i:05d}"
      example = generate(self.builder_config, i, SPLIT_SEEDS[split] + self.builder_config.seed_offset)
      png = io.BytesIO()  # PIL's fast PNG setting: half the time of TFDS's own encoder, 10% larger files
      Image.fromarray(example["image"]).save(png, format="PNG", compress_level=1)
      yield name, {**example, "image": png.getvalue(), "file_name": name}
