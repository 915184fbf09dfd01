"""ScaleFusion against a NumPy transcription of the paper's equations."""
import os
import re
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from scaleattn import ScaleFusion
from scaleattn.models import fusion

PAPER = dict(hidden=512, dropout_rate=0.5)  # the paper's head: 512 hidden channels, dropout 0.5


def _np_fusion(method, params, scores, feats):
  """The paper's fusion per pixel i and class c: g_ic = sum_s w_i^s f_ic^s, or max_s f_ic^s."""
  b, h, w, s, c = scores.shape
  if method == "average":
    weights = np.full((b, h, w, s), 1.0 / s)
    return (weights[..., None] * scores).sum(3), weights
  if method == "max":
    fused = scores.max(axis=3)
    weights = np.zeros((b, h, w, s))
    for idx in np.ndindex(b, h, w):
      winner = fused[idx].argmax()
      weights[idx + (scores[idx][:, winner].argmax(),)] = 1.0
    return fused, weights
  x = np.concatenate([feats[:, :, :, k] for k in range(s)], axis=-1)  # concat_s fc7^s
  hidden = np.maximum(ref.conv(x, params["hidden"]["kernel"], params["hidden"]["bias"]), 0)
  logits = ref.conv(hidden, params["logits"]["kernel"], params["logits"]["bias"])
  e = np.exp(logits - logits.max(-1, keepdims=True))
  weights = e / e.sum(-1, keepdims=True)
  return (weights[..., None] * scores).sum(3), weights


def _np_head(params, feats):
  """The shared heads' logit for one scale: 3x3 conv + ReLU, then a 1x1 conv to one channel; [B, h, w, 1]."""
  hidden = np.maximum(ref.conv(feats, params["hidden"]["kernel"], params["hidden"]["bias"]), 0)
  return ref.conv(hidden, params["logits"]["kernel"], params["logits"]["bias"])


def _np_shared_attention(params, scores, feats):
  """w_i^s = softmax over s of head(fc7^s)_i with one head for all scales."""
  logits = np.concatenate([_np_head(params, feats[:, :, :, k]) for k in range(scores.shape[3])], axis=-1)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  weights = e / e.sum(-1, keepdims=True)
  return (weights[..., None] * scores).sum(3), weights


def _np_hierarchical(params, scores, native, scales):
  """Tao et al.: from the highest scale down, fused = a_l * p_l + (1 - a_l) * fused, a_l = sigmoid(head(fc7_l)) on
  the scale's own grid resized to the common one; the weight of scale l is a_l * prod(1 - a_k) over the scales k
  below it (the highest scale: prod over all others)."""
  grid = scores.shape[1:3]
  order = np.argsort(scales)[::-1]  # highest first
  att = {k: ref.bilinear(1 / (1 + np.exp(-_np_head(params, native[k]))), grid)[..., 0] for k in order[1:]}
  fused = scores[:, :, :, order[0]]
  for k in order[1:]:
    fused = att[k][..., None] * scores[:, :, :, k] + (1 - att[k][..., None]) * fused
  weights = np.ones(scores.shape[:4])
  for pos, k in enumerate(order):
    if pos:
      weights[..., k] *= att[k]
    for lower in order[pos + 1:]:
      weights[..., k] *= 1 - att[lower]
  return fused, weights


def _fusion(method, num_scales, scores, feats, hidden=7, seed=0, **kwargs):
  """The module, variables with unit-scale attention weights (far from uniform softmax), and its jitted apply."""
  module = ScaleFusion(method, num_scales, hidden=hidden, dropout_rate=0.5)
  variables = ref.random_variables(module, scores, feats, train=False, seed=seed, **kwargs)
  return module, variables, jax.jit(module.apply, static_argnames=("train", "scales"))


@pytest.mark.parametrize("num_scales", [1, 2, 3, 4])
def test_shared_attention_matches_numpy(num_scales):
  rng = np.random.default_rng(10 + num_scales)
  scores = rng.normal(size=(2, 5, 6, num_scales, 4)).astype(np.float32)
  feats = rng.normal(size=(2, 5, 6, num_scales, 3)).astype(np.float32)
  _, variables, apply = _fusion("shared_attention", None, scores, feats)
  fused, weights = apply(variables, scores, feats, train=False)
  params = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
  ref_fused, ref_weights = _np_shared_attention(params, scores.astype(np.float64), feats.astype(np.float64))
  np.testing.assert_allclose(fused, ref_fused, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-4, atol=1e-6)
  if num_scales > 1:
    assert np.asarray(weights).std() > 0.05  # a non-trivial softmax
  else:
    np.testing.assert_allclose(fused, scores[:, :, :, 0], atol=1e-6)


