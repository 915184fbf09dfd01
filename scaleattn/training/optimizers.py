"""Optimizer and learning-rate schedule from `config.optim`.

SGD follows Caffe exactly: v <- m * v + lr * mult * (g + wd * w); w <- w - v. The learning rate (times the
per-parameter multiplier) is applied before the momentum trace, so a step decay does not rescale the momentum
already accumulated, as in the DeepLab solver. Weight decay applies to kernels only.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "poly", "cosine", "constant")


def create_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """The base learning rate per step (before per-parameter multipliers)."""
  lr = cfg.learning_rate
  if cfg.schedule == "step":
    schedule = optax.exponential_decay(lr, cfg.decay_every_steps, cfg.decay_factor, staircase=True)
  elif cfg.schedule == "poly":  # DeepLab v2: lr * (1 - t / T) ** 0.9
    schedule = optax.polynomial_schedule(lr, 0.0, 0.9, max(num_steps - cfg.warmup_steps, 1))
  elif cfg.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(lr, max(num_steps - cfg.warmup_steps, 1))
  elif cfg.schedule == "constant":
    schedule = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config.optim.schedule={cfg.schedule!r}: expected one of {SCHEDULES}")
  if cfg.warmup_steps:
    warmup = optax.linear_schedule(0.0, lr, cfg.warmup_steps)
    schedule = optax.join_schedules([warmup, schedule], [cfg.warmup_steps])
  return schedule


def _path_name(path: Sequence[jax.tree_util.KeyEntry]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def lr_multiplier_tree(params, rules: Sequence[tuple[str, float]]):
  """Per-parameter learning-rate multipliers: the first regex in `rules` that fully matches a path wins."""
  compiled = [(re.compile(pattern), float(mult)) for pattern, mult in rules]

  def multiplier(path, _):
    name = _path_name(path)
    return next((mult for pattern, mult in compiled if pattern.fullmatch(name)), 1.0)

  return jax.tree_util.tree_map_with_path(multiplier, params)


def decay_mask(params):
  """Weight decay on convolution kernels only (no decay on biases), as in DeepLab."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _path_name(path).endswith("kernel"), params)


def _scale_by_tree(multipliers) -> optax.GradientTransformation:
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def create_optimizer(cfg: ml_collections.ConfigDict, params, num_steps: int
                     ) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """Returns (optimizer, schedule); `params` (shapes suffice) decide the multipliers and the decay mask."""
  schedule = create_schedule(cfg, num_steps)
  multipliers = lr_multiplier_tree(params, cfg.lr_multipliers)
  chain = []
  if cfg.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.name == "sgd":
    chain += [
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale_by_schedule(schedule),
        _scale_by_tree(multipliers),
        optax.trace(decay=cfg.momentum),
        optax.scale(-1.0),
    ]
  elif cfg.name == "adam":
    chain += [
        optax.scale_by_adam(),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale_by_schedule(schedule),
        _scale_by_tree(multipliers),
        optax.scale(-1.0),
    ]
  else:
    raise ValueError(f"config.optim.name={cfg.name!r}: expected one of {OPTIMIZERS}")
  return optax.chain(*chain), schedule
