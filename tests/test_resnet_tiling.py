"""Tiled inference is exact for DeepLab v2: a reduced-depth ResNet + ASPP from configs/deeplab_v2.py, whose
receptive field (written out layer by layer below) fits small images, tiled with `tiling.exact_overlap` against
whole-image inference; and a short overlap does change cells, so the comparison can fail."""
import jax
import numpy as np
import pytest

from configs import deeplab_v2
from scaleattn.inference import tiling
from scaleattn.models import build_model

# One bottleneck per stage, 4-channel stem, ASPP dilations 1 and 2, output stride 8, stride in the 3x3 (torchvision's
# layout, set below). Radius in input pixels, each layer's half-span times its dilation times the stride before it:
# conv1 7x7 (3 x 1) + pool 3x3 (1 x 2); res2's 3x3 (1 x 4); res3's strided 3x3 (1 x 4); res4's 3x3 (2 x 8); res5's
# 3x3 (4 x 8); ASPP's widest branch (2 x 8). The 1x1 convolutions add nothing.
RADIUS = 3 + 2 + 4 + 4 + 16 + 32 + 16
TILE = 193


def _model(fusion: str):
  cfg = deeplab_v2.get_config().model
  cfg.backbone.block_depths, cfg.backbone.width, cfg.backbone.aspp_dilations = (1, 1, 1, 1), 4, (1, 2)
  cfg.backbone.stride_in_3x3 = True
  cfg.num_classes, cfg.fusion.name = 5, fusion
  return build_model(cfg)


def _variables(model, images: np.ndarray) -> dict:
  """Kernels ~ N(0, 1/fan_in); BatchNorm statistics and affines away from the identity (positive variances)."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:, :33, :33], train=False))
  rng = np.random.default_rng(0)
  draw = lambda v, scale, low=None: (rng.uniform(low, 2 * low, v.shape) if low else rng.normal(0, scale, v.shape))
  params = jax.tree.map(lambda v: draw(v, 1 / np.sqrt(np.prod(v.shape[:-1])) if v.ndim > 1 else 0.1),
                        abstract["params"])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, v: draw(v, 0.1, 0.5 if path[-1].key in ("var", "scale") else None), abstract["batch_stats"])
  return jax.tree.map(lambda v: np.asarray(v, np.float32), {"params": params, "batch_stats": stats})


@pytest.fixture(scope="module")
def images() -> np.ndarray:
  return np.random.default_rng(1).normal(0, 50, (2, 150, 301, 3)).astype(np.float32)


@pytest.mark.parametrize("fusion", ["max", "attention"])
def test_tiled_equals_whole_with_the_exact_overlap(fusion, images):
  model = _model(fusion)
  assert model.backbone.receptive_radius() == RADIUS
  overlap = tiling.exact_overlap(model)
  assert overlap == -(-2 * RADIUS // 8) * 8 == 160
  assert len(tiling.plan_axis(301, TILE, overlap, 8, model.backbone.output_size).starts) > 2  # several tiles a row
  variables = _variables(model, images)
  whole = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  tiled = tiling.TiledForward(model, TILE, overlap)(variables, images)
  size = model.backbone.output_size
  assert tiled.fused.shape == whole.fused.shape == (2, size(150), size(301), 5) == (2, 19, 38, 5)
  for a, b in ((whole.fused, tiled.fused), (whole.per_scale, tiled.per_scale), (whole.weights, tiled.weights)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(whole.fused)).max() > 0.1  # not a vanishing signal


def test_a_short_overlap_changes_cells_near_tile_edges(images):
  model = _model("max")
  variables = _variables(model, images)
  whole = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  tiled = tiling.TiledForward(model, TILE, 32)(variables, images)
  assert np.abs(np.asarray(tiled.fused) - np.asarray(whole.fused)).max() > 1e-3