@pytest.mark.parametrize("scales", [(1.0, 0.5), (0.5, 1.0, 0.75), (1.0, 0.75, 0.5, 0.25), (1.5, 1.0, 0.5, 2.0)])
def test_hierarchical_matches_numpy(scales):
  """S = 2, 3, 4, scales in any order and above 1, features at their own resolutions."""
  rng = np.random.default_rng(len(scales))
  s, grid = len(scales), 9
  scores = rng.normal(size=(2, grid, grid, s, 4)).astype(np.float32)
  native = [rng.normal(size=(2, max(2, round(grid * x)), max(2, round(grid * x)), 3)).astype(np.float32)
            for x in scales]
  _, variables, apply = _fusion("hierarchical", None, scores, native, scales=scales)
  fused, weights = apply(variables, scores, native, train=False, scales=scales)
  params = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
  ref_fused, ref_weights = _np_hierarchical(params, scores.astype(np.float64),
                                            [f.astype(np.float64) for f in native], scales)
  np.testing.assert_allclose(fused, ref_fused, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-5)
  assert np.asarray(weights).std() > 0.05  # attention far from constant


@pytest.mark.parametrize("method", ["shared_attention", "hierarchical"])
def test_one_set_of_parameters_serves_any_scale_set(method):
  """Parameters made for two scales run on four, and on one (the identity)."""
  rng = np.random.default_rng(7)
  two = rng.normal(size=(1, 6, 6, 2, 3)).astype(np.float32), rng.normal(size=(1, 6, 6, 2, 5)).astype(np.float32)
  _, variables, apply = _fusion(method, None, *two, scales=(1.0, 0.5))
  four = rng.normal(size=(1, 6, 6, 4, 3)).astype(np.float32), rng.normal(size=(1, 6, 6, 4, 5)).astype(np.float32)
  scales = (1.5, 1.0, 0.75, 0.5)
  fused, weights = apply(variables, *four, train=False, scales=scales)
  params = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
  scores64, feats64 = (x.astype(np.float64) for x in four)
  if method == "shared_attention":
    want_fused, want_weights = _np_shared_attention(params, scores64, feats64)
  else:
    want_fused, want_weights = _np_hierarchical(params, scores64, [feats64[:, :, :, k] for k in range(4)], scales)
  np.testing.assert_allclose(fused, want_fused, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(weights, want_weights, rtol=1e-4, atol=1e-6)
  one = four[0][:, :, :, :1], four[1][:, :, :, :1]
  fused, weights = apply(variables, *one, train=False, scales=(1.0,))
  np.testing.assert_allclose(fused, one[0][:, :, :, 0], atol=1e-6)
  np.testing.assert_allclose(weights, 1.0)


@pytest.mark.parametrize("method", ["attention", "average", "max"])
@pytest.mark.parametrize("num_scales", [1, 2, 3, 4])
def test_matches_numpy(method, num_scales):
  rng = np.random.default_rng(num_scales)
  scores = rng.normal(size=(2, 5, 6, num_scales, 4)).astype(np.float32)
  feats = rng.normal(size=(2, 5, 6, num_scales, 3)).astype(np.float32)
  _, variables, apply = _fusion(method, num_scales, scores, feats)
  fused, weights = apply(variables, scores, feats, train=False)
  params = jax.tree.map(lambda v: np.asarray(v, np.float64), variables.get("params", {}))
  ref_fused, ref_weights = _np_fusion(method, params, scores.astype(np.float64), feats.astype(np.float64))
  np.testing.assert_allclose(fused, ref_fused, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-4, atol=1e-6)
  weights = np.asarray(weights)
  assert (weights >= 0).all()
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  if method == "attention" and num_scales > 1:
    assert weights.std() > 0.1  # the test exercises a non-trivial softmax
  if num_scales == 1:
    np.testing.assert_allclose(fused, scores[:, :, :, 0], atol=1e-6)


@pytest.mark.parametrize("method", ["attention", "shared_attention", "hierarchical", "average", "max"])
def test_permuting_scales_permutes_weights_and_keeps_fused(method):
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(1, 4, 4, 3, 5)).astype(np.float32)
  feats = rng.normal(size=(1, 4, 4, 3, 2)).astype(np.float32)
  perm = np.array([2, 0, 1])
  _, variables, apply = _fusion(method, 3, scores, feats, hidden=6)
  permuted = variables
  if method == "attention":  # the head sees the scales' feature blocks, and emits their logits, in the new order
    p = variables["params"]
    d = feats.shape[-1]
    hidden_k = p["hidden"]["kernel"].reshape(3, 3, 3, d, -1)[:, :, perm].reshape(p["hidden"]["kernel"].shape)
    permuted = {"params": {"hidden": {"kernel": hidden_k, "bias": p["hidden"]["bias"]},
                           "logits": {"kernel": p["logits"]["kernel"][..., perm], "bias": p["logits"]["bias"][perm]}}}
  scales = (1.0, 0.75, 0.5)
  fused, weights = apply(variables, scores, feats, train=False, scales=scales)
  fused_p, weights_p = apply(permuted, scores[:, :, :, perm], feats[:, :, :, perm], train=False,
                             scales=tuple(scales[i] for i in perm))
  np.testing.assert_allclose(fused_p, fused, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(weights_p, np.asarray(weights)[..., perm], rtol=1e-5, atol=1e-6)


def test_head_parameters_and_init():
  scores, feats = jnp.zeros((1, 4, 4, 2, 3)), jnp.zeros((1, 4, 4, 2, 8))
  for method in ("average", "max"):
    assert ScaleFusion(method, 2, **PAPER).init(jax.random.key(0), scores, feats, train=False) == {}
  p = jax.jit(lambda: ScaleFusion("attention", 2, **PAPER).init(jax.random.key(0), scores, feats,
                                                                 train=False))()["params"]
  assert set(p) == {"hidden", "logits"}
  assert p["hidden"]["kernel"].shape == (3, 3, 16, 512) and p["logits"]["kernel"].shape == (1, 1, 512, 2)
  np.testing.assert_allclose(np.std(p["hidden"]["kernel"]), 0.005, rtol=0.05)
  np.testing.assert_allclose(np.std(p["logits"]["kernel"]), 0.01, rtol=0.1)
  assert not np.any(p["hidden"]["bias"]) and not np.any(p["logits"]["bias"])
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(p))


