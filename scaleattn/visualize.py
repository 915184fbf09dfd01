"""Pictures of predictions: VOC-palette label maps, per-scale weight heat maps and a panel like the paper's figure
(image | ground truth | weight map per scale on a 0..1 colour bar | prediction), drawn on the host with NumPy,
Pillow and matplotlib.

Figures are built as `matplotlib.figure.Figure` objects, never through pyplot: they render with Agg whatever
backend the process uses, hold no global state, and a notebook still shows a returned figure."""
from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from scaleattn.models.resize import interpolation_matrix

HEATMAP_CMAP = "jet"  # as in the paper's weight-map figures


def voc_palette() -> np.ndarray:
  """uint8 [256, 3]: the PASCAL VOC colour map (bits of the index interleaved into R, G, B from the top bit)."""
  index = np.arange(256)
  palette = np.zeros((256, 3), np.int64)
  for shift in range(8):
    for channel in range(3):
      palette[:, channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
  return palette.astype(np.uint8)


def _check_label(label: np.ndarray, what: str) -> np.ndarray:
  label = np.asarray(label)
  if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
    raise ValueError(f"{what}: expected an integer label map [H, W], got {label.dtype} {label.shape}")
  if label.size and (label.min() < 0 or label.max() > 255):
    raise ValueError(f"{what}: label values must lie in 0..255, got {label.min()}..{label.max()}")
  return label.astype(np.uint8)


def colorize(label: np.ndarray) -> np.ndarray:
  """uint8 RGB [H, W, 3] of a label map in the VOC palette (255 = void in cream)."""
  return voc_palette()[_check_label(label, "colorize")]


def save_label_png(path: str, label: np.ndarray) -> None:
  """Indexed ('P' mode) PNG with the VOC palette: it shows in colour and reads back as the class indices."""
  image = Image.fromarray(_check_label(label, "save_label_png"))
  image.putpalette(voc_palette().tobytes())
  image.save(path)


def heatmap(weights: np.ndarray) -> np.ndarray:
  """uint8 RGB [H, W, 3] of weights [H, W] through the jet colour map over the fixed range 0..1 (values clipped)."""
  weights = np.asarray(weights, np.float64)
  if weights.ndim != 2:
    raise ValueError(f"heatmap: expected weights [H, W], got shape {weights.shape}")
  rgba = matplotlib.colormaps[HEATMAP_CMAP](np.clip(weights, 0.0, 1.0))
  return np.round(rgba[..., :3] * 255).astype(np.uint8)


def resize_weights(weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear, align-corners resize of weights [h, w, S] (the score-map grid) to size (H, W)."""
  weights = np.asarray(weights, np.float64)
  if weights.ndim != 3:
    raise ValueError(f"resize_weights: expected weights [h, w, S], got shape {weights.shape}")
  if weights.shape[:2] == tuple(size):
    return weights
  rows = interpolation_matrix(size[0], weights.shape[0]).astype(np.float64)
  cols = interpolation_matrix(size[1], weights.shape[1]).astype(np.float64)
  return np.einsum("Hh,hws,Ww->HWs", rows, weights, cols)


def _check_panel_inputs(image: np.ndarray, weights: np.ndarray, prediction: np.ndarray,
                        scales: Sequence[float]) -> None:
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
  if prediction.shape != image.shape[:2]:
    raise ValueError(f"prediction shape {prediction.shape} != image size {image.shape[:2]}")
  if weights.ndim != 3 or weights.shape[-1] != len(scales):
    raise ValueError(f"weights shape {weights.shape} must be [h, w, S] with S = {len(scales)} scales {tuple(scales)}")


def attention_panel(image: np.ndarray, weights: np.ndarray, prediction: np.ndarray, scales: Sequence[float],
                    label: np.ndarray | None = None, class_names: Sequence[str] | None = None,
                    path: str | None = None) -> Figure:
  """One row: image | ground truth (given `label`) | weight map per scale ('scale 1', 'scale 0.75', ...) |
  prediction; saved to `path` if given.

  Every weight map uses the same absolute colour scale, 0..1, drawn as a colour bar beside them: a map is never
  stretched to its own range, so colours compare across scales and images. Weights may be on the score-map grid:
  they are upsampled to the image size. With `class_names`, a legend names the classes shown.
  """
  image, weights, prediction = np.asarray(image), np.asarray(weights), np.asarray(prediction)
  _check_panel_inputs(image, weights, prediction, scales)
  weights = resize_weights(weights, image.shape[:2])
  columns = [("image", image, {})]
  labels = [prediction]
  if label is not None:
    label = _check_label(label, "attention_panel ground truth")
    if label.shape != prediction.shape:
      raise ValueError(f"ground truth shape {label.shape} != prediction shape {prediction.shape}")
    columns.append(("ground truth", colorize(label), {}))
    labels.append(label)
  first_heat = len(columns)
  columns += [(f"scale {s:g}", weights[..., i], dict(cmap=HEATMAP_CMAP, vmin=0.0, vmax=1.0))
              for i, s in enumerate(scales)]
  columns.append(("prediction", colorize(prediction), {}))
  fig = Figure(figsize=(2.6 * len(columns) + 0.8, 2.6 * image.shape[0] / image.shape[1] + 0.9), dpi=100,
               layout="constrained")
  axes = fig.subplots(1, len(columns), squeeze=False)[0]
  for ax, (title, picture, style) in zip(axes, columns, strict=True):
    ax.imshow(picture, interpolation="nearest", **style)
    ax.set_title(title)
    ax.set_axis_off()
  heat_axes = list(axes[first_heat:first_heat + len(scales)])
  fig.colorbar(heat_axes[0].images[0], ax=heat_axes, label="fusion weight", ticks=np.linspace(0.0, 1.0, 5))
  if class_names is not None:
    palette = voc_palette() / 255.0
    names = {**dict(enumerate(class_names)), 255: "void"}
    present = [c for c in np.unique(np.concatenate([np.ravel(x) for x in labels])) if c in names]
    fig.legend(handles=[Patch(color=palette[c], label=names[c]) for c in present],
               loc="outside lower center", ncol=max(1, min(len(present), 6)), fontsize="small", frameon=False)
  if path is not None:
    Image.fromarray(figure_pixels(fig)).save(path)
  return fig


def figure_pixels(fig: Figure) -> np.ndarray:
  """uint8 RGB [H, W, 3] of a figure rendered with Agg at its own dpi: what a panel's PNG holds and TensorBoard
  shows."""
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return np.array(canvas.buffer_rgba())[..., :3]


def save_prediction(out_dir: str, name: str, image: np.ndarray, prediction: np.ndarray,
                    weights: np.ndarray | None = None, scales: Sequence[float] | None = None,
                    class_names: Sequence[str] | None = None, label: np.ndarray | None = None) -> list[str]:
  """Writes `{name}_seg.png` (palette PNG of the class indices), `{name}_seg_color.png` and, given fusion weights
  [h, w, S] (any grid; upsampled to the image), `{name}_weights_s{scale:g}.png` per scale (the bare map, pixel for
  pixel on the image, jet over 0..1) and `{name}_panel.png` (with the ground truth `label` if given, a 0..1 colour
  bar and the scales named). Returns the paths written."""
  image, prediction = np.asarray(image), np.asarray(prediction)
  if weights is not None:
    if scales is None:
      raise ValueError(f"save_prediction({name!r}): weights given without their scales")
    weights = np.asarray(weights)
    _check_panel_inputs(image, weights, prediction, scales)
    weights = resize_weights(weights, image.shape[:2])
  elif prediction.shape != image.shape[:2]:
    raise ValueError(f"save_prediction({name!r}): prediction shape {prediction.shape} != image size "
                     f"{image.shape[:2]}")
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, name)
  paths = [f"{stem}_seg.png", f"{stem}_seg_color.png"]
  save_label_png(paths[0], prediction)
  Image.fromarray(colorize(prediction)).save(paths[1])
  if weights is not None:
    for i, s in enumerate(scales):
      paths.append(f"{stem}_weights_s{s:g}.png")
      Image.fromarray(heatmap(weights[..., i])).save(paths[-1])
    paths.append(f"{stem}_panel.png")
    attention_panel(image, weights, prediction, scales, label=label, class_names=class_names, path=paths[-1])
  return paths
