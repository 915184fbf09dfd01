"""Tiled inference against whole-image inference, on the smoke model (its receptive-field radius is 54 pixels)."""
import logging

import jax
import numpy as np
import numpy_reference as ref
import pytest

from configs import shapes, voc
from scaleattn import inference
from scaleattn.config import validation
from scaleattn.experiment import build_experiment
from scaleattn.inference import predict, tiling
from scaleattn.models import build_model, resize
from scaleattn.models.largefov import receptive_radius


def _model(fusion="attention", scales=(1.0, 0.75, 0.5)):
  cfg = shapes.get_config("smoke").model
  cfg.fusion.name, cfg.scales = fusion, scales
  return build_model(cfg), cfg


@pytest.mark.parametrize("length", [1, 7, 8, 64, 65, 66, 100, 1023, 2047])
@pytest.mark.parametrize("tile, overlap", [(65, 0), (65, 32), (129, 112), (257, 64)])
def test_plan_covers_every_cell_once_with_aligned_tiles(length, tile, overlap):
  plan = tiling.plan_axis(length, tile, overlap, 8, resize.output_size)
  weights = np.zeros((len(plan.starts), resize.output_size(length)))  # 1 where a tile provides the cell
  for k, (lo, hi) in enumerate(plan.owned):
    weights[k, lo:hi] = 1.0
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
  cfg = voc.get_config().model
  radius = 2 + 1 + 4 + 2 + 12 + 4 + 24 + 8 + 48 + 8 + 96
  bb = cfg.backbone
  assert receptive_radius(bb.block_depths, bb.conv5_dilation, bb.fc6_dilation, bb.fc6_kernel, bb.stride1_pools) == radius
  model = build_model(cfg)
  assert model.backbone.receptive_radius() == radius and model.backbone.output_stride == 8
  assert tiling.exact_overlap(model) == 424


def _compare(model, images, tile, overlap, seed=0, tiles_per_step=1):
  variables = ref.random_variables(model, images[:, :33, :33], train=False, seed=seed)
  whole = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  tiled = tiling.TiledForward(model, tile, overlap, tiles_per_step=tiles_per_step)(variables["params"], images)
  return whole, tiled


@pytest.mark.parametrize("fusion, scales", [("attention", (1.0, 0.75, 0.5)), ("hierarchical", (1.0, 0.75, 0.5)),
                                            ("shared_attention", (1.5, 1.0, 0.5)), ("average", (1.0, 0.75, 0.5)),
                                            ("max", (1.0, 0.75, 0.5))])
