"""ScaleFusion against a NumPy transcription of the paper's equations."""
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn import ScaleFusion


def _np_conv(x, k, b, dilation=1):
  """'SAME' 2-D convolution, NHWC x HWIO, written out with loops over the kernel taps."""
  kh, kw = k.shape[:2]
  ph, pw = dilation * (kh // 2), dilation * (kw // 2)
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (k.shape[3],))
  for i, j in itertools.product(range(kh), range(kw)):
    out += xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w] @ k[i, j]
  return out + b


def _np_fusion(method, params, scores, feats):
  b, h, w, s, c = scores.shape
  if method == "average":
    weights = np.full((b, h, w, s), 1.0 / s)
    return (weights[..., None] * scores).sum(3), weights
  if method == "max":
    fused = scores.max(axis=3)
    winner = fused.argmax(-1)
    weights = np.zeros((b, h, w, s))
    for idx in np.ndindex(b, h, w):
      weights[idx + (scores[idx][:, winner[idx]].argmax(),)] = 1.0
    return fused, weights
  x = feats.reshape(b, h, w, -1)
  hid = np.maximum(_np_conv(x, params["hidden"]["kernel"], params["hidden"]["bias"]), 0)
  logits = _np_conv(hid, params["logits"]["kernel"], params["logits"]["bias"])
  e = np.exp(logits - logits.max(-1, keepdims=True))
  weights = e / e.sum(-1, keepdims=True)
  return (weights[..., None] * scores).sum(3), weights


@pytest.mark.parametrize("method", ["attention", "average", "max"])
@pytest.mark.parametrize("num_scales", [1, 2, 3, 4])
def test_matches_numpy(method, num_scales):
  rng = np.random.default_rng(num_scales)
  scores = rng.normal(size=(2, 5, 6, num_scales, 4)).astype(np.float32)
  feats = rng.normal(size=(2, 5, 6, num_scales, 3)).astype(np.float32)
  module = ScaleFusion(method, num_scales, hidden=7)
  variables = module.init(jax.random.key(0), scores, feats, train=False)
  if method == "attention":  # larger weights than the paper's init so the softmax is far from uniform
    variables = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), variables)
  fused, weights = module.apply(variables, scores, feats, train=False)
  params = jax.tree.map(np.asarray, variables.get("params", {}))
  ref_fused, ref_weights = _np_fusion(method, params, scores.astype(np.float64), feats.astype(np.float64))
  np.testing.assert_allclose(fused, ref_fused, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-4, atol=1e-5)
  assert (np.asarray(weights) >= 0).all()
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-5)
  if num_scales == 1:
    np.testing.assert_allclose(fused, scores[:, :, :, 0], atol=1e-6)


@pytest.mark.parametrize("method", ["attention", "average", "max"])
def test_permuting_scales(method):
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(1, 4, 4, 3, 5)).astype(np.float32)
  feats = rng.normal(size=(1, 4, 4, 3, 2)).astype(np.float32)
  perm = np.array([2, 0, 1])
  module = ScaleFusion(method, 3, hidden=6)
  variables = module.init(jax.random.key(0), scores, feats, train=False)
  if method == "attention":
    # Permuting the scales permutes the head's input channel blocks and its output channels.
    p = jax.tree.map(np.asarray, variables["params"])
    d = feats.shape[-1]
    hidden_k = p["hidden"]["kernel"].reshape(3, 3, 3, d, -1)[:, :, perm].reshape(p["hidden"]["kernel"].shape)
    permuted = {"params": {"hidden": {"kernel": hidden_k, "bias": p["hidden"]["bias"]},
                           "logits": {"kernel": p["logits"]["kernel"][..., perm], "bias": p["logits"]["bias"][perm]}}}
  else:
    permuted = variables
  fused, weights = module.apply(variables, scores, feats, train=False)
  fused_p, weights_p = module.apply(permuted, scores[:, :, :, perm], feats[:, :, :, perm], train=False)
  np.testing.assert_allclose(fused_p, fused, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(weights_p, np.asarray(weights)[..., perm], rtol=1e-5, atol=1e-6)


def test_head_parameters_and_init():
  scores, feats = jnp.zeros((1, 4, 4, 2, 3)), jnp.zeros((1, 4, 4, 2, 8))
  for method in ("average", "max"):
    assert ScaleFusion(method, 2).init(jax.random.key(0), scores, feats, train=False) == {}
  p = ScaleFusion("attention", 2, hidden=512).init(jax.random.key(0), scores, feats, train=False)["params"]
  assert p["hidden"]["kernel"].shape == (3, 3, 16, 512) and p["logits"]["kernel"].shape == (1, 1, 512, 2)
  np.testing.assert_allclose(np.std(p["hidden"]["kernel"]), 0.005, rtol=0.05)
  np.testing.assert_allclose(np.std(p["logits"]["kernel"]), 0.01, rtol=0.1)
  assert not np.any(p["hidden"]["bias"]) and not np.any(p["logits"]["bias"])


def test_fusion_module_imports_nothing_from_the_package():
  import scaleattn.models.fusion as fusion
  source = open(fusion.__file__).read()
  assert not re.search(r"^\s*(from|import)\s+scaleattn", source, re.M)


def test_readme_snippet_runs():
  """The README's 'ScaleFusion in your own model' example runs as written."""
  import os
  readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
  section = readme.split("## Using ScaleFusion in your own model", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the documented example itself
  fused, weights = namespace["fused"], namespace["weights"]
  assert fused.shape == (2, 32, 32, 3) and weights.shape == (2, 32, 32, 2)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-5)
