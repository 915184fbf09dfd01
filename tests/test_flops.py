"""Model FLOPs: the layers read off the model against a table written out by hand from the architecture."""
from collections import Counter

import flax.linen as nn
import numpy_reference as ref
import pytest

from configs import shapes, voc
from scaleattn.models import fusion
from scaleattn.perf import flops

# configs/shapes.py:smoke on a 65x65 image, scales (1, 0.5): one 3x3 conv per block (widths 4, 8, 8, 8, 8; pools
# of stride 2, 2, 2, 1, 1), fc6 3x3 to 16, fc7 and fc8 1x1 (16, 5 classes). Scale 1: 65 -> 33 -> 17 -> 9; scale
# 0.5: floor(64 * 0.5) + 1 = 33 -> 17 -> 9 -> 5. Attention head on the 9x9 grid: 3x3 over 2 x 16 channels to 8,
# then 1x1 to one logit per scale. (height, width, cin, cout, kernel, dilation): count.
SMOKE_LAYERS = {
    (65, 65, 3, 4, 3, 1): 1, (33, 33, 4, 8, 3, 1): 1, (17, 17, 8, 8, 3, 1): 1, (9, 9, 8, 16, 3, 1): 1,
    (9, 9, 16, 16, 1, 1): 1, (9, 9, 16, 5, 1, 1): 1,
    (9, 9, 8, 8, 3, 1): 3,  # scale 1's conv4 and conv5, scale 0.5's conv3
    (33, 33, 3, 4, 3, 1): 1, (17, 17, 4, 8, 3, 1): 1, (5, 5, 8, 8, 3, 1): 2, (5, 5, 8, 16, 3, 1): 1,
    (5, 5, 16, 16, 1, 1): 1, (5, 5, 16, 5, 1, 1): 1,
    (9, 9, 32, 8, 3, 1): 1, (9, 9, 8, 2, 1, 1): 1}


def _hand_forward_flops(layers: dict) -> int:
  return sum(n * 2 * h * w * k * k * cin * cout for (h, w, cin, cout, k, _), n in layers.items())


def test_multiscale_layers_and_step_flops_match_the_hand_count():
  cfg = shapes.get_config("smoke").model
  found = {tuple(layer): n for layer, n in flops.conv_layers(cfg, 65, 65).items()}
  assert found == SMOKE_LAYERS
  forward = _hand_forward_flops(SMOKE_LAYERS)
  assert flops.step_flops(cfg, 4, 65, 65, train=True) == 3 * 4 * forward
  assert flops.step_flops(cfg, 2, 65, 65, train=False) == 2 * forward


@pytest.mark.parametrize("change", [dict(scale_execution="vmap"), dict(dtype="bfloat16"), dict(remat="per_block")])
def test_model_flops_do_not_depend_on_how_the_step_runs(change):
  """vmap pads every scale to full size and bf16 changes the arithmetic, but the network, and its hand count, are
  the same."""
  cfg = shapes.get_config("smoke").model
  cfg.update(change)
  assert {tuple(layer): n for layer, n in flops.conv_layers(cfg, 65, 65).items()} == SMOKE_LAYERS
  assert flops.step_flops(cfg, 1, 65, 65, train=True) == 3 * _hand_forward_flops(SMOKE_LAYERS)


@pytest.mark.parametrize("fusion", ["average", "max"])
def test_pooling_fusions_have_no_attention_head(fusion):
  cfg = shapes.get_config("smoke").model
  cfg.fusion.name = fusion
  head = {(9, 9, 32, 8, 3, 1), (9, 9, 8, 2, 1, 1)}
  expected = {layer: n for layer, n in SMOKE_LAYERS.items() if layer not in head}
  assert {tuple(layer): n for layer, n in flops.conv_layers(cfg, 65, 65).items()} == expected


@pytest.mark.parametrize("fusion, head", [
    ("shared_attention", {(9, 9, 16, 8, 3, 1): 2, (9, 9, 8, 1, 1, 1): 2}),  # one head per scale on the grid
    ("hierarchical", {(5, 5, 16, 8, 3, 1): 1, (5, 5, 8, 1, 1, 1): 1}),  # on scale 0.5's own grid only
])
def test_shared_heads_are_counted_where_they_run(fusion, head):
  cfg = shapes.get_config("smoke").model
  cfg.fusion.name = fusion
  expected = {layer: n for layer, n in SMOKE_LAYERS.items() if layer not in {(9, 9, 32, 8, 3, 1), (9, 9, 8, 2, 1, 1)}}
  for layer, n in head.items():
    expected[layer] = expected.get(layer, 0) + n
  assert {tuple(layer): n for layer, n in flops.conv_layers(cfg, 65, 65).items()} == expected


class _Probe(fusion.AverageFusion):
  """A fusion declaring a made-up head: 5x5 from the features to 3 channels on the grid, once per scale."""

  @nn.nowrap
  def head_layers(self, scores_shape, map_shapes, scales):
    _, h, w, s, _ = scores_shape
    return Counter({fusion.Layer(h, w, map_shapes[0][3], 3, 5, 1): s})


def test_a_registered_fusion_is_counted_by_what_its_class_declares(monkeypatch):
  monkeypatch.setitem(fusion.FUSIONS, "probe", _Probe)
  cfg = shapes.get_config("smoke").model
  cfg.fusion.name = "probe"
  expected = {layer: n for layer, n in SMOKE_LAYERS.items() if layer not in {(9, 9, 32, 8, 3, 1), (9, 9, 8, 2, 1, 1)}}
  expected[(9, 9, 16, 3, 5, 1)] = 2
  assert {tuple(layer): n for layer, n in flops.conv_layers(cfg, 65, 65).items()} == expected


def test_paper_model_counts_vgg16_largefov_at_every_scale_and_the_attention_head():
  """Scales (1, 0.75, 0.5) on 321: the network at 321, 241 and 161, and the 3x3 head over 3 x 1024 fc7 channels
  to 512 on the 41x41 grid, then 1x1 to 3."""
  cfg = voc.get_config().model
  cfg.scales = (1.0,)
  single = _hand_forward_flops(ref.vgg16_largefov_layers(321))
  assert flops.step_flops(cfg, 1, 321, 321, train=False) == single
  cfg.scales = (1.0, 0.75, 0.5)
  head = 2 * 41 * 41 * (9 * 3072 * 512 + 512 * 3)
  expected = single + _hand_forward_flops(ref.vgg16_largefov_layers(241)) + _hand_forward_flops(ref.vgg16_largefov_layers(161)) + head
  assert flops.step_flops(cfg, 1, 321, 321, train=False) == expected