def test_tiled_equals_whole_when_the_overlap_covers_the_receptive_field(fusion, scales):
  """Several tiles per scale and several fusion windows (17 x 17 cells for 129-pixel tiles) per image; 4 tiles per
  backbone call, the last group padded with dummy tiles."""
  model, cfg = _model(fusion, scales)
  images = np.random.default_rng(0).normal(0, 1, (2, 150, 203, 3)).astype(np.float32)
  overlap = tiling.exact_overlap(build_model(cfg))
  assert overlap == 112  # twice the radius, 54
  assert tiling.tile_count(model, 129, overlap, 150, 203) % 4 != 0
  whole, tiled = _compare(model, images, 129, overlap, tiles_per_step=4)
  assert len(tiling.plan_axis(203, 129, overlap, 8, resize.output_size).starts) > 2  # several tiles per row
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
  assert tiling.exact_overlap(build_model(cfg)) == -(-2 * radius // 8) * 8

  def exact_cells(length):
    plan = tiling.plan_axis(length, 65, 16, 8, resize.output_size)
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


@pytest.mark.parametrize("height, width, tiles", [(150, 203, 24 + 6), (97, 301, 18 + 4), (64, 90, 2 + 1),
                                                  (20, 400, 12 + 6)])
def test_batched_tiles_give_what_one_tile_per_step_gives(height, width, tiles):
  """2, 3 and 5 tiles per backbone call against one, on tile counts (by hand, scale 1 + scale 0.5: 65-pixel tiles
  stepping by 32, the last one at the first multiple of 8 that reaches the edge) that are and are not multiples of
  them, so that last groups are padded with dummy tiles."""
  model, _ = _model("attention", scales=(1.0, 0.5))
  images = np.random.default_rng(6).normal(0, 1, (1, height, width, 3)).astype(np.float32)
  params = ref.random_variables(model, images[:, :33, :33], train=False)["params"]
  assert tiling.tile_count(model, 65, 32, height, width) == tiles
  single = tiling.TiledForward(model, 65, 32)(params, images)
  for per_step in (2, 3, 5):
    batched = tiling.TiledForward(model, 65, 32, tiles_per_step=per_step)(params, images)
    for a, b in ((single.fused, batched.fused), (single.weights, batched.weights), (single.per_scale,
                                                                                    batched.per_scale)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_windows_have_one_shape_whatever_the_image_size():
  """Every tile, fusion and upsampling window reads spans fixed by the tile and the scales alone, from images
  smaller than a tile to images of many tiles, with scales below and above 1."""
  model, _ = _model("shared_attention", scales=(1.5, 1.0, 0.75, 0.5))
  forward = tiling.TiledForward(model, 65, 32)
  spans = set()
  for n in [*range(1, 200), 255, 256, 257, 511, 1000, 2047]:
    plans, fusion, upsample = forward.scale_plans(n, n), forward.fusion_windows(n, n), forward.upsample_windows(n, n)
    spans.add((tuple(w.span for *_, rows, cols in plans for w in (rows, cols)),
               tuple(w.span for pair in fusion for w in pair), tuple(w.span for w in upsample)))
  assert len(spans) == 1


def test_predicting_many_sizes_compiles_as_many_programs_as_two_sizes():
  """Images of 20 sizes, all larger than eval_size (so tiled at eval_size): the first 2 sizes compile the three
  steps and the 18 others nothing more, counted from JAX's own compile log; the forward's count says so."""
  config = shapes.get_config("smoke")
  exp = build_experiment(config)
  params = ref.random_variables(exp.eval_model, np.zeros((1, 33, 33, 3), np.float32), train=False)["params"]
  sizes = np.random.default_rng(7).integers(config.input.eval_size + 1, 200, (20, 2))
  assert len({tuple(s) for s in sizes}) == 20
  predictor, records = predict.Predictor(exp, params), []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record.getMessage())
  logger = logging.getLogger("jax")
  logger.addHandler(handler)

  def compiles(sizes):
    start = len(records)
    for h, w in sizes:
      labels, _ = predictor.image(np.zeros((h, w, 3), np.uint8))
      assert labels.shape == (h, w)
    return sum("Finished XLA compilation" in r for r in records[start:])

  try:
    with jax.log_compiles(True):
      assert (compiles(sizes[:2]), compiles(sizes[2:])) == (3, 0)
  finally:
    logger.removeHandler(handler)
  assert predictor.plan.tiled.programs == 3 and predictor.plan.tiled.compile_s > 0


@pytest.mark.parametrize("height, width", [(1, 300), (300, 1), (20, 30), (1023, 2047)])
def test_odd_sizes_strips_and_images_smaller_than_a_tile(height, width):
  model, cfg = _model("average", scales=(1.0, 0.5))
  images = np.random.default_rng(2).normal(0, 1, (1, height, width, 3)).astype(np.float32)
  whole, tiled = _compare(model, images, 257, tiling.exact_overlap(build_model(cfg)))
  assert tiled.fused.shape == whole.fused.shape == (1, resize.output_size(height), resize.output_size(width), 5)
  np.testing.assert_allclose(tiled.fused, whole.fused, rtol=1e-4, atol=1e-5)


def test_flip_averages_the_tiled_mirror_like_the_whole_one():
  config = shapes.get_config("smoke")
  exp = build_experiment(config)
  images = np.random.default_rng(3).normal(0, 40, (1, 90, 250, 3)).astype(np.float32)
  params = ref.random_variables(exp.eval_model, images, train=False)["params"]
  forward = tiling.TiledForward(exp.eval_model, 129, tiling.exact_overlap(exp.eval_model))
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


def test_memory_budget_picks_the_most_tiles_per_step_that_fit():
  """With a stand-in measure (bytes = tiles per step x tile^2): doubling while it fits, never past the tiles the
  image needs."""
  measure = lambda model, params, batch, tile, overlap, size, per_step: per_step * tile * tile
  most = lambda budget, limit: tiling.most_tiles_per_step(None, None, 1, budget, 2048, 100, 32, limit, measure)
  assert most(5 * 100 ** 2, 64) == (4, {2: 2 * 100 ** 2, 4: 4 * 100 ** 2, 8: 8 * 100 ** 2})
  assert most(5 * 100 ** 2, 3) == (2, {2: 2 * 100 ** 2})
  assert most(5 * 100 ** 2, 1) == (1, {})
  assert most(1.5 * 100 ** 2, 64) == (1, {2: 2 * 100 ** 2})


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
  per_step = {int(k.rsplit("_x", 1)[1]): n for k, n in choice.measured.items() if "_x" in k}
  assert per_step  # 257-pixel images need several tiles: more per step were tried ...
  budget = cfg.memory_budget_gb * 2 ** 30
  assert all((n <= budget) == (count <= choice.per_step) for count, n in per_step.items())  # ... those that fit kept
  assert max(per_step) == 2 * choice.per_step or 2 * choice.per_step > tiling.tile_count(model, choice.tile, 32, 257,
                                                                                         257)
  assert tiling.choose(model, params, cfg, batch=1, longest=257, whole_bytes=lambda: small).tile == 0  # fits whole
  cfg.tile_size = 257
  with pytest.raises(validation.ConfigError, match=r"config.eval.tile_size=257: its step needs .* GB on a "
                                                          r"device, more than config.eval.memory_budget_gb=.*; tiles "
                                                          r"up to (129|193) fit"):
    tiling.choose(model, params, cfg, batch=1, longest=257, whole_bytes=lambda: 0)


@pytest.mark.parametrize("tile, given, cap, want", [
    (129, None, None, 112),  # the smoke model's exact overlap, 2 x 54 rounded up to the stride, fits the tile
    (81, None, None, 80),  # it does not: the largest multiple of the stride below the tile
    (113, None, None, 112),
    (112, None, None, 104),
    (257, None, 128, 112),  # a cap (half a chosen tile) above the exact overlap keeps it exact
    (161, None, 80, 80),
    (81, 24, None, 24),  # a given overlap is kept, at most the cap
    (81, 64, 40, 40),
])
def test_an_unset_overlap_adapts_to_the_tile(tile, given, cap, want):
  model, _ = _model()
  assert tiling.resolve_overlap(model, tile, given, cap) == want


def test_a_tile_size_alone_is_a_valid_config_and_a_bad_overlap_is_not():
  config = shapes.get_config("smoke")
  config.eval.tile_size = 81
  validation.validate(config, num_data_devices=1)
  config.eval.tile_overlap = 81
  with pytest.raises(validation.ConfigError, match=r"tile_overlap=81: expected 0 <= overlap < .*tile_size=81"):
    validation.validate(config, num_data_devices=1)
  config.eval.tile_overlap, config.eval.tiles_per_step = None, 0
  with pytest.raises(validation.ConfigError, match=r"config.eval.tiles_per_step=0: expected a positive integer"):
    validation.validate(config, num_data_devices=1)
