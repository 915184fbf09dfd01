"""Joint image/label augmentation keeps the two aligned, pads with the mean and 255, and evaluation pads to a
fixed size with a validity mask. Fixtures make the label a function of pixel colour, so misalignment shows."""
import numpy as np
import pytest

from scaleattn.data import preprocessing

MEAN = np.array([122.675, 116.669, 104.008], np.float32)


def _colour_coded(h, w, rng, block=6):
  """Blocks of random classes 0..4; red = 40 * class + 10 exactly, green/blue random (pixel-level detail)."""
  blocks = rng.integers(0, 5, (-(-h // block), -(-w // block)))
  label = np.kron(blocks, np.ones((block, block), int))[:h, :w].astype(np.uint8)
  image = np.stack([40 * label + 10, rng.integers(0, 255, (h, w)), rng.integers(0, 255, (h, w))], -1)
  return image.astype(np.uint8), label


def _agreement(out):
  """Fraction of real (non-255) pixels whose red channel names their label's class (to within 20 levels)."""
  real = out["label"] != 255
  red = out["image"][..., 0] + MEAN[0]
  return np.mean(np.abs(red[real] - (40 * out["label"][real] + 10)) < 20)


def _train(image, label, seed, crop=29, mirror=True, scale=(1.0, 1.0)):
  return preprocessing.train_example(image, label, np.random.default_rng(seed), crop_size=crop, mean_rgb=MEAN,
                                     mirror=mirror, scale_range=scale)


def test_crop_and_mirror_keep_exact_alignment_and_pad_with_mean_and_255():
  rng = np.random.default_rng(0)
  for i in range(30):
    image, label = _colour_coded(20 + i, 40 - i, rng)  # some sides shorter than the crop, some longer
    out = _train(image, label, i)
    assert out["image"].shape == (29, 29, 3) and out["image"].dtype == np.float32
    assert out["label"].shape == (29, 29) and out["label"].dtype == np.int32
    real = out["label"] != 255
    red = out["image"][..., 0] + MEAN[0]
    np.testing.assert_allclose(red[real], 40 * out["label"][real] + 10, atol=1e-3)
    np.testing.assert_array_equal(out["image"][~real], 0.0)  # padding is the mean
    assert real.sum() == min(29, 20 + i) * min(29, 40 - i)


def test_crop_is_a_window_of_the_image_mirrored_or_not():
  """Each output is some window of the (padded) input, mirrored about half the time, never without mirror."""
  rng = np.random.default_rng(1)
  image, label = _colour_coded(37, 45, rng)
  flips, corners = 0, set()
  for seed in range(60):
    for mirror in (True, False):
      out = _train(image, label, seed, crop=31, mirror=mirror)
      pixels = out["image"] + MEAN
      windows = {(t, l, f): image[t:t + 31, l:l + 31][:, ::-1] if f else image[t:t + 31, l:l + 31]
                 for t in range(37 - 31 + 1) for l in range(45 - 31 + 1) for f in (False, True)}
      found = [key for key, window in windows.items() if np.allclose(window, pixels, atol=1e-3)]
      assert len(found) == 1, found
      t, l, f = found[0]
      window = label[t:t + 31, l:l + 31]
      np.testing.assert_array_equal(out["label"], window[:, ::-1] if f else window)
      assert mirror or not f
      flips += f
      corners.add((t, l))
  assert 15 <= flips <= 45  # of 60 with mirroring on
  tops, lefts = {t for t, _ in corners}, {l for _, l in corners}
  assert tops == set(range(7)) and {0, 14} <= lefts  # offsets drawn over the whole range


def test_random_scale_resizes_image_and_label_together():
  rng = np.random.default_rng(2)
  aligned, shifted, flipped = [], [], []
  for i in range(20):
    image, label = _colour_coded(40 + i, 50 - i, rng, block=8)
    out = _train(image, label, i, crop=33, scale=(0.5, 1.5))
    aligned.append(_agreement(out))
    shifted.append(_agreement({"image": out["image"], "label": np.roll(out["label"], 2, axis=1)}))
    flipped.append(_agreement({"image": out["image"], "label": out["label"][:, ::-1]}))
  # Bilinear image, nearest label: only pixels at block edges disagree; the check does see a 2-pixel shift.
  assert min(aligned) > 0.8 and np.mean(aligned) > 0.88
  assert np.mean(shifted) < 0.8 and np.mean(flipped) < 0.5
  # The drawn factor sets the size: round(w * f), round(h * f), label with nearest neighbours.
  image, label = _colour_coded(10, 20, rng)
  f = np.random.default_rng(5).uniform(0.5, 1.5)
  scaled_image, scaled_label = preprocessing.random_scale(image, label, np.random.default_rng(5), (0.5, 1.5))
  assert scaled_label.shape == (round(10 * f), round(20 * f)) and scaled_image.shape == scaled_label.shape + (3,)
  assert set(np.unique(scaled_label)) <= set(np.unique(label))
  same = preprocessing.random_scale(image, label, np.random.default_rng(5), (1.0, 1.0))
  assert same[0] is image and same[1] is label  # (1, 1) is off


def test_eval_example_pads_and_masks():
  rng = np.random.default_rng(3)
  image, label = _colour_coded(7, 9, rng)
  sizes = rng.integers(1, 50, (7, 9)).astype(np.uint16)
  out = preprocessing.eval_example(image, label, eval_size=13, mean_rgb=MEAN, instance_size=sizes)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
      "image": ((13, 13, 3), np.float32), "label": ((13, 13), np.int32), "mask": ((13, 13), bool),
      "instance_size": ((13, 13), np.float32)}
  np.testing.assert_array_equal(out["mask"], np.pad(np.ones((7, 9), bool), ((0, 6), (0, 4))))
  np.testing.assert_allclose(out["image"][:7, :9], image - MEAN, atol=1e-4)
  np.testing.assert_array_equal(out["label"][:7, :9], label)
  np.testing.assert_array_equal(out["instance_size"][:7, :9], sizes)
  assert (out["label"][~out["mask"]] == 255).all() and (out["image"][~out["mask"]] == 0).all()
  assert (out["instance_size"][~out["mask"]] == 0).all()
  with pytest.raises(ValueError, match="7x9 is larger than config.input.eval_size=8"):
    preprocessing.eval_example(image, label, eval_size=8, mean_rgb=MEAN)


def test_padding_example_counts_nowhere():
  out = preprocessing.padding_example(5, with_mask=True, with_instance_size=False)
  assert not out["mask"].any() and (out["label"] == 255).all() and "instance_size" not in out
  assert out["image"].shape == (5, 5, 3) and (out["image"] == 0).all()
  assert preprocessing.padding_example(5, with_mask=True, with_instance_size=True)["instance_size"].shape == (5, 5)
  train = preprocessing.padding_example(4, with_mask=False, with_instance_size=False)
  assert set(train) == {"image", "label"} and (train["label"] == 255).all()
