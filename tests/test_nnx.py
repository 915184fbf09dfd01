"""The NNX ScaleFusion against the linen one (itself tested against NumPy in test_fusion.py), from the same
parameters."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx

from scaleattn import ScaleFusion as LinenScaleFusion
from scaleattn.models.fusion import FUSIONS
from scaleattn.nnx import ScaleFusion

PAPER = dict(hidden=512, dropout_rate=0.5)  # the paper's head: 512 hidden channels, dropout 0.5

_GRID, _SIZES = 9, (9, 7, 5)  # feature sizes at their own resolutions: one on the grid, two below it


def _inputs(seed, own_resolution, depth=4):
  """scores [2, 9, 9, 3, 5] and features on the grid [2, 9, 9, 3, D] or at their own sizes (9, 7, 5)."""
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(2, _GRID, _GRID, 3, 5)).astype(np.float32)
  if own_resolution:
    return scores, [rng.normal(size=(2, n, n, depth)).astype(np.float32) for n in _SIZES]
  return scores, rng.normal(size=(2, _GRID, _GRID, 3, depth)).astype(np.float32)


def _pair(method, scores, feats, scales=None, hidden=6, seed=0):
  """The linen module, its variables drawn with NumPy (unit-scale weights: far from a uniform softmax), and the NNX
  module loaded from them."""
  linen = LinenScaleFusion(method, 3 if method == "attention" else None, hidden=hidden, dropout_rate=0.5)
  variables = ref.random_variables(linen, scores, feats, train=False, scales=scales, seed=seed)
  return linen, variables, ScaleFusion.from_linen(linen, variables)


@pytest.mark.parametrize("method, own_resolution, scales", [
    ("attention", False, None), ("attention", True, None), ("shared_attention", False, None),
    ("shared_attention", True, None), ("hierarchical", True, (0.75, 1.0, 0.5)),
    ("hierarchical", False, (0.5, 0.75, 1.0)), ("average", False, None), ("max", False, None)])
def test_eval_outputs_equal_linen_from_the_same_parameters(method, own_resolution, scales):
  scores, feats = _inputs(1, own_resolution)
  linen, variables, model = _pair(method, scores, feats, scales)
  fused, weights = linen.apply(variables, scores, feats, train=False, scales=scales)
  fused_nnx, weights_nnx = model(scores, feats, train=False, scales=scales)
  np.testing.assert_allclose(fused_nnx, fused, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(weights_nnx, weights, rtol=1e-5, atol=1e-6)
  if method != "average":
    assert np.asarray(weights).std() > 0.05  # a non-trivial fusion
  # The parameters sit under linen's names, unchanged:
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param).to_pure_dict(),
               dict(variables.get("params", {})))


@pytest.mark.parametrize("method, outputs", [("attention", 2), ("shared_attention", 1)])
def test_fresh_parameters_have_linen_names_shapes_and_initialisers(method, outputs):
  scores, feats = jnp.zeros((1, 4, 4, 2, 3)), jnp.zeros((1, 4, 4, 2, 8))
  expected = jax.eval_shape(lambda: LinenScaleFusion(method, 2, **PAPER).init(jax.random.key(0), scores, feats,
                                                                               train=False))["params"]
  rngs = nnx.Rngs(ref.dropout_key(0))  # an rbg key: its initialisers compile faster
  p = nnx.state(ScaleFusion(method, 2, in_features=8, **PAPER, rngs=rngs), nnx.Param).to_pure_dict()
  assert jax.tree.map(lambda v: (v.shape, v.dtype), p) == jax.tree.map(lambda v: (v.shape, v.dtype), expected)
  assert p["hidden"]["kernel"].shape == (3, 3, 8 * (2 if method == "attention" else 1), 512)
  assert p["logits"]["kernel"].shape == (1, 1, 512, outputs)
  np.testing.assert_allclose(np.std(p["hidden"]["kernel"]), 0.005, rtol=0.05)
  np.testing.assert_allclose(np.std(p["logits"]["kernel"]), 0.01, rtol=0.2)
  assert not np.any(p["hidden"]["bias"]) and not np.any(p["logits"]["bias"])


def test_parameter_free_methods_have_no_state():
  for method in ("average", "max"):
    assert nnx.state(ScaleFusion(method, 2, **PAPER)).to_pure_dict() == {}


def test_dropout_only_in_training():
  scores, feats = _inputs(2, own_resolution=False)
  _, _, model = _pair("attention", scores, feats, hidden=32)
  key = ref.dropout_key(0)
  eval_w = model(scores, feats, train=False)[1]
  np.testing.assert_array_equal(model(scores, feats, train=False, rngs=key)[1], eval_w)  # keys unused in eval
  train_w = model(scores, feats, train=True, rngs=key)[1]
  assert not np.allclose(train_w, eval_w)
  np.testing.assert_allclose(np.asarray(train_w).sum(-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(model(scores, feats, train=True, rngs=nnx.Rngs(dropout=key))[1], train_w)
  assert not np.allclose(model(scores, feats, train=True, rngs=ref.dropout_key(1))[1], train_w)
  with pytest.raises(ValueError, match="no `rngs`"):
    model(scores, feats, train=True)
  # train=None follows the module's NNX mode:
  np.testing.assert_array_equal(nnx.view(model, deterministic=False)(scores, feats, rngs=key)[1], train_w)
  model.eval()
  np.testing.assert_array_equal(model(scores, feats)[1], eval_w)


def test_bad_arguments_are_reported():
  with pytest.raises(ValueError, match="method='mean'") as err:
    ScaleFusion("mean", 2, **PAPER)
  assert all(repr(name) in str(err.value) for name in FUSIONS)  # the registered ones
  with pytest.raises(ValueError, match="num_scales=None.*in_features=None.*rngs=None"):  # every problem at once
    ScaleFusion("attention", **PAPER)
  abstract = lambda method, d: nnx.eval_shape(lambda: ScaleFusion(method, in_features=d, hidden=4, dropout_rate=0.5,
                                                                  rngs=nnx.Rngs(0)))
  scores, feats = np.zeros((1, 4, 4, 2, 3), np.float32), np.zeros((1, 4, 4, 2, 5), np.float32)
  with pytest.raises(ValueError, match=r"D = in_features = 8"):  # checked before any computation
    abstract("shared_attention", 8)(scores, feats, train=False)
  with pytest.raises(ValueError, match="one scale per map"):
    abstract("hierarchical", 5)(scores, feats, train=False, scales=(1.0,))
  params = {"hidden": {"kernel": np.zeros((3, 3, 10, 4)), "bias": np.zeros(4)},  # linen's for 2 scales, D = 5
            "logits": {"kernel": np.zeros((1, 1, 4, 2)), "bias": np.zeros(2)}}
  with pytest.raises(ValueError, match=r"(?s)from_linen: parameters .*'logits/kernel': \(1, 1, 4, 2\).*expected"):
    ScaleFusion.from_linen(LinenScaleFusion("attention", 3, hidden=4, dropout_rate=0.5), {"params": params})


def test_nnx_module_needs_only_its_siblings():
  """fusion_nnx.py can be copied with fusion.py and resize.py: it imports nothing else from this package (resize.py
  comes through fusion.py)."""
  import scaleattn.models.fusion_nnx as fusion_nnx
  with open(fusion_nnx.__file__) as f:
    imported = set(re.findall(r"^\s*(?:from|import)\s+((?:scaleattn|\.)[\w.]*)", f.read(), re.M))
  assert imported == {".fusion"}


def _readme_blocks():
  """The ```python blocks of the README's 'Using ScaleFusion in your own model' section."""
  with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
    readme = f.read()
  section = readme.split("## Using ScaleFusion in your own model", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_nnx_snippets_run():
  """The README's NNX example (2 scales) and its 'shared_attention' one (2 scales at init, 4 at apply, linen and
  NNX from the same parameters) run as written. The first block, linen's, is test_fusion's."""
  blocks = _readme_blocks()
  assert len(blocks) == 3
  outputs = []
  for code in blocks[1:]:
    namespace = {}
    with jax.default_prng_impl("rbg"):  # the same code with keys whose initialisers compile faster
      exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the documented example itself
    outputs.append(namespace)
  for namespace, s in zip(outputs, (2, 4), strict=True):
    fused, weights = np.asarray(namespace["fused"]), np.asarray(namespace["weights"])
    assert fused.shape[:3] == weights.shape[:3] and weights.shape[3] == s
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(outputs[1]["fused_nnx"], outputs[1]["fused"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outputs[1]["weights_nnx"], outputs[1]["weights"], rtol=1e-5, atol=1e-7)
