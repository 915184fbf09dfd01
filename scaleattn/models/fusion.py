"""Fusions: merge per-scale score maps into one (Chen et al., "Attention to Scale", CVPR 2016, and two
scale-agnostic successors). One class per method, registered by name in FUSIONS; `ScaleFusion(method, ...)` builds
the registered one.

Depends on jax, flax and its sibling `resize.py` only, so the two files can be copied into any Flax model. Scores
of every scale must already be on one grid; features may be too, or may stay at each scale's own resolution::

    import jax, jax.numpy as jnp
    fusion = ScaleFusion("attention", num_scales=2, hidden=64, dropout_rate=0.5)
    scores, feats = jnp.zeros((1, 41, 41, 2, 21)), jnp.zeros((1, 41, 41, 2, 128))  # [B, H, W, S, C|D]
    variables = fusion.init(jax.random.key(0), scores, feats, train=False)
    fused, weights = fusion.apply(variables, scores, feats, train=True, rngs={"dropout": jax.random.key(1)})
    # fused [1, 41, 41, 21], weights [1, 41, 41, 2]: one weight per pixel and scale, summing to 1
    native = [jnp.zeros((1, 41, 41, 128)), jnp.zeros((1, 21, 21, 128))]  # the same features before resizing
    fused, weights = fusion.apply(variables, scores, native, train=False)

`hidden` and `dropout_rate` have no defaults: the paper uses hidden=512 and dropout_rate=0.5 (config.model.fusion in
`scaleattn.config.defaults`, which this project's models are built from); smaller models may want a smaller head.

Methods, per pixel i and class c, with head(x) = a 3x3 conv (`hidden` channels) + ReLU + dropout + a 1x1 conv:
  'attention':        the paper's. h = head(concat_s features_s) with S output channels; w_i^s = softmax_s(h_i^s);
                      fused_{i,c} = sum_s w_i^s * scores_{i,c}^s. Its parameters fix S and the order of the scales.
  'shared_attention': one head with one output channel, shared by all scales, scores each scale from its own
                      features (brought to the grid): h^s = head(features_s); w^s = softmax_s(h^s) over the scales
                      present. The same parameters serve any set of scales; permuting scales permutes weights.
  'hierarchical':     Tao, Sapra, Catanzaro 2020 (arXiv 2005.10821). a_s = sigmoid(head(features_s)) on the scale's
                      own grid, resized to the common grid; from the highest scale down, each lower scale l takes
                      fused = a_l * p_l + (1 - a_l) * fused (the lowest scale has the last word, the highest scale's
                      attention is never used). The weights are the products this implies (they sum to 1).
                      Differences from NVIDIA/semantic-segmentation's `nscale_forward`: every term is combined on
                      the common (scale-1 output) grid, where theirs are combined at each scale's input
                      resolution, so up(a_l) * up(p_l) stands for their up(a_l * p_l), and a scale above 1 is
                      brought to the grid in one resize before combining instead of the running fusion being
                      brought down scale by scale (2 -> 1.5 -> 1); the two agree where a_l is constant over an
                      interpolation cell. The head is this module's (one 3x3 layer, no batch norm, dropout in
                      training) on the features it is given (fc7 here) rather than their two 3x3 conv-BN-ReLU
                      layers on the decoder's features.
  'average':          w_i^s = 1 / S.
  'max':              fused_{i,c} = max_s scores_{i,c}^s; the weights are the one-hot of the scale holding the
                      maximum of the winning class (what the paper shows for max pooling).
'average' and 'max' have no parameters; every method except 'attention' runs on scale sets it was not trained on.
Each class declares these (`parameter_free`, `scale_agnostic`) and its head's convolutions (`head_layers`, what
model FLOPs count), so callers read the class instead of naming methods. A new method is one class decorated with
`@register(name)`.

For 'attention' and 'shared_attention', features given at their own resolutions are resized (bilinear, align
corners) inside the head's first layer, after its per-tap channel projection: resizing is linear and acts on each
channel alike, so resize-then-project equals project-then-resize, and the projection runs on the small maps (for
VGG-16 LargeFOV at scales 1, 0.75, 0.5 the head's cost falls by a third); the result is the same as for features
resized first. 'hierarchical' runs its head on each map as given (at its own resolution, as Tao et al.), so it
gives other weights for features resized first.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from .resize import resizer  # relative: the two files travel together

ToGrid = Callable[[jax.Array], jax.Array]
Head = Callable[[Sequence[jax.Array], tuple[int, int], Sequence[ToGrid] | None], jax.Array]
Shape = tuple[int, ...]


class Layer(NamedTuple):
  """One convolution as model FLOPs count it: a kernel x kernel conv from cin to cout channels on a height x width
  input, every tap counted."""
  height: int
  width: int
  cin: int
  cout: int
  kernel: int
  dilation: int


FUSIONS: dict[str, type[Fusion]] = {}  # method name -> class, filled by `register`
REQUIRED = ("hidden", "dropout_rate")  # the fields every method takes without a default
_F = TypeVar("_F", bound="Fusion")


def register(method: str) -> Callable[[type[_F]], type[_F]]:
  """Class decorator: names the class `method` in FUSIONS, the one table config.model.fusion.name and
  `ScaleFusion` read."""
  def add(cls: type[_F]) -> type[_F]:
    if method in FUSIONS:
      raise ValueError(f"register({method!r}): already the name of {FUSIONS[method].__name__}")
    cls.method = method
    FUSIONS[method] = cls
    return cls
  return add


def ScaleFusion(method: str, num_scales: int | None = None, **settings: Any) -> Fusion:
  """The fusion registered as `method`, e.g. ScaleFusion("attention", num_scales=2, hidden=512, dropout_rate=0.5)
  (the paper's head); `settings` are the class's other fields (hidden and dropout_rate, required; dtype) and
  linen's `name`."""
  if method not in FUSIONS:
    raise ValueError(f"ScaleFusion: method={method!r}: expected one of {tuple(FUSIONS)}")
  missing = [f for f in REQUIRED if f not in settings]
  if missing:
    raise TypeError(f"ScaleFusion({method!r}): {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                    "required (no defaults; the paper uses hidden=512, dropout_rate=0.5)")
  return FUSIONS[method](num_scales=num_scales, **settings)


def per_scale(features: jax.Array | Sequence[jax.Array]) -> list[jax.Array]:
  """The features as S maps [B, h_s, w_s, D]: the sequence given, or the slices of [B, H, W, S, D]."""
  if isinstance(features, (list, tuple)):
    return list(features)
  return [features[:, :, :, i] for i in range(features.shape[3])]


def _highest_first(num_scales: int, scales: Sequence[float] | None) -> list[int]:
  """The S axis's indices from the highest scale to the lowest (without `scales`: the axis's own order)."""
  return sorted(range(num_scales), key=lambda i: -scales[i]) if scales is not None else list(range(num_scales))


def _shift(x: jax.Array, dy: int, dx: int) -> jax.Array:
  """out[:, i, j] = x[:, i + dy, j + dx], zero where that falls outside x."""
  h, w = x.shape[1:3]
  r0, r1, c0, c1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
  return jnp.pad(x[:, r0 + dy:r1 + dy, c0 + dx:c1 + dx], ((0, 0), (r0, h - r1), (c0, w - c1), (0, 0)))


class _ConcatConv3x3(nn.Module):
  """3x3 'SAME' conv of the per-scale feature maps concatenated on channels, each map brought to `grid` first.

  Parameters as nn.Conv(features, (3, 3)) over S * D channels. A map already on the grid goes through one
  convolution with its block of the kernel; another is projected per tap at its own resolution, then brought to
  the grid (`to_grid`, default the bilinear resize) and shifted into place.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], grid: tuple[int, int],
               to_grid: Sequence[ToGrid] | None = None) -> jax.Array:
    d = maps[0].shape[-1]
    kernel = self.param("kernel", nn.initializers.normal(0.005), (3, 3, len(maps) * d, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    out = bias
    for i, x in enumerate(maps):
      block = kernel[:, :, i * d:(i + 1) * d]
      x = x.astype(self.dtype)
      if to_grid is None and x.shape[1:3] == tuple(grid):
        out = out + lax.conv_general_dilated(x, block, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        continue
      bring = resizer(grid) if to_grid is None else to_grid[i]
      for ky in range(3):
        for kx in range(3):
          out = out + _shift(bring(jnp.einsum("bhwd,do->bhwo", x, block[ky, kx])), ky - 1, kx - 1)
    return out


class Fusion(nn.Module):
  """Fuses scores [B, H, W, S, C] over S scales; returns (fused [B, H, W, C], weights [B, H, W, S]).

  Every method takes the same fields, so one config serves any: `hidden` and `dropout_rate` shape the methods'
  heads (the methods without a head ignore them) and have no defaults (the paper: 512 and 0.5); `num_scales` is
  required where the parameters depend on S (not `scale_agnostic`) and checked against the input when given;
  `dtype` is the compute dtype (softmax and sigmoid are always float32). Give the fields by keyword.
  """
  hidden: int
  dropout_rate: float
  num_scales: int | None = None
  dtype: Any = jnp.float32

  method: ClassVar[str]  # its name in FUSIONS, set by `register`
  scale_agnostic: ClassVar[bool]  # its parameters depend neither on the number nor on the order of the scales
  parameter_free: ClassVar[bool]

  @nn.compact
  def __call__(self, scores: jax.Array, features: jax.Array | Sequence[jax.Array], *, train: bool,
               scales: Sequence[float] | None = None, to_grid: Sequence[ToGrid] | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """scores [B, H, W, S, C]; features [B, H, W, S, D] on the same grid, or a sequence of S maps [B, h_s, w_s, D]
    at the scales' own resolutions (the heads bring them to the grid; 'average' and 'max' ignore them).
    scales: the scale of each entry on the S axis; 'hierarchical' combines them from the highest down (default:
    the S axis is ordered from the highest scale to the lowest). to_grid: per map, how a map at its resolution is
    brought to the grid (default: the bilinear resize of the whole map; tiled inference passes the slice of that
    resize landing in a window)."""
    if not self.scale_agnostic and self.num_scales is None:
      raise ValueError(f"ScaleFusion({self.method!r}): num_scales is required (its parameters depend on the number "
                       "of scales)")
    maps = per_scale(features)
    shapes = [m.shape for m in maps]
    s = scores.shape[3] if scores.ndim == 5 else -1
    if (scores.ndim != 5 or self.num_scales not in (None, s) or len(maps) != s
        or any(len(sh) != 4 or sh[0] != scores.shape[0] or sh[3] != shapes[0][3] for sh in shapes)):
      raise ValueError(f"ScaleFusion: scores {scores.shape} and features {shapes}: expected scores [B, H, W, S, C] "
                       f"and features [B, H, W, S, D] or S maps [B, h_s, w_s, D], S = num_scales = {self.num_scales}")
    if scales is not None and len(scales) != s:
      raise ValueError(f"ScaleFusion: scales={tuple(scales)} for {s} score maps: expected one scale per map")
    return self.fuse(scores, maps, train=train, scales=scales, to_grid=to_grid)

  def fuse(self, scores: jax.Array, maps: list[jax.Array], *, train: bool, scales: Sequence[float] | None,
           to_grid: Sequence[ToGrid] | None) -> tuple[jax.Array, jax.Array]:
    """The method on checked inputs (`maps`: the S feature maps); each class defines it."""
    raise NotImplementedError(f"{type(self).__name__}.fuse")

  @nn.nowrap
  def head_layers(self, scores_shape: Shape, map_shapes: Sequence[Shape], scales: Sequence[float] | None
                  ) -> Counter[Layer]:
    """The convolutions the call runs on scores of `scores_shape` [B, H, W, S, C] and features of `map_shapes`
    (S maps [B, h_s, w_s, D]) at `scales`, each with how many times it runs; each class defines it."""
    raise NotImplementedError(f"{type(self).__name__}.head_layers")


class _Headed(Fusion):
  """Weights from a learned head: 'hidden' (3x3 conv to `hidden` channels, init normal std 0.005), ReLU, dropout
  in training, 'logits' (1x1 conv, std 0.01); zero biases, float32 parameters."""
  parameter_free = False

  def _head(self, outputs: int, train: bool) -> Head:
    """The head with `outputs` logits, as a function of (maps, grid, to_grid) to float32 [B, *grid, outputs]."""
    hidden = _ConcatConv3x3(self.hidden, dtype=self.dtype, name="hidden")
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    logits = nn.Conv(outputs, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="logits",
                     kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)
    return lambda maps, grid, bring: logits(dropout(nn.relu(hidden(maps, grid, bring)))).astype(jnp.float32)


def _softmax_fused(scores: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weights softmax_s(logits [B, H, W, S]) and the scores summed with them."""
  weights = jax.nn.softmax(logits, axis=-1).astype(scores.dtype)
  return jnp.einsum("bhws,bhwsc->bhwc", weights, scores), weights


@register("attention")
class AttentionFusion(_Headed):
  """The paper's: one head over the features of all scales concatenated, one logit per scale."""
  scale_agnostic = False

  def fuse(self, scores: jax.Array, maps: list[jax.Array], *, train: bool, scales: Sequence[float] | None,
           to_grid: Sequence[ToGrid] | None) -> tuple[jax.Array, jax.Array]:
    return _softmax_fused(scores, self._head(scores.shape[3], train)(maps, scores.shape[1:3], to_grid))

  @nn.nowrap
  def head_layers(self, scores_shape: Shape, map_shapes: Sequence[Shape], scales: Sequence[float] | None
                  ) -> Counter[Layer]:
    _, h, w, s, _ = scores_shape
    return Counter({Layer(h, w, s * map_shapes[0][3], self.hidden, 3, 1): 1, Layer(h, w, self.hidden, s, 1, 1): 1})


@register("shared_attention")
class SharedAttentionFusion(_Headed):
  """One head with one logit, run on each scale's features on the grid; softmax over the scales present."""
  scale_agnostic = True

  def fuse(self, scores: jax.Array, maps: list[jax.Array], *, train: bool, scales: Sequence[float] | None,
           to_grid: Sequence[ToGrid] | None) -> tuple[jax.Array, jax.Array]:
    head, grid = self._head(1, train), scores.shape[1:3]
    return _softmax_fused(scores, jnp.concatenate([head([m], grid, None if to_grid is None else [to_grid[i]])
                                                   for i, m in enumerate(maps)], axis=-1))

  @nn.nowrap
  def head_layers(self, scores_shape: Shape, map_shapes: Sequence[Shape], scales: Sequence[float] | None
                  ) -> Counter[Layer]:
    _, h, w, s, _ = scores_shape
    return Counter({Layer(h, w, map_shapes[0][3], self.hidden, 3, 1): s, Layer(h, w, self.hidden, 1, 1, 1): s})


@register("hierarchical")
class HierarchicalFusion(_Headed):
  """Tao et al.'s pairwise combination from the highest scale down; the head runs on each scale's own grid but the
  highest's."""
  scale_agnostic = True

  def fuse(self, scores: jax.Array, maps: list[jax.Array], *, train: bool, scales: Sequence[float] | None,
           to_grid: Sequence[ToGrid] | None) -> tuple[jax.Array, jax.Array]:
    """The combination and the per-scale weights it amounts to, each attention map brought to the scores' grid by
    `to_grid` (default the bilinear resize)."""
    s = scores.shape[3]
    head = self._head(1, train)
    to_grid = [resizer(scores.shape[1:3])] * s if to_grid is None else to_grid
    order = _highest_first(s, scales)
    fused = scores[:, :, :, order[0]]
    weights = jnp.zeros(scores.shape[:4], jnp.float32).at[..., order[0]].set(1.0)
    for i in order[1:]:
      a = to_grid[i](jax.nn.sigmoid(head([maps[i]], maps[i].shape[1:3], None)))  # [B, H, W, 1], as Tao et al.
      fused = a.astype(scores.dtype) * scores[:, :, :, i] + (1 - a).astype(scores.dtype) * fused
      weights = (1 - a) * weights
      weights = weights.at[..., i].add(a[..., 0])
    return fused, weights.astype(scores.dtype)

  @nn.nowrap
  def head_layers(self, scores_shape: Shape, map_shapes: Sequence[Shape], scales: Sequence[float] | None
                  ) -> Counter[Layer]:
    layers = Counter()
    for i in _highest_first(scores_shape[3], scales)[1:]:
      _, h, w, d = map_shapes[i]
      layers.update({Layer(h, w, d, self.hidden, 3, 1): 1, Layer(h, w, self.hidden, 1, 1, 1): 1})
    return layers


class _Pooling(Fusion):
  """A fixed rule on the scores: no parameters, no head, any set of scales."""
  scale_agnostic = True
  parameter_free = True

  @nn.nowrap
  def head_layers(self, scores_shape: Shape, map_shapes: Sequence[Shape], scales: Sequence[float] | None
                  ) -> Counter[Layer]:
    return Counter()


@register("average")
class AverageFusion(_Pooling):
  """w_i^s = 1 / S."""

  def fuse(self, scores: jax.Array, maps: list[jax.Array], *, train: bool, scales: Sequence[float] | None,
           to_grid: Sequence[ToGrid] | None) -> tuple[jax.Array, jax.Array]:
    b, h, w, s, _ = scores.shape
    return scores.mean(axis=3), jnp.full((b, h, w, s), 1.0 / s, scores.dtype)


@register("max")
class MaxFusion(_Pooling):
  """The maximum over the scales; weights: the one-hot of the scale holding the winning class's maximum."""

  def fuse(self, scores: jax.Array, maps: list[jax.Array], *, train: bool, scales: Sequence[float] | None,
           to_grid: Sequence[ToGrid] | None) -> tuple[jax.Array, jax.Array]:
    fused = scores.max(axis=3)
    winner = jnp.argmax(fused, axis=-1)[..., None, None]  # [B, H, W, 1, 1]
    at_winner = jnp.take_along_axis(scores, winner, axis=-1)[..., 0]  # [B, H, W, S]
    return fused, jax.nn.one_hot(jnp.argmax(at_winner, axis=-1), scores.shape[3], dtype=scores.dtype)

# The names by what the classes above declare, for callers that list them (config checks, launch scripts).
SCALE_AGNOSTIC = tuple(name for name, cls in FUSIONS.items() if cls.scale_agnostic)
PARAMETER_FREE = tuple(name for name, cls in FUSIONS.items() if cls.parameter_free)
