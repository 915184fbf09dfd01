"""ScaleFusion for `flax.nnx` models: the registered linen fusions of `fusion.py`, run on parameters NNX holds.

Depends on jax, flax and its siblings `fusion.py` and `resize.py` only: the three files can be copied together.
NNX creates parameters at construction, so the feature depth D is given up front (`in_features`). Randomness is
explicit, as flax advises for NNX: `rngs` at construction draws the parameters, dropout keys go into the call::

    from flax import nnx
    fusion = ScaleFusion("attention", num_scales=2, in_features=128, hidden=64, dropout_rate=0.5, rngs=nnx.Rngs(0))
    fused, weights = fusion(scores, feats, train=True, rngs=nnx.Rngs(dropout=1))  # or rngs=jax.random.key(1)
    fused, weights = fusion(scores, feats, train=False)  # no keys needed

`train=None` leaves dropout to the module's mode as NNX sets it (`fusion.eval()`, `fusion.train()`,
`nnx.view(fusion, deterministic=True)`); a new module is in training mode, as NNX's are. Parameters are the linen
module's, same names, shapes, initialisers and float32 (they are drawn by its `init`, and every call is its
`apply`, so the method is defined once): `ScaleFusion.from_linen(linen_fusion, variables)` loads them,
`nnx.state(fusion, nnx.Param).to_pure_dict()` gives them back in linen's layout. The dropout masks are linen's
for the key the call draws.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict

from .fusion import FUSIONS, Fusion, per_scale  # relative: the three files travel together
from .fusion import ScaleFusion as linen_fusion


def _as_nnx(tree: Mapping[str, Any]) -> nnx.Dict:
  """Linen's nested parameter dict as NNX nodes, so NNX's state paths are linen's."""
  return nnx.Dict({k: _as_nnx(v) if isinstance(v, Mapping) else nnx.Param(jnp.asarray(v, jnp.float32))
                   for k, v in tree.items()})


class ScaleFusion(nnx.Module):
  """Fuses scores [B, H, W, S, C] over S scales; returns (fused [B, H, W, C], weights [B, H, W, S]).

  Arguments as the linen `fusion.ScaleFusion`'s (`hidden` and `dropout_rate` required: the paper uses 512 and
  0.5), plus `in_features` (D) and `rngs`, both needed by the methods with parameters. The parameters are attributes
  named as linen's ('hidden', 'logits').
  """

  def __init__(self, method: str, num_scales: int | None = None, *, in_features: int | None = None,
               hidden: int, dropout_rate: float, dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
    problems = []
    cls = FUSIONS.get(method)
    if cls is None:
      problems.append(f"method={method!r}: expected one of {tuple(FUSIONS)}")
    elif not cls.parameter_free:
      if not cls.scale_agnostic and num_scales is None:
        problems.append(f"num_scales=None: {method!r} needs it (its parameters depend on the number of scales)")
      if in_features is None:
        problems.append(f"in_features=None: {method!r} needs the feature depth D to create its parameters")
      if rngs is None:
        problems.append(f"rngs=None: {method!r} needs an nnx.Rngs to draw its parameters")
    if problems:
      raise ValueError("ScaleFusion (nnx): " + "; ".join(problems))
    self.linen: Fusion = linen_fusion(method, num_scales, hidden=hidden, dropout_rate=dropout_rate, dtype=dtype)
    self.in_features = in_features
    self.deterministic = False  # NNX's mode: a new module trains
    if cls.parameter_free:
      return
    s = num_scales or 2  # two scales make every head run once
    scores, features = jnp.zeros((1, 1, 1, s, 1)), jnp.zeros((1, 1, 1, s, in_features))
    for name, params in self.linen.init(rngs.params(), scores, features, train=False)["params"].items():
      setattr(self, name, _as_nnx(params))

  @classmethod
  def from_linen(cls, module: Fusion, variables: Mapping[str, Any]) -> ScaleFusion:
    """The NNX module computing what linen `module` (a registered fusion) computes with `variables` ({'params':
    ...} or the params alone): same arguments and parameter values, D read from the 'hidden' kernel."""
    params = variables.get("params", variables)

    def abstract(in_features: int | None) -> ScaleFusion:
      return nnx.eval_shape(lambda: cls(module.method, module.num_scales, in_features=in_features,
                                        hidden=module.hidden, dropout_rate=module.dropout_rate, dtype=module.dtype,
                                        rngs=nnx.Rngs(0)))

    in_features = None
    if "hidden" in params:  # its input depth is D times what it is for D = 1
      in_features = params["hidden"]["kernel"].shape[2] // abstract(1).hidden["kernel"].shape[2]
    model = abstract(in_features)
    expected = {k: v.shape for k, v in flatten_dict(nnx.state(model, nnx.Param).to_pure_dict(), sep="/").items()}
    given = {k: jnp.shape(v) for k, v in flatten_dict(dict(params), sep="/").items()}
    if given != expected:
      raise ValueError(f"ScaleFusion.from_linen: parameters {given} for method={module.method!r}, num_scales="
                       f"{module.num_scales}, hidden={module.hidden}: expected {expected}")
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), dict(params)))
    return model

  def set_view(self, deterministic: bool | None = None) -> None:
    """`nnx.view(fusion, deterministic=...)`: dropout off (True) or on (False) when the call leaves it (train=None)."""
    if deterministic is not None:
      self.deterministic = deterministic

  def __call__(self, scores: jax.Array, features: jax.Array | Sequence[jax.Array], *, train: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None,
               scales: Sequence[float] | None = None) -> tuple[jax.Array, jax.Array]:
    """Inputs and outputs as the linen module's. train: dropout on (True) or off (False); None: the module's mode.
    rngs: dropout keys when dropout is on (an nnx.Rngs with a 'dropout' or default stream, or a key)."""
    depths = {m.shape[-1] for m in per_scale(features)}
    if self.in_features is not None and depths != {self.in_features}:
      raise ValueError(f"ScaleFusion (nnx): features of depth {sorted(depths)}: expected D = in_features = "
                       f"{self.in_features}")
    train = not self.deterministic if train is None else train
    keys = {}
    if train and not self.linen.parameter_free:
      if rngs is None:
        raise ValueError(f"ScaleFusion (nnx) {self.linen.method!r}: dropout is on (train={train}) but there are no "
                         "`rngs` to draw its masks from: pass rngs= (an nnx.Rngs or a key), or train=False")
      rngs = nnx.Rngs(dropout=rngs) if isinstance(rngs, jax.Array) else rngs  # a key draws as Rngs(dropout=key)
      keys = {"dropout": rngs.dropout()}
    params = nnx.state(self, nnx.Param).to_pure_dict()
    return self.linen.apply({"params": params} if params else {}, scores, features, train=train, scales=scales,
                            rngs=keys)
