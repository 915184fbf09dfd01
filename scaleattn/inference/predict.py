"""Predictions on image files from a trained model (`--mode=predict`): colour-coded segmentations and, per scale,
the fusion weights as heat maps.

An image that fits in `config.input.eval_size` is padded (with the mean) to that size, so every such image shares
one compiled program, and the outputs are cropped back. A larger one is never shrunk: it runs tiled at its own
size (eval_size tiles unless config.eval.tile_size says otherwise); config.eval.tile_size or memory_budget_gb can
make every image run tiled (`forward.plan` decides).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from scaleattn import checkpointing, data
from scaleattn.experiment import Experiment, build_experiment
from scaleattn.inference import files, forward, tiling


class Predictor:
  """Labels and fusion weights at the input's resolution for images of any size: whole on the eval_size canvas
  when they fit it (and config.eval does not ask for tiles), tiled at their own size otherwise."""

  def __init__(self, exp: Experiment, params: Any):
    self.exp, self.params, self.size = exp, params, exp.config.input.eval_size
    self.plan = forward.plan(exp, params, rows=1, size=self.size, tile_larger=True)
    self._finish = jax.jit(functools.partial(_at_input_size, exp=exp))

  def __call__(self, images: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """images [B, H, W, 3] (mean-subtracted), valid [B, H, W] -> (labels [B, H, W], weights [B, H, W, S])."""
    b, h, w = images.shape[:3]
    if not self.plan.tile_all and max(h, w) <= self.size:
      pad = ((0, 0), (0, self.size - h), (0, self.size - w))
      pred, weights = forward.full_resolution(self.params, np.pad(images, pad + ((0, 0),)), np.pad(valid, pad),
                                              exp=self.exp)
      return jax.device_get((pred[:, :h, :w], weights[:, :h, :w]))
    tiled = self.plan.tiled
    if not self.plan.tile_all:
      logging.info("Image %dx%d is larger than config.input.eval_size=%d: tiled, %s.", h, w, self.size,
                   tiling.describe(self.exp.eval_model, tiled.tile, tiled.overlap))
    out = self.plan.scores(self.params, images, exp=self.exp)
    if self.exp.config.eval.crf.enabled:  # the dense CRF takes the whole image at once
      return jax.device_get(self._finish(out.fused, out.weights, images, valid))
    return tiled.upsample(out.fused, out.weights, h, w)

  def image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 RGB image [H, W, 3] (any size) -> (labels [H, W], weights [H, W, S])."""
    x = image[None].astype(np.float32) - np.asarray(self.exp.config.input.mean_rgb, np.float32)
    pred, weights = self(x, np.ones(x.shape[:3], bool))
    return pred[0], weights[0]


def _at_input_size(fused: jax.Array, weights: jax.Array, images: jax.Array, valid: jax.Array, *, exp: Experiment
                   ) -> tuple[jax.Array, jax.Array]:
  return forward.predict_labels(fused, images, valid, exp=exp), forward.to_input_size(weights, images)


def predict_files(config: ml_collections.ConfigDict, workdir: str, inputs: Sequence[str], out_dir: str,
                  params: Any | None = None) -> dict[str, Any]:
  """Predicts every readable image with `params` (default: the workdir's latest checkpoint); an unreadable one is
  reported and skipped, the others go on. Raises `DataError` when not one could be read, so a run that produced
  nothing never passes for a success."""
  exp = build_experiment(config)
  if params is None:
    params, _ = checkpointing.restore_weights(exp, workdir)
  predictor = Predictor(exp, params)
  result = files.predict_files(predictor.image, inputs, out_dir, scales=exp.eval_scales)
  if not result["written"]:
    failed = result["failed"]
    shown = "; ".join(f"{path}: {reason}" for path, reason in list(failed.items())[:3])
    more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
    raise data.DataError(f"no input image could be read ({len(failed)} tried), nothing was written to {out_dir}: "
                         f"{shown}{more}; expected images Pillow can open")
  return {"written": result["written"], "failed": list(result["failed"])}
