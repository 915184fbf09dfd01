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
  assert [ax.get_title() for ax in fig.axes] == ["image", "scale 1", "scale 0.75", "scale 0.5", "prediction"]
  shown = fig.axes[2].get_images()[0].get_array()
  assert shown.shape == image.shape[:2] and shown.min() >= 0 and shown.max() <= 1
  with pytest.raises(ValueError, match="3 scales"):
    visualize.attention_panel(image, weights[..., :2], prediction, scales)


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
