"""VOC palette values, palette PNG round trip, heat-map range, align-corners upsampling and the files written."""
import os

import numpy as np
import pytest
from PIL import Image

from scaleattn import visualize


def test_palette_known_values():
  palette = visualize.voc_palette()
  assert palette.shape == (256, 3) and palette.dtype == np.uint8
  known = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 15: (192, 128, 128),
           20: (0, 64, 128), 255: (224, 224, 192)}
  for index, rgb in known.items():
    assert tuple(palette[index]) == rgb, index
  assert len({tuple(c) for c in palette}) == 256  # the bit interleaving is a bijection


def test_colorize():
  label = np.array([[0, 1], [15, 255]])
  np.testing.assert_array_equal(visualize.colorize(label),
                                [[[0, 0, 0], [128, 0, 0]], [[192, 128, 128], [224, 224, 192]]])
  with pytest.raises(ValueError, match="0..255"):
    visualize.colorize(np.array([[256]]))
  with pytest.raises(ValueError, match="integer label map"):
    visualize.colorize(np.zeros((2, 2), np.float32))


def test_label_png_reads_back_as_indices(tmp_path):
  label = np.array([[0, 1, 2], [15, 20, 255]], np.uint8)
  path = str(tmp_path / "label.png")
  visualize.save_label_png(path, label)
  with Image.open(path) as im:
    assert im.mode == "P"
    np.testing.assert_array_equal(np.asarray(im), label)
    assert tuple(im.getpalette()[3 * 15:3 * 16]) == (192, 128, 128)
    np.testing.assert_array_equal(np.asarray(im.convert("RGB"))[1, 2], (224, 224, 192))


def test_heatmap_fixed_range_and_clipping():
  rgb = visualize.heatmap(np.array([[0.0, 1.0, -3.0, 7.0, 0.5]]))
  assert rgb.dtype == np.uint8 and rgb.shape == (1, 5, 3)
  # jet runs from dark blue (0, 0, 0.5) at 0 to dark red (0.5, 0, 0) at 1; out-of-range values clip to the ends.
  np.testing.assert_allclose(rgb[0, 0], (0, 0, 128), atol=1)
  np.testing.assert_allclose(rgb[0, 1], (128, 0, 0), atol=1)
  np.testing.assert_array_equal(rgb[0, 2], rgb[0, 0])
  np.testing.assert_array_equal(rgb[0, 3], rgb[0, 1])
  assert rgb[0, 4, 1] > 200  # green in the middle


def test_resize_weights_align_corners():
  weights = np.array([[0.0, 1.0], [2.0, 3.0]])[..., None]
  got = visualize.resize_weights(weights, (3, 5))[..., 0]
  # corners land on the input samples; rows at 0, 0.5, 1 and columns at 0, 0.25, ..., 1 of the input grid.
  want = np.array([[0.0, 0.25, 0.5, 0.75, 1.0], [1.0, 1.25, 1.5, 1.75, 2.0], [2.0, 2.25, 2.5, 2.75, 3.0]])
  np.testing.assert_allclose(got, want)
  np.testing.assert_allclose(visualize.resize_weights(weights, (1, 1))[..., 0], [[0.0]])


def _example(h=12, w=17, scales=(1.0, 0.75, 0.5)):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  prediction = rng.integers(0, 4, (h, w)).astype(np.uint8)
  weights = rng.dirichlet(np.ones(len(scales)), size=(4, 5))  # on a coarser score-map grid
  return image, prediction, weights, scales


def test_attention_panel_layout():
  image, prediction, weights, scales = _example()
  fig = visualize.attention_panel(image, weights, prediction, scales, class_names=("bg", "a", "b", "c"))
  titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
  assert titles == ["image", "scale 1", "scale 0.75", "scale 0.5", "prediction"]  # no ground truth given
  shown = fig.axes[2].get_images()[0].get_array()
  assert shown.shape == image.shape[:2] and shown.min() >= 0 and shown.max() <= 1
  with pytest.raises(ValueError, match="3 scales"):
    visualize.attention_panel(image, weights[..., :2], prediction, scales)
  with pytest.raises(ValueError, match="ground truth shape"):
    visualize.attention_panel(image, weights, prediction, scales, label=prediction[:5])


# matplotlib's jet: piecewise linear through these (x, value) points per channel (its segment data).
_JET = {"r": ([0, 0.35, 0.66, 0.89, 1], [0, 0, 1, 1, 0.5]),
        "g": ([0, 0.125, 0.375, 0.64, 0.91, 1], [0, 0, 1, 1, 0, 0]),
        "b": ([0, 0.11, 0.34, 0.65, 1], [0.5, 1, 1, 0, 0])}


