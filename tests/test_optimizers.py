"""The optimizer against a NumPy transcription of Caffe's SGD solver with DeepLab's multipliers."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scaleattn.config import defaults as base
from scaleattn.training import optimizers


def _params(rng):
  shapes = {"backbone": {"conv1_1": {"kernel": (3, 3, 3, 4), "bias": (4,)},
                         "fc8": {"kernel": (1, 1, 4, 5), "bias": (5,)}},
            "fusion": {"hidden": {"kernel": (3, 3, 8, 2), "bias": (2,)}}}
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


# Expected (lr multiplier, decayed?) per parameter, from the paper's solver: fc8 and attention x10 (bias x20),
# other biases x2; weight decay on kernels only.
EXPECTED = {"backbone/conv1_1/kernel": (1, True), "backbone/conv1_1/bias": (2, False),
            "backbone/fc8/kernel": (10, True), "backbone/fc8/bias": (20, False),
            "fusion/hidden/kernel": (10, True), "fusion/hidden/bias": (20, False)}


def _flat(tree):
  return {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sgd_matches_caffe_solver():
  cfg = base.get_config().optim
  cfg.decay_every_steps = 2  # cross a decay boundary within the test
  rng = np.random.default_rng(0)
  params = _params(rng)
  grads = [_params(rng) for _ in range(4)]
  tx, _ = optimizers.create_optimizer(cfg, params, num_steps=4)
  state = tx.init(params)
  p = params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)

  ref, v = _flat(params), {k: 0.0 for k in EXPECTED}
  for t, g in enumerate(grads):
    lr = 1e-3 * 0.1 ** (t // 2)
    for name, (mult, decayed) in EXPECTED.items():
      grad = _flat(g)[name] + (5e-4 * ref[name] if decayed else 0.0)
      v[name] = 0.9 * v[name] + lr * mult * grad
      ref[name] = ref[name] - v[name]
  got = _flat(p)
  for name in EXPECTED:
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_schedules():
  cfg = ml_collections.ConfigDict(dict(base.get_config().optim))
  sched = optimizers.create_schedule(cfg, 6000)
  np.testing.assert_allclose([sched(0), sched(1999), sched(2000), sched(4000), sched(5999)],
                             [1e-3, 1e-3, 1e-4, 1e-5, 1e-5], rtol=1e-5)
  cfg.schedule, cfg.warmup_steps = "poly", 10
  sched = optimizers.create_schedule(cfg, 110)
  np.testing.assert_allclose([sched(5), sched(10), sched(60)], [5e-4, 1e-3, 1e-3 * 0.5 ** 0.9], rtol=1e-5)
  cfg.schedule = "nope"
  with pytest.raises(ValueError, match="config.optim.schedule='nope'"):
    optimizers.create_schedule(cfg, 10)


def test_adam_runs_and_respects_multipliers():
  cfg = base.get_config().optim
  cfg.name, cfg.weight_decay = "adam", 0.0
  params = jax.tree.map(jnp.zeros_like, _params(np.random.default_rng(1)))
  grads = jax.tree.map(jnp.ones_like, params)
  tx, _ = optimizers.create_optimizer(cfg, params, num_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat = _flat(updates)
  # Adam's first update is -lr * sign(g) (up to epsilon), times the multiplier.
  for name, (mult, _) in EXPECTED.items():
    np.testing.assert_allclose(flat[name], -1e-3 * mult, rtol=1e-4, err_msg=name)
