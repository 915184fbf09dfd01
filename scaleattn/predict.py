"""Predictions on image files: colour-coded segmentations and, per scale, the fusion weights as heat maps.

An image that fits in `config.input.eval_size` is padded (with the mean) to that size, so every such image shares
one compiled program, and the outputs are cropped back. A larger one is never shrunk: it runs tiled at its own
size (`scaleattn.tiling`, eval_size tiles unless config.eval.tile_size says otherwise); config.eval.tile_size or
memory_budget_gb can make every image run tiled.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from scaleattn import checkpointing, datasets, inference, tiling, visualize
from scaleattn.compiled_memory import memory_analysis
from scaleattn.state import Experiment, build_experiment

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def list_images(inputs: Sequence[str]) -> list[str]:
  """Files as given, folders expanded to their images (sorted)."""
  files = []
  for path in inputs:
    if os.path.isdir(path):
      files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    else:
      files.append(path)
  return files


@functools.partial(jax.jit, static_argnames=("exp",))
def full_resolution(params: Any, images: jax.Array, valid: jax.Array, *, exp: Experiment
                    ) -> tuple[jax.Array, jax.Array]:
  """Prediction and fusion weights at the images' resolution; `valid` marks the real pixels of padded images."""
  out = inference.predict_scores(params, images, exp=exp, flip=exp.config.eval.flip)
  return at_input_size(out.fused, out.weights, images, valid, exp=exp)


def at_input_size(fused: jax.Array, weights: jax.Array, images: jax.Array, valid: jax.Array, *, exp: Experiment
                   ) -> tuple[jax.Array, jax.Array]:
  return inference.predict_labels(fused, images, valid, exp=exp), inference.to_input_size(weights, images)


