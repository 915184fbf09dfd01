"""Tiled inference against whole-image inference, on the smoke model (its receptive-field radius is 54 pixels)."""
import jax
import numpy as np
import numpy_reference as ref
import pytest

from configs import shapes, voc
from scaleattn import config_validation, inference, tiling
from scaleattn.models import build_model, resize
from scaleattn.models.largefov import receptive_radius
from scaleattn.state import build_experiment


def _model(fusion="attention", scales=(1.0, 0.75, 0.5)):
  cfg = shapes.get_config("smoke").model
  cfg.fusion.name, cfg.scales = fusion, scales
  return build_model(cfg), cfg


@pytest.mark.parametrize("length", [1, 7, 8, 64, 65, 66, 100, 1023, 2047])
@pytest.mark.parametrize("tile, overlap", [(65, 0), (65, 32), (129, 112), (257, 64)])
def test_plan_covers_every_cell_once_with_aligned_tiles(length, tile, overlap):
  plan = tiling.plan_axis(length, tile, overlap)
  weights = tiling.blend_weights(plan)
  np.testing.assert_array_equal(weights.sum(0), np.ones(resize.output_size(length)))  # weights sum to one
  for start, valid, (lo, hi) in zip(plan.starts, plan.valid, plan.owned, strict=True):
    assert start % 8 == 0 and 0 < valid <= tile and valid == min(tile, length - start)
    assert start // 8 <= lo < hi <= start // 8 + resize.output_size(valid)  # a tile provides only cells it computes
  assert plan.starts[-1] + tile >= length and (len(plan.starts) == 1 or plan.starts[-2] + tile < length)
  step = max(8, (tile - overlap) // 8 * 8)
  steps = np.diff(plan.starts)
  assert (steps[:-1] == step).all() and (steps[-1:] <= step).all()  # the last tile steps less, to end at the edge


def test_receptive_radius_of_vgg16_largefov():
  """Written out layer by layer: conv1 (2 x 1 px) + pool 1; conv2 (2 x 2) + pool 2; conv3 (3 x 4) + pool 4; conv4
  (3 x 8) + pool 8; conv5 (3 x 2 x 8, dilated) + pool 8; fc6 (12 x 8)."""
  cfg = voc.get_config().model.backbone
  assert receptive_radius(cfg.block_depths, cfg.conv5_dilation, cfg.fc6_dilation) == (
      2 + 1 + 4 + 2 + 12 + 4 + 24 + 8 + 48 + 8 + 96)
  assert tiling.exact_overlap(cfg) == 424


def _compare(model, images, tile, overlap, seed=0):
  variables = ref.random_variables(model, images[:, :33, :33], train=False, seed=seed)
  whole = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  tiled = tiling.TiledForward(model, tile, overlap)(variables["params"], images)
  return whole, tiled


@pytest.mark.parametrize("fusion, scales", [("attention", (1.0, 0.75, 0.5)), ("hierarchical", (1.0, 0.75, 0.5)),
                                            ("shared_attention", (1.5, 1.0, 0.5)), ("average", (1.0, 0.75, 0.5)),
                                            ("max", (1.0, 0.75, 0.5))])
def test_tiled_equals_whole_when_the_overlap_covers_the_receptive_field(fusion, scales):
  """Several tiles per scale and several fusion windows (17 x 17 cells for 129-pixel tiles) per image."""
  model, cfg = _model(fusion, scales)
  images = np.random.default_rng(0).normal(0, 1, (2, 150, 203, 3)).astype(np.float32)
  overlap = tiling.exact_overlap(cfg.backbone)
  assert overlap == 112  # twice the radius, 54
  whole, tiled = _compare(model, images, 129, overlap)
  assert len(tiling.plan_axis(203, 129, overlap).starts) > 2  # several tiles per row
  assert resize.output_size(150) > tiling.TiledForward(model, 129, overlap).window  # several fusion windows
  for a, b in ((whole.fused, tiled.fused), (whole.weights, tiled.weights), (whole.per_scale, tiled.per_scale)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  if fusion in ("attention", "hierarchical"):
    assert np.asarray(whole.weights).std() > 0.01


@pytest.mark.parametrize("fc6_kernel, stride1_pools, radius", [
    (3, True, 1 + 1 + 2 + 2 + 4 + 4 + 8 + 8 + 8 + 8 + 8),  # conv1 + pool1, conv2 + pool2, ..., conv5 + pool5, fc6
    (1, False, 1 + 1 + 2 + 2 + 4 + 4 + 8 + 8),  # no pool4 or pool5; a 1x1 fc6 adds nothing
])
def test_with_a_short_overlap_only_cells_near_tile_edges_differ(fc6_kernel, stride1_pools, radius):
  """Stated bound: a cell of the one-scale model whose receptive field (`radius` px each side, written out layer by
  layer) lies inside the tile that owns it, or reaches past the image's own edge only, is exact; the others may
  differ."""
  cfg = shapes.get_config("smoke").model
  cfg.scales, cfg.backbone.fc6_kernel, cfg.backbone.stride1_pools = (1.0,), fc6_kernel, stride1_pools
  model = build_model(cfg)
  images = np.random.default_rng(1).normal(0, 1, (1, 97, 201, 3)).astype(np.float32)
  whole, tiled = _compare(model, images, 65, 16)
  assert receptive_radius(cfg.backbone.block_depths, cfg.backbone.conv5_dilation, cfg.backbone.fc6_dilation,
                          fc6_kernel, stride1_pools) == radius
  assert tiling.exact_overlap(cfg.backbone) == -(-2 * radius // 8) * 8

  def exact_cells(length):
    plan = tiling.plan_axis(length, 65, 16)
    ok = np.zeros(resize.output_size(length), bool)
    for start, (lo, hi) in zip(plan.starts, plan.owned, strict=True):
      for c in range(lo, hi):
        ok[c] = (8 * c - radius >= start or start == 0) and (8 * c + radius < start + 65 or start + 65 >= length)
    return ok

  exact = exact_cells(97)[:, None] & exact_cells(201)[None, :]
  diff = np.abs(np.asarray(tiled.fused) - np.asarray(whole.fused)).max(-1)[0]
  assert exact.any() and (~exact).any()
  np.testing.assert_allclose(diff[exact], 0.0, atol=1e-5)
  assert diff[~exact].max() > 1e-3  # the bound is not vacuous: tile edges do change those cells


@pytest.mark.parametrize("n_out, n_in, size, halo, margin", [(65, 9, 17, 1, 1), (9, 65, 4, 0, 0), (33, 33, 17, 1, 1),
                                                              (1, 5, 8, 0, 0), (40, 1, 16, 1, 1), (513, 65, 129, 0, 0)])
def test_resize_windows_compose_the_whole_resize(n_out, n_in, size, halo, margin):
  """Each window's matrix on the input positions it reads (zero outside the input) gives the whole resize's output
  positions it covers (zero outside the output), against the NumPy align-corners reference."""
  x = np.random.default_rng(4).normal(size=(1, n_in, 1, 2))
  whole = ref.bilinear(x, (n_out, 1))[0, :, 0]
  windows = tiling.resize_windows(n_out, n_in, range(0, n_out, size), size, halo, margin)
  assert windows.span % 8 == 0
  padded = np.pad(whole, ((halo, size + halo), (0, 0)))
  for start, read, matrix in zip(windows.starts, windows.reads, windows.matrices, strict=True):
    crop = np.zeros((windows.span, 2))
    lo, hi = max(read, 0), min(read + windows.span, n_in)
    crop[lo - read:hi - read] = x[0, lo:hi, 0]
    np.testing.assert_allclose(matrix @ crop, padded[start:start + size + 2 * halo], atol=1e-6)
    assert not matrix[:, :margin].any() and not matrix[:, windows.span - margin:].any()  # margins only read


def test_tiled_upsampling_equals_the_whole_images():
  """Labels and weights at the image's resolution, window by window, against the NumPy reference's upsampling."""
  model, _ = _model()
  rng = np.random.default_rng(5)
  fused, weights = rng.normal(size=(2, 13, 20, 5)), rng.uniform(size=(2, 13, 20, 3))
  labels, full = tiling.TiledForward(model, 33, 8).upsample(fused.astype(np.float32), weights.astype(np.float32),
                                                            97, 153)
  np.testing.assert_array_equal(labels, ref.bilinear(fused, (97, 153)).argmax(-1))
  np.testing.assert_allclose(full, ref.bilinear(weights, (97, 153)), atol=1e-5)


@pytest.mark.parametrize("height, width", [(1, 300), (300, 1), (20, 30), (1023, 2047)])
def test_odd_sizes_strips_and_images_smaller_than_a_tile(height, width):
  model, cfg = _model("average", scales=(1.0, 0.5))
  images = np.random.default_rng(2).normal(0, 1, (1, height, width, 3)).astype(np.float32)
  whole, tiled = _compare(model, images, 257, tiling.exact_overlap(cfg.backbone))
  assert tiled.fused.shape == whole.fused.shape == (1, resize.output_size(height), resize.output_size(width), 5)
  np.testing.assert_allclose(tiled.fused, whole.fused, rtol=1e-4, atol=1e-5)


def test_flip_averages_the_tiled_mirror_like_the_whole_one():
  config = shapes.get_config("smoke")
  exp = build_experiment(config)
  images = np.random.default_rng(3).normal(0, 40, (1, 90, 250, 3)).astype(np.float32)
  params = ref.random_variables(exp.eval_model, images, train=False)["params"]
  forward = tiling.TiledForward(exp.eval_model, 129, tiling.exact_overlap(config.model.backbone))
  whole = inference.predict_scores(params, images, exp=exp, flip=True)
  tiled = inference.predict_scores(params, images, exp=exp, flip=True, forward=forward)
  plain = inference.predict_scores(params, images, exp=exp, flip=False)
  np.testing.assert_allclose(tiled.fused, whole.fused, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(whole.fused) - np.asarray(plain.fused)).max() > 1e-3  # the flip does something


def test_memory_budget_picks_the_largest_fitting_tile_by_bisection():
  """With a stand-in measure (bytes = tile^2), the choice is the largest candidate under the budget."""
  measure = lambda model, params, batch, tile, overlap, size: tile * tile
  best, measured = tiling.largest_fitting_tile(None, None, 1, 300 ** 2, 2048, 128, measure=measure)
  assert best == 257 and all(t in tiling.TILE_SIZES for t in measured)
  assert len(measured) <= 5  # bisection, not a scan of all 15 candidates
  assert tiling.largest_fitting_tile(None, None, 1, 10, 2048, 128, measure=measure)[0] is None
  assert tiling.largest_fitting_tile(None, None, 1, 300 ** 2, 2048, 128, limit=257, measure=measure)[0] == 193


def test_memory_budget_with_compiled_steps():
  """Real compiled programs of the smoke model: the tile step's bytes grow with the tile and not with the image, and
  no program grows once the image spans a few windows (the maps between them are host memory, which does); a
  budget between two candidates' needs picks the smaller; a tile_size over the budget is a ConfigError naming what
  fits."""
  model, _ = _model()
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 33, 33, 3), np.float32),
                                             train=False))["params"]
  forwards = {t: tiling.TiledForward(model, t, 32) for t in (129, 257)}
  steps = {(t, n): forwards[t].program_bytes(params, 1, n, n) for t, n in ((129, 257), (257, 257), (129, 513),
                                                                          (129, 1025))}
  assert set(steps[129, 257]) == {"tile_step", "fuse_window", "upsample_window"}
  assert steps[257, 257]["tile_step"] > 1.2 * steps[129, 257]["tile_step"]
  assert steps[129, 513]["tile_step"] == steps[129, 257]["tile_step"]
  assert steps[129, 1025] == steps[129, 513]
  host = [forwards[129].host_bytes(params, 1, n, n) for n in (513, 1025)]
  assert 3.5 < host[1] / host[0] < 4.5
  small, large = (tiling.tiled_bytes(model, params, 1, t, 32, 257) for t in (129, 257))
  assert large > small > 0
  cfg = shapes.get_config("smoke").eval
  cfg.tile_overlap, cfg.memory_budget_gb = 32, (small + large) / 2 / 2 ** 30
  choice = tiling.choose(model, params, cfg, batch=1, longest=257, whole_bytes=lambda: 10 * large)
  assert choice.tile in (129, 193) and choice.measured["whole"] == 10 * large
  assert choice.measured[f"tile_{choice.tile}"] <= cfg.memory_budget_gb * 2 ** 30  # what it returns was measured
  assert tiling.choose(model, params, cfg, batch=1, longest=257, whole_bytes=lambda: small).tile == 0  # fits whole
  cfg.tile_size = 257
  with pytest.raises(config_validation.ConfigError, match=r"config.eval.tile_size=257: its step needs .* GB on a "
                                                          r"device, more than config.eval.memory_budget_gb=.*; tiles "
                                                          r"up to (129|193) fit"):
    tiling.choose(model, params, cfg, batch=1, longest=257, whole_bytes=lambda: 0)
