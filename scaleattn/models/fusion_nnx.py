"""ScaleFusion for `flax.nnx` models: the methods, parameters and outputs of the linen `fusion.ScaleFusion`.

Depends on jax, flax and its siblings `fusion.py` and `resize.py` only: the three files can be copied together.
NNX creates parameters at construction, so the feature depth D is given up front (`in_features`). Randomness is
explicit, as flax advises for NNX: `rngs` at construction draws the parameters, dropout keys go into the call::

    from flax import nnx
    fusion = ScaleFusion("attention", num_scales=2, in_features=128, hidden=64, rngs=nnx.Rngs(0))
    fused, weights = fusion(scores, feats, train=True, rngs=nnx.Rngs(dropout=1))  # or rngs=jax.random.key(1)
    fused, weights = fusion(scores, feats, train=False)  # no keys needed

`train=None` leaves dropout to the module's mode as NNX sets it (`fusion.eval()`, `fusion.train()`,
`nnx.view(fusion, deterministic=True)`); a new module is in training mode, as NNX's are. Parameters are the linen
module's, same names, shapes, initialisers and float32: `ScaleFusion.from_linen(linen_fusion, variables)` loads
them, `nnx.state(fusion, nnx.Param).to_pure_dict()` gives them back in linen's layout. Dropout masks are drawn
differently from linen's, so only eval-mode outputs match linen's exactly.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict

from .fusion import METHODS, PARAMETER_FREE, _shift  # relative: the three files travel together
from .fusion import ScaleFusion as LinenScaleFusion
from .resize import resize_bilinear


def _conv3x3_resized(x: jax.Array, kernel: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """3x3 'SAME' conv (no bias) of x resized to `grid`, as linen's head computes it: each tap's projection at x's
  own resolution, then resized and shifted into place (resizing is linear per channel, so the orders agree)."""
  return sum(_shift(resize_bilinear(jnp.einsum("bhwd,do->bhwo", x, kernel[ky, kx]), grid), ky - 1, kx - 1)
             for ky in range(3) for kx in range(3))


class ScaleFusion(nnx.Module):
  """Fuses scores [B, H, W, S, C] over S scales; returns (fused [B, H, W, C], weights [B, H, W, S]).

  Arguments as the linen module's, plus `in_features` (D) and `rngs`, both needed by the methods with parameters.
  Head: 'hidden' (3x3 conv over S * D channels for 'attention', D for the shared heads; init normal std 0.005),
  ReLU, dropout, 'logits' (1x1 conv, std 0.01; S outputs for 'attention', 1 otherwise); zero biases.
  """

  def __init__(self, method: str, num_scales: int | None = None, *, in_features: int | None = None,
               hidden: int = 512, dropout_rate: float = 0.5, dtype: Any = jnp.float32,
               rngs: nnx.Rngs | None = None):
    problems = []
    if method not in METHODS:
      problems.append(f"method={method!r}: expected one of {METHODS}")
    elif method not in PARAMETER_FREE:
      if method == "attention" and num_scales is None:
        problems.append("num_scales=None: 'attention' needs it (the head has one output per scale)")
      if in_features is None:
        problems.append(f"in_features=None: {method!r} needs the feature depth D to create its parameters")
      if rngs is None:
        problems.append(f"rngs=None: {method!r} needs an nnx.Rngs to draw its parameters")
    if problems:
      raise ValueError("ScaleFusion (nnx): " + "; ".join(problems))
    self.method, self.num_scales, self.in_features, self.dtype = method, num_scales, in_features, dtype
    if method in PARAMETER_FREE:
      return
    conv = dict(dtype=dtype, param_dtype=jnp.float32, bias_init=nnx.initializers.zeros, rngs=rngs)
    self.hidden = nnx.Conv(in_features * (num_scales if method == "attention" else 1), hidden, (3, 3),
                           kernel_init=nnx.initializers.normal(0.005), **conv)
    self.dropout = nnx.Dropout(dropout_rate)
    self.logits = nnx.Conv(hidden, num_scales if method == "attention" else 1, (1, 1),
                           kernel_init=nnx.initializers.normal(0.01), **conv)

  @classmethod
  def from_linen(cls, module: nn.Module, variables: Mapping[str, Any]) -> ScaleFusion:
    """The NNX module computing what linen `module` (a `fusion.ScaleFusion`) computes with `variables` ({'params':
    ...} or the params alone): same arguments and parameter values, D read from the 'hidden' kernel."""
    params = variables.get("params", variables)
    in_features = None
    if "hidden" in params:
      depth = params["hidden"]["kernel"].shape[2]
      in_features = depth // module.num_scales if module.method == "attention" and module.num_scales else depth
    model = nnx.eval_shape(lambda: cls(module.method, module.num_scales, in_features=in_features,
                                       hidden=module.hidden, dropout_rate=module.dropout_rate, dtype=module.dtype,
                                       rngs=nnx.Rngs(0)))
    expected = {k: v.shape for k, v in flatten_dict(nnx.state(model, nnx.Param).to_pure_dict(), sep="/").items()}
    given = {k: jnp.shape(v) for k, v in flatten_dict(dict(params), sep="/").items()}
    if given != expected:
      raise ValueError(f"ScaleFusion.from_linen: parameters {given} for method={module.method!r}, num_scales="
                       f"{module.num_scales}, hidden={module.hidden}: expected {expected}")
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), dict(params)))
    return model

  def __call__(self, scores: jax.Array, features: jax.Array | Sequence[jax.Array], *, train: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None,
               scales: Sequence[float] | None = None) -> tuple[jax.Array, jax.Array]:
    """Inputs and outputs as the linen module's. train: dropout on (True) or off (False); None: the module's mode.
    rngs: dropout keys when dropout is on (an nnx.Rngs with a 'dropout' or default stream, or a key)."""
    if self.method in PARAMETER_FREE:  # the linen module is then a pure function
      return LinenScaleFusion(self.method, self.num_scales).apply({}, scores, features, train=False, scales=scales)
    maps = self._maps(scores, features, scales)
    if isinstance(rngs, jax.Array):
      rngs = nnx.Rngs(dropout=rngs)  # a fresh key for each head evaluation, as linen's make_rng gives
    deterministic = None if train is None else not train

    def head(inputs: Sequence[jax.Array], grid: tuple[int, int]) -> jax.Array:
      x = self.dropout(nnx.relu(self._hidden(inputs, grid)), deterministic=deterministic, rngs=rngs)
      return self.logits(x).astype(jnp.float32)

    if self.method == "hierarchical":
      return LinenScaleFusion._hierarchical(scores, maps, scales, lambda m: head([m], m.shape[1:3]))
    grid = scores.shape[1:3]
    if self.method == "attention":
      h_logits = head(maps, grid)
    else:  # shared_attention
      h_logits = jnp.concatenate([head([m], grid) for m in maps], axis=-1)
    weights = jax.nn.softmax(h_logits, axis=-1).astype(scores.dtype)
    return jnp.einsum("bhws,bhwsc->bhwc", weights, scores), weights

  def _maps(self, scores: jax.Array, features: jax.Array | Sequence[jax.Array],
            scales: Sequence[float] | None) -> list[jax.Array]:
    """The features as S maps [B, h_s, w_s, D], checked against the scores, num_scales, in_features and scales."""
    maps = list(features) if isinstance(features, (list, tuple)) else [
        features[:, :, :, i] for i in range(features.shape[3])]
    shapes = [m.shape for m in maps]
    s = scores.shape[3] if scores.ndim == 5 else -1
    if (scores.ndim != 5 or self.num_scales not in (None, s) or len(maps) != s
        or any(len(sh) != 4 or sh[0] != scores.shape[0] or sh[3] != self.in_features for sh in shapes)):
      raise ValueError(f"ScaleFusion (nnx): scores {scores.shape} and features {shapes}: expected scores "
                       f"[B, H, W, S, C] and features [B, H, W, S, D] or S maps [B, h_s, w_s, D], "
                       f"S = num_scales = {self.num_scales}, D = in_features = {self.in_features}")
    if scales is not None and len(scales) != s:
      raise ValueError(f"ScaleFusion (nnx): scales={tuple(scales)} for {s} score maps: expected one scale per map")
    return maps

  def _hidden(self, maps: Sequence[jax.Array], grid: tuple[int, int]) -> jax.Array:
    """The 'hidden' conv of the maps concatenated on channels, each brought to `grid`; maps off the grid are
    projected at their own resolution first (fusion.py's module docstring says why)."""
    if all(m.shape[1:3] == tuple(grid) for m in maps):
      return self.hidden(jnp.concatenate(maps, axis=-1))
    d = self.in_features
    kernel = self.hidden.kernel[...].astype(self.dtype)
    return self.hidden.bias[...].astype(self.dtype) + sum(
        _conv3x3_resized(m.astype(self.dtype), kernel[:, :, i * d:(i + 1) * d], grid) for i, m in enumerate(maps))
