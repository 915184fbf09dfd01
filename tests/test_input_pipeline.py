"""The input pipeline: image and label stay aligned through augmentation, batches are deterministic and
resumable by step, and process shards are disjoint and complete."""
import ml_collections
import numpy as np
import pytest

from configs import shapes
from scaleattn import input_pipeline, preprocessing

MEAN = (122.675, 116.669, 104.008)


def _colour_coded(h, w, rng):
  """An image whose label is a function of its colour: class k pixels have red = 40 * k + 10."""
  blocks = rng.integers(0, 5, (-(-h // 6), -(-w // 6)))  # 6x6 blocks, so rescaling keeps block interiors
  label = np.kron(blocks, np.ones((6, 6), int))[:h, :w].astype(np.uint8)
  image = np.stack([40 * label + 10, rng.integers(0, 255, (h, w)), rng.integers(0, 255, (h, w))], -1)
  return image.astype(np.uint8), label


@pytest.mark.parametrize("scale_range", [(1.0, 1.0), (0.5, 1.5)])
def test_augmentation_keeps_image_and_label_aligned(scale_range):
  rng = np.random.default_rng(0)
  for i in range(20):
    image, label = _colour_coded(23 + i, 31 - i, rng)
    out = preprocessing.train_example(image, label, np.random.default_rng(i), crop_size=29, mean_rgb=MEAN,
                                      mirror=True, scale_range=scale_range)
    assert out["image"].shape == (29, 29, 3) and out["label"].shape == (29, 29)
    real = out["label"] != 255
    red = out["image"][..., 0] + MEAN[0]
    if scale_range == (1.0, 1.0):  # exact pixels: the label is exactly the colour's class
      np.testing.assert_allclose(red[real], 40 * out["label"][real] + 10, atol=1e-3)
      np.testing.assert_allclose(out["image"][~real], 0.0)  # padding is the mean
    else:  # bilinear image, nearest label: most pixels still agree
      assert np.mean(np.abs(red[real] - (40 * out["label"][real] + 10)) < 20) > 0.8


def test_eval_example_pads_and_masks():
  rng = np.random.default_rng(1)
  image, label = _colour_coded(7, 9, rng)
  out = preprocessing.eval_example(image, label, eval_size=13, mean_rgb=MEAN, instance_size=np.ones((7, 9)))
  assert out["mask"].sum() == 63 and out["mask"][:7, :9].all()
  assert (out["label"][~out["mask"]] == 255).all() and (out["image"][~out["mask"]] == 0).all()
  np.testing.assert_array_equal(out["label"][:7, :9], label)
  with pytest.raises(ValueError, match="larger than config.input.eval_size=5"):
    preprocessing.eval_example(image, label, eval_size=5, mean_rgb=MEAN)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = shapes.get_config("smoke")
  c.dataset.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.train.batch_size = 4
  c.eval.batch_size = 6
  return c


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_deterministic_and_resumable(config):
  data = input_pipeline.create_datasets(config, process_index=0, process_count=1)
  first = _take(data.train_batches(0), 12)  # 48 examples: crosses the 32-example epoch boundary
  again = _take(input_pipeline.create_datasets(config, process_index=0, process_count=1).train_batches(0), 12)
  resumed = _take(data.train_batches(7), 5)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
  for a, b in zip(first[7:], resumed, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # Each epoch is a permutation of the whole split: 8 batches of 4 = one epoch of 32 distinct examples.
  epoch = np.concatenate([b["image"][:, :, :, 0].reshape(4, -1) for b in first[:8]])
  assert len({row.tobytes() for row in epoch}) == 32


def test_process_shards_are_disjoint_and_complete(config):
  whole = _take(input_pipeline.create_datasets(config, process_index=0, process_count=1).train_batches(3), 2)
  parts = [_take(input_pipeline.create_datasets(config, process_index=i, process_count=2).train_batches(3), 2)
           for i in range(2)]
  for step in range(2):
    np.testing.assert_array_equal(np.concatenate([parts[0][step]["image"], parts[1][step]["image"]]),
                                  whole[step]["image"])


def test_eval_covers_every_example_once(config):
  splits = []
  for process_index in range(2):
    data = input_pipeline.create_datasets(config, process_index=process_index, process_count=2)
    batches = list(data.eval_batches("validation"))
    assert len(batches) == data.num_eval_batches("validation") == 2  # 8 examples, global batch 6
    splits.append(batches)
  masks = np.concatenate([b["mask"] for part in zip(*splits, strict=True) for b in part])
  assert masks.any(axis=(1, 2)).sum() == 8  # 8 real examples, 4 padding ones
  assert all(b["image"].shape == (3, 81, 81, 3) and "instance_size" in b for part in splits for b in part)


def test_class_count_mismatch_is_reported(config):
  from scaleattn import config_validation
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.model.num_classes = 3
  with pytest.raises(config_validation.ConfigError, match="scale_shapes"):
    config_validation.check_num_classes(bad, input_pipeline.create_datasets(config).class_names)