class Predictor:
  """Labels and fusion weights at the input's resolution for images of any size: whole on the eval_size canvas
  when they fit it (and config.eval does not ask for tiles), tiled at their own size otherwise."""

  def __init__(self, exp: Experiment, params: Any):
    cfg = exp.config
    self.exp, self.params, self.size = exp, params, cfg.input.eval_size
    canvas = jax.ShapeDtypeStruct((1, self.size, self.size, 3), np.float32)
    mask = jax.ShapeDtypeStruct(canvas.shape[:3], np.bool_)
    whole_bytes = lambda: memory_analysis(full_resolution.lower(params, canvas, mask, exp=exp).compile())[
        "total_bytes"]
    self.choice = tiling.choose(exp.eval_model, params, cfg.eval, batch=1, longest=self.size, whole_bytes=whole_bytes)
    # Without tiles asked for, images larger than eval_size run in eval_size tiles (the overlap at most half one).
    tile = self.choice.tile or self.size
    overlap = self.choice.overlap if self.choice.tile else min(self.choice.overlap, tile // 2)
    self.tiled = tiling.TiledForward(exp.eval_model, tile, overlap)
    self._finish = jax.jit(functools.partial(at_input_size, exp=exp))

  def __call__(self, images: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """images [B, H, W, 3] (mean-subtracted), valid [B, H, W] -> (labels [B, H, W], weights [B, H, W, S])."""
    b, h, w = images.shape[:3]
    if not self.choice.tile and max(h, w) <= self.size:
      pad = ((0, 0), (0, self.size - h), (0, self.size - w))
      pred, weights = full_resolution(self.params, np.pad(images, pad + ((0, 0),)), np.pad(valid, pad), exp=self.exp)
      return jax.device_get((pred[:, :h, :w], weights[:, :h, :w]))
    if not self.choice.tile:
      logging.info("Image %dx%d is larger than config.input.eval_size=%d: tiled, %s.", h, w, self.size,
                   tiling.describe(self.exp.config.model, self.tiled.tile, self.tiled.overlap))
    out = inference.predict_scores(self.params, images, exp=self.exp, flip=self.exp.config.eval.flip,
                                   forward=self.tiled)
    if self.exp.config.eval.crf.enabled:  # the dense CRF takes the whole image at once
      return jax.device_get(self._finish(out.fused, out.weights, images, valid))
    return self.tiled.upsample(out.fused, out.weights, h, w)


def save_outputs(predictor: Predictor, image: np.ndarray, name: str, out_dir: str) -> list[str]:
  """Runs one uint8 RGB image (any size) and writes its segmentation, weight maps and panel."""
  cfg = predictor.exp.config
  x = image[None].astype(np.float32) - np.asarray(cfg.input.mean_rgb, np.float32)
  pred, weights = predictor(x, np.ones(x.shape[:3], bool))
  return visualize.save_prediction(out_dir, name, image, pred[0].astype(np.uint8), weights=weights[0],
                                   scales=predictor.exp.eval_scales)


def predict_files(config: ml_collections.ConfigDict, workdir: str, inputs: Sequence[str], out_dir: str,
                  params: Any | None = None) -> dict[str, Any]:
  """Predicts every readable image; an unreadable one is reported and skipped, the others go on. Raises
  `DataError` when not one could be read, so a run that produced nothing never passes for a success."""
  exp = build_experiment(config)
  if params is None:
    params, _ = checkpointing.restore_params(workdir, config.train, exp.abstract_state)
  predictor = Predictor(exp, params)
  written, errors = [], {}
  files = list_images(inputs)
  if not files:
    raise FileNotFoundError(f"no images found in {list(inputs)} (extensions {IMAGE_EXTENSIONS})")
  for path in files:
    try:
      with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
      errors[path] = f"{type(e).__name__}: {e}"
      logging.error("Cannot read image %s (%s); skipping it.", path, errors[path])
      continue
    name = os.path.splitext(os.path.basename(path))[0]
    written += save_outputs(predictor, image, name, out_dir)
  if len(errors) == len(files):
    shown = "; ".join(f"{path}: {reason}" for path, reason in list(errors.items())[:3])
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    raise datasets.DataError(f"no input image could be read ({len(files)} tried), nothing was written to {out_dir}: "
                             f"{shown}{more}; expected images Pillow can open")
  logging.info("Wrote %d files to %s; %d unreadable inputs.", len(written), out_dir, len(errors))
  return {"written": written, "failed": list(errors)}


class EvalExample(NamedTuple):
  """One evaluation example as predicted, cropped to its real pixels."""
  index: int  # in the batch
  image: np.ndarray  # uint8 RGB, the mean added back
  label: np.ndarray  # uint8 ground truth (255 = void)
  prediction: np.ndarray  # uint8
  weights: np.ndarray  # float [H, W, S], the fusion weight of each of exp.eval_scales


def eval_examples(exp: Experiment, params: Any, batch: dict[str, np.ndarray], num_examples: int
                  ) -> list[EvalExample]:
  """The first `num_examples` rows of an evaluation batch that are not padding, each cropped to its real pixels and
  predicted as `Predictor` predicts an image file (tiled where config.eval asks for tiles, so the panels fit the
  device whenever evaluation does), on this process alone: the parameters are copied to the host, so one process
  may call it in a multi-process run."""
  predictor = Predictor(exp, jax.device_get(params))
  mean = np.asarray(exp.config.input.mean_rgb, np.float32)
  examples = []
  for i in range(min(num_examples, len(batch["image"]))):
    rows, cols = np.nonzero(batch["mask"][i])
    if not len(rows):
      continue
    h, w = rows.max() + 1, cols.max() + 1
    image = batch["image"][i, :h, :w]
    pred, weights = predictor(image[None], batch["mask"][i:i + 1, :h, :w])
    examples.append(EvalExample(i, np.clip(image + mean, 0, 255).astype(np.uint8),
                                batch["label"][i, :h, :w].astype(np.uint8), pred[0].astype(np.uint8), weights[0]))
  return examples


def save_eval_examples(exp: Experiment, params: Any, batch: dict[str, np.ndarray], out_dir: str,
                       num_examples: int) -> list[str]:
  """Writes outputs for the first examples of an evaluation batch; their panels show the ground truth."""
  written = []
  for ex in eval_examples(exp, params, batch, num_examples):
    written += visualize.save_prediction(out_dir, f"example_{ex.index:03d}", ex.image, ex.prediction,
                                         weights=ex.weights, scales=exp.eval_scales, label=ex.label,
                                         class_names=datasets.class_names(exp.config.dataset))
  return written


def eval_panels(exp: Experiment, params: Any, batch: dict[str, np.ndarray], num_examples: int, prefix: str
                ) -> dict[str, np.ndarray]:
  """The panels of `save_eval_examples` as uint8 [1, H, W, 3] arrays named `{prefix}/example_{index:03d}`, for
  `metric_writers.MetricWriter.write_images` (one name each: the panels' sizes differ)."""
  names = datasets.class_names(exp.config.dataset)
  panels = {}
  for ex in eval_examples(exp, params, batch, num_examples):
    fig = visualize.attention_panel(ex.image, ex.weights, ex.prediction, exp.eval_scales, label=ex.label,
                                    class_names=names)
    panels[f"{prefix}/example_{ex.index:03d}"] = visualize.figure_pixels(fig)[None]
  return panels


if __name__ == "__main__":  # python -m scaleattn.predict --exported=F --inputs=A,B --out_dir=D
  from scaleattn import predict_exported
  raise SystemExit(predict_exported.main())