def _jet(v):
  """jet as a colour map of 256 entries shows v: entry floor(256 v), sampled at entry / 255."""
  x = min(int(v * 256), 255) / 255
  return np.array([255 * np.interp(x, *_JET[c]) for c in "rgb"])


def _pixel(pixels, ax, fx, fy):
  """The rendered pixel at fractions (fx from the left, fy from the top) of an axes' box."""
  box = ax.get_window_extent()  # display pixels, origin at the bottom left
  x = int(box.x0 + fx * box.width)
  y = int(box.y1 - fy * box.height)
  return pixels[pixels.shape[0] - 1 - y, x].astype(int)


def test_panel_pixels_ground_truth_absolute_heat_maps_and_colour_bar(tmp_path):
  """Rendered pixels against hand-made fixtures: ground-truth blocks in the VOC palette, constant weight maps
  coloured by their absolute value (not stretched to their own range), and the colour bar running from jet(0) at
  the bottom to jet(1) at the top."""
  blocks = np.array([[0, 1, 2, 3], [4, 15, 20, 255], [1, 0, 3, 2]])
  label = np.kron(blocks, np.ones((4, 4), np.int64))  # 12 x 16, each block 4 x 4 pixels
  prediction = np.zeros_like(label)
  image = np.full((12, 16, 3), 90, np.uint8)
  weights = np.stack([np.full((3, 4), 0.25), np.full((3, 4), 0.75)], -1)  # constant per scale
  path = str(tmp_path / "panel.png")
  visualize.attention_panel(image, weights, prediction, (1.0, 0.5), label=label, path=path)
  fig = visualize.attention_panel(image, weights, prediction, (1.0, 0.5), label=label)
  pixels = visualize.figure_pixels(fig)  # the axes' boxes below are those of this drawing
  with Image.open(path) as saved:  # the file holds the same rendering
    np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), pixels)
  axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
  assert list(axes) == ["image", "ground truth", "scale 1", "scale 0.5", "prediction"]
  palette = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 15: (192, 128, 128),
             20: (0, 64, 128), 255: (224, 224, 192)}
  for (r, c), value in np.ndenumerate(blocks):
    got = _pixel(pixels, axes["ground truth"], (c + 0.5) / 4, (r + 0.5) / 3)
    np.testing.assert_array_equal(got, palette[value], err_msg=f"block {r, c} = class {value}")
  for title, value in (("scale 1", 0.25), ("scale 0.5", 0.75)):
    for fx, fy in ((0.5, 0.5), (0.1, 0.9)):
      np.testing.assert_allclose(_pixel(pixels, axes[title], fx, fy), _jet(value), atol=1, err_msg=title)
  bar = next(ax for ax in fig.axes if ax.get_ylabel() == "fusion weight")
  assert bar.get_ylim() == (0.0, 1.0)
  assert [t.get_text() for t in bar.get_yticklabels()] == ["0.00", "0.25", "0.50", "0.75", "1.00"]
  for value in (0.02, 0.5, 0.98):  # off the outline at the ends; one pixel of the bar spans ~0.005
    np.testing.assert_allclose(_pixel(pixels, bar, 0.5, 1 - value), _jet(value), atol=6, err_msg=value)


def test_save_prediction_writes_exactly_the_expected_files(tmp_path):
  image, prediction, weights, scales = _example()
  paths = visualize.save_prediction(str(tmp_path / "out"), "cat", image, prediction, weights=weights, scales=scales)
  names = ["cat_seg.png", "cat_seg_color.png", "cat_weights_s1.png", "cat_weights_s0.75.png",
           "cat_weights_s0.5.png", "cat_panel.png"]
  assert paths == [str(tmp_path / "out" / n) for n in names]
  assert sorted(os.listdir(tmp_path / "out")) == sorted(names)
  with Image.open(paths[0]) as seg:
    np.testing.assert_array_equal(np.asarray(seg), prediction)
  with Image.open(paths[1]) as color:
    np.testing.assert_array_equal(np.asarray(color), visualize.voc_palette()[prediction])
  with Image.open(paths[2]) as heat:
    assert heat.size == (image.shape[1], image.shape[0])  # upsampled to the image, not the score-map grid