def test_features_at_their_own_resolution_equal_features_resized_first():
  """The head may take each scale's features before resizing (it resizes after projecting): same fusion as the
  paper's, computed in NumPy on features resized first."""
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(2, 9, 9, 3, 4)).astype(np.float32)
  native = [rng.normal(size=(2, n, n, 5)).astype(np.float32) for n in (9, 7, 5)]
  resized = np.stack([ref.bilinear(f.astype(np.float64), (9, 9)) for f in native], axis=3)
  _, variables, apply = _fusion("attention", 3, scores, resized.astype(np.float32))
  fused, weights = apply(variables, scores, native, train=False)
  params = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
  ref_fused, ref_weights = _np_fusion("attention", params, scores.astype(np.float64), resized)
  assert np.asarray(weights).std() > 0.1
  np.testing.assert_allclose(fused, ref_fused, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-4, atol=1e-6)


def test_attention_dropout_only_in_training():
  rng = np.random.default_rng(5)
  scores = rng.normal(size=(1, 6, 6, 2, 3)).astype(np.float32)
  feats = rng.normal(size=(1, 6, 6, 2, 4)).astype(np.float32)
  _, variables, apply = _fusion("attention", 2, scores, feats, hidden=32)
  eval_a, eval_b = (apply(variables, scores, feats, train=False)[1] for _ in range(2))
  np.testing.assert_array_equal(eval_a, eval_b)
  train_w = apply(variables, scores, feats, train=True, rngs={"dropout": ref.dropout_key(0)})[1]
  assert not np.allclose(train_w, eval_a)
  np.testing.assert_allclose(np.asarray(train_w).sum(-1), 1.0, atol=1e-6)


def test_bad_inputs_are_reported():
  scores, feats = jnp.zeros((1, 4, 4, 2, 3)), jnp.zeros((1, 4, 4, 2, 8))
  with pytest.raises(ValueError, match="method='mean'"):
    ScaleFusion("mean", 2, **PAPER).init(jax.random.key(0), scores, feats, train=False)
  with pytest.raises(ValueError, match="num_scales = 3"):
    ScaleFusion("average", 3, **PAPER).init(jax.random.key(0), scores, feats, train=False)
  with pytest.raises(ValueError, match="num_scales is required"):
    ScaleFusion("attention", **PAPER).init(jax.random.key(0), scores, feats, train=False)
  with pytest.raises(ValueError, match="one scale per map"):
    ScaleFusion("hierarchical", **PAPER).init(jax.random.key(0), scores, feats, train=False, scales=(1.0,))


