"""The share-net over scales: geometry against NumPy, the two scale-execution paths, rematerialisation, gradients,
and the model built by composition from the config's registry entries."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from scaleattn.config import defaults as base
from scaleattn.models import MultiScaleNet, build_model, registry
from scaleattn.models.resize import resize_bilinear

BACKBONE = dict(block_widths=(4, 8, 8, 8, 8), block_depths=(1, 1, 2, 1, 1), fc_width=16, fc6_dilation=2)


def tiny_config(scales=(1.0, 0.75, 0.5), fusion="attention", **model):
  cfg = base.get_config().model.copy_and_resolve_references()
  cfg.num_classes, cfg.scales, cfg.fusion.name, cfg.fusion.hidden = 5, scales, fusion, 8
  cfg.backbone.update(BACKBONE)
  cfg.update(model)
  return cfg


def net(**kw) -> MultiScaleNet:
  return build_model(tiny_config(**kw))


def _apply(model):
  return jax.jit(model.apply, static_argnames="train")


def test_bilinear_align_corners_matches_numpy():
  x = np.random.default_rng(1).normal(size=(2, 5, 4, 3)).astype(np.float32)
  for size in [(9, 7), (3, 2), (5, 4), (1, 6)]:
    np.testing.assert_allclose(resize_bilinear(jnp.asarray(x), size), ref.bilinear(x, size), rtol=1e-5, atol=1e-6)


def test_share_net_runs_one_backbone_on_every_resized_image():
  """Each scale's scores are the backbone's on the align-corners-resized image, brought to the scale-1 grid."""
  x = np.random.default_rng(0).normal(size=(1, 41, 33, 3)).astype(np.float32)
  model = net(fusion="average")
  variables = ref.random_variables(model, x, train=False)
  out = _apply(model)(variables, x, train=False)
  assert set(variables["params"]) == {"backbone"}
  backbone = _apply(registry.build_backbone(tiny_config()))  # the model's own backbone, alone
  bb_vars = {"params": variables["params"]["backbone"]}
  grid = (6, 5)  # 41 -> 21 -> 11 -> 6, 33 -> 17 -> 9 -> 5
  for i, size in enumerate([(41, 33), (31, 25), (21, 17)]):  # floor(40 s) + 1, floor(32 s) + 1
    scores, _ = backbone(bb_vars, ref.bilinear(x, size).astype(np.float32), train=False)
    np.testing.assert_allclose(out.own_grid[i], scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.per_scale[:, :, :, i], ref.bilinear(np.asarray(scores, np.float64), grid),
                               rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.fused, np.asarray(out.per_scale).mean(3), rtol=1e-5, atol=1e-6)
  assert out.scales == (1.0, 0.75, 0.5)


def test_sizes_at_321():
  model = net()
  images = jax.ShapeDtypeStruct((2, 321, 321, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert [n.shape for n in out.own_grid] == [(2, 41, 41, 5), (2, 31, 31, 5), (2, 21, 21, 5)]
  assert out.fused.shape == (2, 41, 41, 5) and out.per_scale.shape == (2, 41, 41, 3, 5)
  assert out.weights.shape == (2, 41, 41, 3)


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.75, 0.5)])
def test_vmap_path_equals_loop_path(scales):
  x = np.random.default_rng(1).normal(size=(2, 65, 57, 3)).astype(np.float32)
  loop = net(scales=scales, scale_execution="loop")
  vmap = net(scales=scales, scale_execution="vmap")
  variables = ref.random_variables(loop, x, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(jax.eval_shape(
      lambda: vmap.init(jax.random.key(0), x, train=False)))
  a, b = _apply(loop)(variables, x, train=False), _apply(vmap)(variables, x, train=False)
  assert [n.shape[1:3] for n in a.own_grid] == [(9, 8), (7, 7), (5, 5)][:len(scales)]
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert u.shape == v.shape
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
  assert np.asarray(a.weights).std() > 0.01 or len(scales) == 1  # attention is not trivially uniform


def test_one_set_of_parameters_serves_all_scales():
  x = jnp.zeros((1, 33, 33, 3))
  shapes = lambda scales, fusion: jax.tree.map(jnp.shape, jax.eval_shape(
      lambda: net(scales=scales, fusion=fusion).init(jax.random.key(0), x, train=False)))
  assert shapes((1.0,), "average") == shapes((1.0, 0.75, 0.5), "max") == {"params": {"backbone": shapes(
      (1.0,), "average")["params"]["backbone"]}}
  attention = shapes((1.0, 0.5), "attention")["params"]
  assert attention["backbone"] == shapes((1.0,), "average")["params"]["backbone"]
  assert attention["fusion"]["hidden"]["kernel"] == (3, 3, 2 * 16, 8)  # concat of 2 fc7 maps


@pytest.mark.parametrize("fusion", ["shared_attention", "hierarchical"])
def test_parameters_trained_on_two_scales_run_on_another_set(fusion):
  """Inference scales in any order and above 1: the grid is scale 1's, each scale's scores are the backbone's on its
  own resized image (the same as in the training model for the scales both share)."""
  x = np.random.default_rng(4).normal(size=(1, 33, 41, 3)).astype(np.float32)
  trained = net(scales=(1.0, 0.5), fusion=fusion)
  variables = ref.random_variables(trained, x, train=False)
  other = net(scales=(2.0, 1.0, 0.75, 0.5), fusion=fusion)
  a = _apply(trained)(variables, x, train=False)
  b = _apply(other)(variables, x, train=False)
  assert [g.shape[1:3] for g in b.own_grid] == [(9, 11), (5, 6), (4, 5), (3, 4)]  # 65x81, 33x41, 25x31, 17x21
  assert b.fused.shape[1:3] == (5, 6) and b.weights.shape == (1, 5, 6, 4) and b.scales == (2.0, 1.0, 0.75, 0.5)
  np.testing.assert_allclose(b.per_scale[:, :, :, 1], a.per_scale[:, :, :, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(b.per_scale[:, :, :, 3], a.per_scale[:, :, :, 1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(b.weights).sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(b.fused, np.einsum("bhws,bhwsc->bhwc", b.weights, b.per_scale), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fusion, scale_execution", [("attention", "loop"), ("max", "vmap")])
def test_gradients_reach_every_layer(fusion, scale_execution):
  x = np.random.default_rng(2).normal(size=(1, 33, 33, 3)).astype(np.float32)
  model = net(scales=(1.0, 0.5), fusion=fusion, scale_execution=scale_execution)
  params = ref.random_variables(model, x, train=False)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=True, rngs={"dropout": ref.dropout_key(3)}).fused ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert set(grads) == ({"backbone", "fusion"} if fusion == "attention" else {"backbone"})
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, jax.tree_util.keystr(path)


def test_bfloat16_compute_keeps_float32_parameters():
  cfg = tiny_config(scales=(1.0, 0.5))
  x = np.random.default_rng(4).normal(size=(1, 33, 33, 3)).astype(np.float32)
  model = build_model(cfg)
  variables = ref.random_variables(model, x, train=False)
  cfg.dtype = "bfloat16"
  bf16 = build_model(cfg)
  abstract = jax.eval_shape(lambda: bf16.init(jax.random.key(0), x, train=False))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(abstract))
  out32, out16 = _apply(model)(variables, x, train=False), _apply(bf16)(variables, x, train=False)
  assert out16.fused.dtype == jnp.bfloat16 and out16.weights.shape == (1, 5, 5, 2)
  scale = np.abs(np.asarray(out32.fused)).max()
  np.testing.assert_allclose(np.asarray(out16.fused, np.float32), out32.fused, atol=0.05 * scale)


@pytest.mark.parametrize("remat, scale_execution", [("per_scale", "loop"), ("per_block", "vmap")])
def test_rematerialisation_gives_the_same_gradients(remat, scale_execution):
  x = np.random.default_rng(5).normal(size=(2, 33, 33, 3)).astype(np.float32)
  plain = net(scales=(1.0, 0.5), scale_execution=scale_execution)
  rematted = net(scales=(1.0, 0.5), scale_execution=scale_execution, remat=remat)
  params = ref.random_variables(plain, x, train=False)["params"]

  def grads(model):
    loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=True, rngs={"dropout": ref.dropout_key(1)}).fused ** 2)
    return jax.jit(jax.grad(loss))(params)

  for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(rematted)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  primitives = lambda model: {e.primitive.name for e in jax.make_jaxpr(
      lambda p: model.apply({"params": p}, x, train=False).fused)(params).jaxpr.eqns}
  assert "remat2" in primitives(rematted) and "remat2" not in primitives(plain)  # the remat is really there


class _MeanColour(nn.Module):
  """A backbone in one line: the mean colour of each 8x8 cell, as scores and as features."""
  num_classes: int
  dtype: object = jnp.float32
  conv_impl: str = "xla"
  gain: float = 1.0

  @nn.compact
  def __call__(self, images, *, train, valid_size=None):
    del train, valid_size
    b, h, w, _ = images.shape
    cells = jax.image.resize(images, (b, -(-h // 8), -(-w // 8), 3), "linear") * self.gain
    return nn.Dense(self.num_classes, name="head")(cells), cells


def test_a_backbone_plugs_in_through_the_registry(monkeypatch):
  monkeypatch.setitem(registry.BACKBONES, "mean_colour", _MeanColour)
  cfg = tiny_config(scales=(1.0, 0.5), fusion="average")
  cfg.backbone = {"name": "mean_colour", "gain": 2.0}
  model = build_model(cfg)
  assert isinstance(model.backbone, _MeanColour) and model.backbone.gain == 2.0
  assert isinstance(model.fusion, registry.FUSIONS["average"]) and model.fusion.method == "average"
  x = jnp.ones((1, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert set(variables["params"]) == {"backbone"}
  out = model.apply(variables, x, train=False)
  np.testing.assert_allclose(out.fused, out.per_scale.mean(3), rtol=1e-6)
  assert registry.options(_MeanColour) == ("gain",)


def test_bad_settings_are_reported():
  x = jnp.zeros((1, 17, 17, 3))
  model = net(scales=(1.0, 0.5), fusion="average")
  init = lambda **kw: jax.eval_shape(lambda: model.clone(**kw).init(jax.random.key(0), x, train=False))
  with pytest.raises(ValueError, match="1.0 among them"):
    init(scales=(0.5, 0.75))
  with pytest.raises(ValueError, match="scale_execution='pmap'"):
    init(scales=(1.0, 0.5), scale_execution="pmap")
  with pytest.raises(ValueError, match="every scale <= 1"):
    init(scales=(1.0, 1.5), scale_execution="vmap")
  with pytest.raises(ValueError, match="remat='all'"):
    init(scales=(1.0, 0.5), remat="all")


def test_the_attention_head_reads_every_scales_scores_when_asked():
  """fusion_input='scores' (the paper's fc8 ablation): the head is the NumPy head on the scales' scores, each resized
  to the scale-1 grid and concatenated, and its first layer takes S x C channels."""
  x = np.random.default_rng(3).normal(size=(1, 41, 33, 3)).astype(np.float32)
  cfg = tiny_config(scales=(1.0, 0.5))
  cfg.fusion_input = "scores"
  model = build_model(cfg)
  variables = ref.random_variables(model, x, train=False)
  out = _apply(model)(variables, x, train=False)
  head = variables["params"]["fusion"]
  assert head["hidden"]["kernel"].shape == (3, 3, 2 * 5, 8)
  maps = np.concatenate([ref.bilinear(np.asarray(s, np.float64), (6, 5)) for s in out.own_grid], axis=-1)
  hidden = np.maximum(ref.conv(maps, np.asarray(head["hidden"]["kernel"], np.float64), head["hidden"]["bias"]), 0)
  logits = ref.conv(hidden, np.asarray(head["logits"]["kernel"], np.float64), head["logits"]["bias"])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(out.weights, weights / weights.sum(-1, keepdims=True), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.fused, np.einsum("bhws,bhwsc->bhwc", out.weights, out.per_scale), rtol=1e-5,
                             atol=1e-5)