def test_save_prediction_without_weights(tmp_path):
  image, prediction, _, _ = _example()
  paths = visualize.save_prediction(str(tmp_path), "dog", image, prediction)
  assert sorted(os.listdir(tmp_path)) == ["dog_seg.png", "dog_seg_color.png"] and len(paths) == 2
  with pytest.raises(ValueError, match="without their scales"):
    visualize.save_prediction(str(tmp_path), "dog", image, prediction, weights=np.ones((2, 2, 3)))
  with pytest.raises(ValueError, match="prediction shape"):
    visualize.save_prediction(str(tmp_path), "dog", image, prediction[:3])


def test_eval_examples_are_cropped_rows_of_the_batch_and_become_panels():
  """The first rows of an evaluation batch as shown: all-padding rows skipped, each cropped to its mask with the
  mean added back and its own labels, the fusion weights summing to 1; one TensorBoard panel per example."""
  import jax  # noqa: PLC0415

  from configs import shapes  # noqa: PLC0415
  from scaleattn.evaluation import panels  # noqa: PLC0415
  from scaleattn.experiment import build_experiment  # noqa: PLC0415
  config = shapes.get_config("smoke")
  exp = build_experiment(config)
  params = exp.init_state(jax.random.key(0)).params
  size, mean = config.input.eval_size, np.asarray(config.input.mean_rgb, np.float32)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(0, 60, (4, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, 5, (4, size, size)).astype(np.int32), "mask": np.zeros((4, size, size), bool)}
  batch["mask"][0, :50, :70] = True
  batch["mask"][2:] = True  # row 1 is padding
  batch["label"][0, :3] = 255
  examples = panels.eval_examples(exp, params, batch, 3)
  assert [ex.index for ex in examples] == [0, 2]
  first = examples[0]
  np.testing.assert_array_equal(first.image, np.clip(batch["image"][0, :50, :70] + mean, 0, 255).astype(np.uint8))
  np.testing.assert_array_equal(first.label, batch["label"][0, :50, :70])
  assert first.prediction.shape == (50, 70) and first.prediction.max() < 5
  assert first.weights.shape == (50, 70, 2)
  np.testing.assert_allclose(first.weights.sum(-1), 1.0, atol=1e-5)
  assert examples[1].image.shape == (size, size, 3)
  panels = panels.eval_panels(exp, params, batch, 3, "validation")
  assert sorted(panels) == ["validation/example_000", "validation/example_002"]
  for panel in panels.values():
    assert panel.dtype == np.uint8 and panel.ndim == 4 and panel.shape[0] == 1 and panel.shape[-1] == 3


def test_eval_examples_run_tiled_where_evaluation_does(monkeypatch):
  """With config.eval.tile_size set, the panels' predictions take the tiled path too (a device that needs tiles for
  evaluation would not hold the whole image for its panels), each example as `--mode=predict` would predict it."""
  import jax  # noqa: PLC0415

  from configs import shapes  # noqa: PLC0415
  from scaleattn.evaluation import panels  # noqa: PLC0415
  from scaleattn.experiment import build_experiment  # noqa: PLC0415
  from scaleattn.inference import predict, tiling  # noqa: PLC0415
  config = shapes.get_config("smoke")
  config.eval.tile_size, config.eval.tile_overlap = 49, 24
  exp = build_experiment(config)
  params = exp.init_state(jax.random.key(0)).params
  size = config.input.eval_size
  batch = {"image": np.random.default_rng(1).normal(0, 60, (2, size, size, 3)).astype(np.float32),
           "label": np.zeros((2, size, size), np.int32), "mask": np.zeros((2, size, size), bool)}
  batch["mask"][0, :60, :75] = True
  batch["mask"][1] = True
  upsampled = []
  upsample = tiling.TiledForward.upsample
  monkeypatch.setattr(tiling.TiledForward, "upsample", lambda self, *a: upsampled.append(a[2:]) or upsample(self, *a))
  examples = panels.eval_examples(exp, params, batch, 2)
  assert upsampled == [(60, 75), (size, size)]  # one tiled pass per example, at its real size
  assert examples[0].prediction.shape == (60, 75) and examples[0].weights.shape == (60, 75, 2)
  np.testing.assert_allclose(examples[1].weights.sum(-1), 1.0, atol=1e-5)
  pred, weights = predict.Predictor(exp, params)(batch["image"][:1, :60, :75], batch["mask"][:1, :60, :75])
  np.testing.assert_array_equal(examples[0].prediction, pred[0])
  np.testing.assert_allclose(examples[0].weights, weights[0], atol=1e-6)
