"""Evaluation panels: the first validation images predicted as `--mode=predict` predicts them (tiled where
config.eval asks for tiles), shown with ground truth, the weight map of each scale and the prediction, in
TensorBoard at every evaluation and as files in the workdir at the end of training."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from scaleattn import data, visualize
from scaleattn.experiment import Experiment
from scaleattn.inference.predict import Predictor


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
                                         class_names=data.class_names(exp.config.dataset))
  return written


def eval_panels(exp: Experiment, params: Any, batch: dict[str, np.ndarray], num_examples: int, prefix: str
                ) -> dict[str, np.ndarray]:
  """The panels of `save_eval_examples` as uint8 [1, H, W, 3] arrays named `{prefix}/example_{index:03d}`, for
  `metric_writers.MetricWriter.write_images` (one name each: the panels' sizes differ)."""
  names = data.class_names(exp.config.dataset)
  panels = {}
  for ex in eval_examples(exp, params, batch, num_examples):
    fig = visualize.attention_panel(ex.image, ex.weights, ex.prediction, exp.eval_scales, label=ex.label,
                                    class_names=names)
    panels[f"{prefix}/example_{ex.index:03d}"] = visualize.figure_pixels(fig)[None]
  return panels