def test_unknown_method_fails_listing_the_registered_ones():
  assert tuple(fusion.FUSIONS) == ("attention", "shared_attention", "hierarchical", "average", "max")
  with pytest.raises(ValueError, match="method='mean'") as err:
    ScaleFusion("mean", 2, **PAPER)
  assert all(repr(name) in str(err.value) for name in fusion.FUSIONS)


@pytest.mark.parametrize("method", list(fusion.FUSIONS))
def test_declared_properties_match_the_parameters(method):
  """`parameter_free`: init makes no parameters; `scale_agnostic`: the same parameter shapes for 2 and 3 scales."""
  def shapes(s):
    module = ScaleFusion(method, s, hidden=6, dropout_rate=0.5)
    return jax.tree.map(jnp.shape, jax.eval_shape(lambda: module.init(
        jax.random.key(0), jnp.zeros((1, 4, 4, s, 3)), jnp.zeros((1, 4, 4, s, 2)), train=False)))
  cls = fusion.FUSIONS[method]
  assert cls.method == method
  assert cls.parameter_free == (shapes(2) == {})
  assert cls.scale_agnostic == (shapes(2) == shapes(3))


@pytest.mark.parametrize("own_resolution", [False, True])
@pytest.mark.parametrize("method", list(fusion.FUSIONS))
def test_declared_head_layers_are_the_convolutions_run(method, own_resolution):
  """Each class's `head_layers` (what model FLOPs count) against the convolutions its call runs, intercepted: the
  3x3 'hidden' conv as one dense conv over all the maps it takes, on the grid it computes on, and the 1x1
  'logits' conv. Scales out of order, features on the grid or at their own sizes (the highest scale's on the grid)."""
  scales, sizes = (0.75, 1.0, 0.5), (7, 9, 5)
  scores = jax.ShapeDtypeStruct((2, 9, 9, 3, 5), jnp.float32)
  map_shapes = [(2, n, n, 4) if own_resolution else (2, 9, 9, 4) for n in sizes]
  feats = ([jax.ShapeDtypeStruct(shape, jnp.float32) for shape in map_shapes] if own_resolution
           else jax.ShapeDtypeStruct((2, 9, 9, 3, 4), jnp.float32))
  module = ScaleFusion(method, 3, hidden=6, dropout_rate=0.5)
  run = Counter()

  def count(next_fun, args, kwargs, context):
    conv = context.module
    if context.method_name == "__call__" and isinstance(conv, fusion._ConcatConv3x3):
      (height, width), depth = args[1], sum(m.shape[-1] for m in args[0])
      run[(height, width, depth, conv.features, 3, 1)] += 1
    elif context.method_name == "__call__" and isinstance(conv, nn.Conv):
      x = args[0]
      run[(x.shape[1], x.shape[2], x.shape[3], conv.features, conv.kernel_size[0], conv.kernel_dilation or 1)] += 1
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(count):
    jax.eval_shape(lambda s, f: module.init(jax.random.key(0), s, f, train=False, scales=scales), scores, feats)
  declared = module.head_layers(scores.shape, map_shapes, scales)
  assert {tuple(layer): n for layer, n in declared.items()} == dict(run)
  assert bool(run) != module.parameter_free


def test_fusion_module_needs_only_its_sibling_resize_module():
  """fusion.py and resize.py can be copied together into another package: they import nothing else from here."""
  import scaleattn.models.fusion as fusion
  import scaleattn.models.resize as resize
  for module, allowed in ((fusion, {".resize"}), (resize, set())):
    with open(module.__file__) as f:
      source = f.read()
    imported = set(re.findall(r"^\s*(?:from|import)\s+((?:scaleattn|\.)[\w.]*)", source, re.M))
    assert imported == allowed, (module.__name__, imported)


def test_readme_snippet_runs():
  """The README's 'Using ScaleFusion in your own model' example runs as written."""
  with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
    readme = f.read()
  section = readme.split("## Using ScaleFusion in your own model", 1)[1].split("\n## ", 1)[0]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the documented example itself
  fused, weights = np.asarray(namespace["fused"]), np.asarray(namespace["weights"])
  assert fused.shape[:3] == weights.shape[:3] and weights.shape[3] == 2
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
