"""Confusion matrix, IoU and attention-by-size statistics against hand-computed fixtures and plain Python loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn.evaluation import metrics

# 5 classes: 0 and 1 present, 2 present but never predicted, 3 predicted but absent from the ground truth,
# 4 neither present nor predicted. One void pixel (255).
LABEL = np.array([[0, 0, 1, 1],
                  [2, 255, 1, 0]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 3, 0]])
HAND = np.array([[2, 1, 0, 0, 0],
                 [0, 2, 0, 1, 0],
                 [1, 0, 0, 0, 0],
                 [0, 0, 0, 0, 0],
                 [0, 0, 0, 0, 0]])
# IoU = TP / (GT + Pred - TP): class 0: 2/(3+3-2), class 1: 2/(3+3-2), class 2: 0/1, class 3: 0/1, class 4: 0/0.
HAND_IOU = [0.5, 0.5, 0.0, 0.0, np.nan]


def loop_confusion(pred, label, num_classes, mask=None):
  """The definition, one pixel at a time."""
  m = np.zeros((num_classes, num_classes), np.int64)
  mask = np.ones(label.shape, bool) if mask is None else mask
  for p, t, keep in zip(pred.ravel().tolist(), label.ravel().tolist(), mask.ravel().tolist(), strict=True):
    if keep and 0 <= t < num_classes:
      m[t, p] += 1
  return m


def random_batch(rng, shape, num_classes):
  label = rng.integers(0, num_classes, shape)
  label[rng.random(shape) < 0.2] = 255
  return rng.integers(0, num_classes, shape), label, rng.random(shape) < 0.8


def test_confusion_matrix_hand_fixture():
  np.testing.assert_array_equal(metrics.confusion_matrix(PRED, LABEL, 5), HAND)
  as_uint8 = metrics.confusion_matrix(jnp.asarray(PRED, jnp.uint8), jnp.asarray(LABEL, jnp.uint8), 5)
  np.testing.assert_array_equal(as_uint8, HAND)
  assert metrics.confusion_matrix(PRED, LABEL, 5).dtype == jnp.int32


def test_labels_outside_the_classes_are_ignored():
  label = np.where(LABEL == 255, 7, LABEL)
  np.testing.assert_array_equal(metrics.confusion_matrix(PRED, label, 5), HAND)


def test_mask_drops_pixels():
  mask = np.ones(LABEL.shape, bool)
  mask[:, 0] = False  # drops (gt 0, pred 0) and (gt 2, pred 0)
  got = np.asarray(metrics.confusion_matrix(PRED, LABEL, 5, mask=mask))
  want = HAND.copy()
  want[0, 0] -= 1
  want[2, 0] -= 1
  np.testing.assert_array_equal(got, want)
  result = metrics.compute_iou(got)
  # class 0: 1/(2+1-1); class 1 unchanged; class 2 now absent from both (NaN); class 3: 0.
  np.testing.assert_allclose(result["iou"], [0.5, 0.5, np.nan, 0.0, np.nan])
  assert result["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
  assert result["pixel_accuracy"] == pytest.approx(3 / 5)


def test_compute_iou_hand_fixture():
  result = metrics.compute_iou(HAND)
  np.testing.assert_allclose(result["iou"], HAND_IOU)
  assert result["miou"] == pytest.approx(0.25)  # class 4 left out of the mean, class 3 counts as 0
  assert result["pixel_accuracy"] == pytest.approx(4 / 7)


def test_compute_iou_empty_matrix_is_nan_without_warnings():
  with np.errstate(all="raise"):
    result = metrics.compute_iou(np.zeros((3, 3), np.int32))
  assert np.isnan(result["miou"]) and np.isnan(result["pixel_accuracy"]) and np.isnan(result["iou"]).all()


def test_against_python_loop_under_jit():
  rng = np.random.default_rng(0)
  pred, label, mask = random_batch(rng, (2, 9, 11), 4)
  f = jax.jit(metrics.confusion_matrix, static_argnums=2)
  np.testing.assert_array_equal(f(pred, label, 4, mask), loop_confusion(pred, label, 4, mask))
  np.testing.assert_array_equal(f(pred, label, 4), loop_confusion(pred, label, 4))


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="pred shape"):
    metrics.confusion_matrix(PRED[:1], LABEL, 5)
  with pytest.raises(ValueError, match="mask shape"):
    metrics.confusion_matrix(PRED, LABEL, 5, mask=np.ones((2, 3), bool))
  with pytest.raises(ValueError, match="num_classes"):
    metrics.confusion_matrix(PRED, LABEL, 0)
  with pytest.raises(ValueError, match="square"):
    metrics.compute_iou(np.zeros((4, 3)))


def test_summarize():
  out = metrics.summarize(metrics.compute_iou(HAND), ("bg", "a", "b", "c", "d"))
  assert set(out) == {"miou", "pixel_accuracy", "iou/bg", "iou/a", "iou/b", "iou/c", "iou/d"}
  assert out["iou/a"] == 0.5 and out["iou/c"] == 0.0 and np.isnan(out["iou/d"])
  assert all(isinstance(v, float) for v in out.values())
  with pytest.raises(ValueError, match="class names"):
    metrics.summarize(metrics.compute_iou(HAND), ("bg",))


BINS = (16, 32, 64)


def loop_bin(size):
  """Bin of one pixel: background, (0, 16), [16, 32), [32, 64), >= 64; None for padding."""
  if size < 0:
    return None
  if size == 0:
    return 0
  for i, edge in enumerate(BINS):
    if size < edge:
      return 1 + i
  return 1 + len(BINS)


def test_sum_by_size_hand_fixture():
  weights = np.array([[[[0.2, 0.8], [0.6, 0.4], [1.0, 0.0]],
                       [[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]]])
  size = np.array([[[0, 5, 16], [100, -1, 0]]])  # 16 falls in [16, 32); -1 is padding
  weight_sum, count = metrics.sum_by_size(weights, size, BINS)
  np.testing.assert_allclose(weight_sum, [[0.5, 1.5], [0.6, 0.4], [1.0, 0.0], [0, 0], [0.5, 0.5]], rtol=1e-6)
  np.testing.assert_array_equal(count, [2, 1, 1, 0, 1])
  assert count.dtype == jnp.int32


def test_sum_by_size_against_loop_and_merge():
  rng = np.random.default_rng(3)
  shape, num_scales = (2, 6, 7), 3
  weights = rng.dirichlet(np.ones(num_scales), size=shape)
  size = rng.choice([-1, 0, 3, 15.5, 16, 31, 32, 63, 64, 200], size=shape)
  want_sum, want_count = np.zeros((len(BINS) + 2, num_scales)), np.zeros(len(BINS) + 2, np.int64)
  for w, s in zip(weights.reshape(-1, num_scales), size.ravel(), strict=True):
    b = loop_bin(s)
    if b is not None:
      want_sum[b] += w
      want_count[b] += 1
  halves = [metrics.sum_by_size(weights[i:i + 1], size[i:i + 1], BINS) for i in range(2)]
  merged = jax.tree.map(jnp.add, *halves)
  for got_sum, got_count in (metrics.sum_by_size(weights, size, BINS), merged):
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)
    np.testing.assert_array_equal(got_count, want_count)


def test_sum_by_size_rejects_bad_bins_and_shapes():
  with pytest.raises(ValueError, match="strictly increasing"):
    metrics.sum_by_size(np.ones((1, 2, 2, 2)), np.ones((1, 2, 2)), (32, 16))
  with pytest.raises(ValueError, match="positive"):
    metrics.sum_by_size(np.ones((1, 2, 2, 2)), np.ones((1, 2, 2)), ())
  with pytest.raises(ValueError, match="instance_size"):
    metrics.sum_by_size(np.ones((1, 2, 3, 2)), np.ones((1, 2, 2)), BINS)


def test_summarize_by_size():
  weight_sum = np.array([[3.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.5, 1.5], [2.0, 0.0]])
  count = np.array([4, 0, 2, 2, 2])
  out = metrics.summarize_by_size(weight_sum, count, "attention", ("scale_1", "scale_0.5"), BINS)
  assert metrics.size_bin_names(BINS) == ("background", "size_0-16", "size_16-32", "size_32-64", "size_64+")
  assert out["attention/background/scale_1"] == 0.75 and out["attention/background/scale_0.5"] == 0.25
  assert out["attention/size_32-64/scale_0.5"] == 0.75 and out["pixels/size_64+"] == 2.0
  assert np.isnan(out["attention/size_0-16/scale_1"]) and out["pixels/size_0-16"] == 0.0
  assert len(out) == 5 * 3
  with pytest.raises(ValueError, match="sums"):
    metrics.summarize_by_size(weight_sum, count, "attention", ("scale_1", "scale_0.75", "scale_0.5"), BINS)
