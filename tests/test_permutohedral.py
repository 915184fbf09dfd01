"""The permutohedral-lattice filter (scaleattn/crf/lattice.py) against the exact Gaussian sum in NumPy.

The lattice approximates K v, K_ij = exp(-|f_i - f_j|^2 / 2), up to a scale that depends on the data (blur mass
reaching missing lattice points is lost), so the comparisons are scale-free: the relative L2 error after the best
least-squares scale, and the normalized filter K v / K 1 that the CRF's messages use.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn import crf
from scaleattn.crf import lattice
from tests.test_crf import ITERATIONS, NORMALIZED, blocks_image, case, noisy_scores, reference_mean_field, run

H, W = 24, 20


def features(image: np.ndarray, stds: tuple[float, ...]) -> tuple[np.ndarray, tuple[tuple[float, float], ...]]:
  """[N, d] (x, y[, r, g, b]) / stds as float32 and their bounds (the image's extent and 0..255 colour)."""
  h, w = image.shape[:2]
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  raw = np.concatenate([x[..., None], y[..., None], image.astype(np.float64)], axis=-1)[..., :len(stds)]
  high = (w - 1.0, h - 1.0, 255.0, 255.0, 255.0)[:len(stds)]
  return ((raw / np.asarray(stds)).reshape(-1, len(stds)).astype(np.float32),
          tuple((0.0, hi / s) for hi, s in zip(high, stds, strict=True)))


def exact(feats: np.ndarray, values: np.ndarray) -> np.ndarray:
  """sum_j exp(-|f_i - f_j|^2 / 2) values_j in float64."""
  f = feats.astype(np.float64)
  return np.exp(-0.5 * np.sum((f[:, None] - f[None]) ** 2, axis=-1)) @ values.astype(np.float64)


def scaled_error(got: np.ndarray, expected: np.ndarray) -> float:
  """Relative L2 error of got against expected after the least-squares scale of got."""
  scale = np.sum(got * expected) / np.sum(got * got)
  return float(np.linalg.norm(scale * got - expected) / np.linalg.norm(expected))


def run_filter(values: np.ndarray, feats: np.ndarray, bounds, valid: np.ndarray | None = None) -> np.ndarray:
  valid = np.ones(len(feats), bool) if valid is None else valid
  return np.asarray(crf.permutohedral_filter(jnp.asarray(values), jnp.asarray(feats), jnp.asarray(valid),
                                             bounds)).astype(np.float64)


# (stds, bound): xy and rgb stds of the appearance kernel (d = 5) and the position kernel (d = 2).
# Measured scaled errors over four images (seeds 5-8; the test uses 5): xy 6 / rgb 20: 0.043-0.051; xy 4 / rgb 5:
# 0.085-0.096 (sparse in colour: few pixels share lattice cells); xy 121 / rgb 5: 0.053-0.060; position std 2: 0.020,
# std 3: 0.017.
# The bounds leave about 1.3x. The same output compared with the Gaussian of 1.5x or 1 / 1.5x the std is off by
# 0.095-0.20 for d = 5 and 0.050-0.091 for d = 2 (above the bounds: asserted), so a lattice that blurred with a
# wrong std would fail.
CASES = [((6.0, 6.0, 20.0, 20.0, 20.0), 0.07), ((4.0, 4.0, 5.0, 5.0, 5.0), 0.13),
         ((121.0, 121.0, 5.0, 5.0, 5.0), 0.08), ((2.0, 2.0), 0.03), ((3.0, 3.0), 0.03)]


@pytest.mark.parametrize("stds,bound", CASES)
def test_lattice_approximates_the_gaussian(stds, bound):
  image, _ = blocks_image(H, W, 5, noise=4.0)
  feats, bounds = features(image, stds)
  values = np.random.default_rng(1).uniform(0, 1, (H * W, 3))
  got = run_filter(values.astype(np.float32), feats, bounds)
  error = scaled_error(got, exact(feats, values))
  wrong = [scaled_error(got, exact(feats * factor, values)) for factor in (1.5, 1 / 1.5)]
  print(f"lattice stds {stds}: scaled error {error:.4f}; against 1.5x / 0.67x the std {np.round(wrong, 4)}")
  assert error < bound
  assert min(wrong) > bound


def test_normalized_filter_is_a_weighted_mean():
  """K v / K 1 keeps constants and stays within [min v, max v] (all weights are >= 0); against the exact
  normalized filter its mean absolute error is small (measured 0.0022 at xy 6 / rgb 20 on values in 0..1; bound 0.01)."""
  image, _ = blocks_image(H, W, 6, noise=4.0)
  feats, bounds = features(image, (6.0, 6.0, 20.0, 20.0, 20.0))
  values = np.random.default_rng(2).uniform(0, 1, (H * W, 2))
  got = run_filter(np.concatenate([values, np.full((H * W, 1), 0.7), np.ones((H * W, 1))], -1).astype(np.float32),
                   feats, bounds)
  normalized = got[:, :3] / got[:, 3:]
  np.testing.assert_allclose(normalized[:, 2], 0.7, rtol=1e-5)
  assert np.all(normalized[:, :2] >= values.min() - 1e-6) and np.all(normalized[:, :2] <= values.max() + 1e-6)
  reference = exact(feats, values) / exact(feats, np.ones((H * W, 1)))
  mean_error = np.mean(np.abs(normalized[:, :2] - reference))
  print(f"normalized filter: mean |error| {mean_error:.4f}")
  assert mean_error < 0.01


def test_filter_matrix_is_nearly_symmetric_and_its_transpose_is_the_reversed_blur():
  """The exact kernel is symmetric; the lattice's is only approximately (its blur directions do not commute where
  lattice points are missing): measured ||A - A^T|| / ||A|| = 0.060 here, bound 0.1. Blurring the directions in the
  reverse order gives exactly A^T (densecrf's transposed filter)."""
  image, _ = blocks_image(12, 10, 3, noise=4.0)
  feats, bounds = features(image, (6.0, 6.0, 20.0, 20.0, 20.0))
  n = len(feats)
  layout = lattice.key_layout(bounds)
  lat = lattice.with_capacity(lattice.lattice_keys(jnp.asarray(feats), jnp.ones(n, bool), layout), layout, n * 6)
  a = np.asarray(lattice.apply(lat, jnp.eye(n))).astype(np.float64)
  reverse = np.asarray(lattice.apply(lat._replace(neighbours=lat.neighbours[::-1]), jnp.eye(n)))
  asymmetry = np.linalg.norm(a - a.T) / np.linalg.norm(a)
  print(f"lattice asymmetry {asymmetry:.4f}")
  assert asymmetry < 0.1
  np.testing.assert_allclose(reverse, a.T, atol=1e-6 * np.abs(a).max())


def test_absent_pixels_are_ignored():
  """A 12x10 image inside a 16x16 one with valid=False elsewhere: the valid pixels' output equals the 12x10
  image's alone, whatever the padding holds."""
  stds = (6.0, 6.0, 20.0, 20.0, 20.0)
  image, _ = blocks_image(12, 10, 4)
  rng = np.random.default_rng(3)
  padded = rng.uniform(0, 255, (16, 16, 3)).astype(np.float32)
  padded[:12, :10] = image
  valid = np.zeros((16, 16), bool)
  valid[:12, :10] = True
  values = rng.uniform(0, 1, (16, 16, 3)).astype(np.float32)
  feats, _ = features(padded, stds)
  _, bounds = features(image, stds)  # the padding's positions lie outside the small image's bounds: clip them
  feats = np.minimum(feats, np.asarray([b[1] for b in bounds], np.float32))
  got = run_filter(values.reshape(-1, 3), feats, bounds, valid.reshape(-1)).reshape(16, 16, 3)
  alone_feats, _ = features(image, stds)
  alone = run_filter(values[:12, :10].reshape(-1, 3), alone_feats, bounds).reshape(12, 10, 3)
  np.testing.assert_allclose(got[:12, :10], alone, rtol=1e-5, atol=1e-6)


def test_dense_lattice_takes_the_large_capacity():
  """Uniform noise in 5-D spreads the pixels over more lattice points than the small capacity (N / 4): the filter
  switches to the worst-case size and equals the lattice built at that size directly."""
  n = H * W
  feats = np.random.default_rng(4).uniform(0, 4, (n, 5)).astype(np.float32)
  bounds = ((0.0, 4.0),) * 5
  layout = lattice.key_layout(bounds)
  keys = lattice.lattice_keys(jnp.asarray(feats), jnp.ones(n, bool), layout)
  small, full = lattice.capacities(n, 5, layout)
  assert int(keys.count) > small
  values = np.random.default_rng(5).uniform(0, 1, (n, 2)).astype(np.float32)
  direct = np.asarray(lattice.apply(lattice.with_capacity(keys, layout, full), jnp.asarray(values)))
  np.testing.assert_allclose(run_filter(values, feats, bounds), direct, rtol=1e-6, atol=1e-7)


def test_hash_table_numbers_each_distinct_key_once_and_links_the_blur_neighbours():
  """The device hash table against NumPy's unique, on uniform 5-D noise (most vertices distinct, so keys collide
  and probe on) with a fifth of the pixels absent: every present vertex's number is its key's, distinct keys get
  distinct numbers 0..count-1, absent pixels none, a lookup finds every stored key and no other, and each point's
  neighbour along each lattice direction is the point whose key is its own moved one step, where one exists."""
  n = H * W
  feats = np.random.default_rng(4).uniform(0, 4, (n, 5)).astype(np.float32)
  valid = np.random.default_rng(6).uniform(size=n) > 0.2
  layout = lattice.key_layout(((0.0, 4.0),) * 5)
  keys = lattice.lattice_keys(jnp.asarray(feats), jnp.asarray(valid), layout)
  key, point = np.asarray(keys.key), np.asarray(keys.point)
  distinct, inverse = np.unique(key[valid], return_inverse=True)
  count = len(distinct)
  assert int(keys.count) == count and int(keys.probes) > 1
  assert np.all(point[~valid] == -1)
  numbers = point[valid].reshape(-1)
  assert sorted(set(numbers.tolist())) == list(range(count))
  assert len(set(zip(inverse.reshape(-1).tolist(), numbers.tolist(), strict=True))) == count
  first = np.unique(inverse.reshape(-1), return_index=True)[1]  # a vertex of each distinct key
  np.testing.assert_array_equal(np.asarray(lattice._find(keys, jnp.asarray(distinct))), numbers[first])
  others = np.setdiff1d(np.arange(int(distinct.max()) + 1, int(distinct.max()) + 500, dtype=np.uint32), distinct)
  assert np.all(np.asarray(lattice._find(keys, jnp.asarray(others))) == -1)
  capacity = n * 6
  lat = lattice.with_capacity(keys, layout, capacity)
  key_of = np.empty(count, np.uint32)
  key_of[numbers] = key[valid].reshape(-1)
  number_of = {int(k): int(i) for i, k in enumerate(key_of)}
  coords = np.asarray(lattice._unpack(jnp.asarray(key_of), layout))
  for j in range(6):
    step = np.full(5, -1, np.int32)
    if j < 5:
      step[j] = 5
    for side, sign in enumerate((-1, 1)):
      moved = np.asarray(lattice._pack(jnp.asarray(coords + sign * step), layout))
      expected = [number_of.get(int(k), capacity) for k in moved]
      np.testing.assert_array_equal(np.asarray(lat.neighbours[j, side, :count]), expected)


def test_keys_that_do_not_fit_are_refused():
  with pytest.raises(ValueError, match="uint32"):
    lattice.key_layout(((0.0, 2000.0), (0.0, 2000.0), (0.0, 255.0), (0.0, 255.0), (0.0, 255.0)))


@pytest.mark.parametrize("h,w,seed", [(12, 12, 0), (16, 10, 1)])
def test_lattice_crf_close_to_reference(h, w, seed):
  """dense_crf(filter='lattice') against the exact float64 mean field (normalized messages, the convention the
  lattice supports). Measured (12x12, 16x10): mean |dQ| 0.0022, 0.0017; argmax agreement 100%, 100%; the
  bounds are the grid's (test_crf.py)."""
  scores, image, _ = case(h, w, seed)
  expected = reference_mean_field(scores, image, iterations=ITERATIONS, normalize=True, **NORMALIZED)[-1]
  got = run(scores, image, iterations=ITERATIONS, filter="lattice", normalize=True, **NORMALIZED)
  mean_diff = np.mean(np.abs(got - expected))
  agreement = np.mean(got.argmax(-1) == expected.argmax(-1))
  print(f"lattice vs exact {h}x{w}: mean |dQ| {mean_diff:.4f}, argmax agreement {agreement:.3f}")
  assert mean_diff < 0.01
  assert agreement >= 0.97


def test_lattice_crf_refuses_unnormalized_messages():
  scores = noisy_scores(np.zeros((4, 4), np.int64), 0)[None]
  with pytest.raises(ValueError, match="normalize"):
    crf.dense_crf(jnp.asarray(scores), jnp.zeros((1, 4, 4, 3)), filter="lattice", normalize=False)
