"""Convolutions in the pieces XLA:CPU runs fastest; each computes exactly what `lax.conv_general_dilated` computes.

Chosen by `config.model.conv_impl='auto'` on a CPU mesh (or 'cpu', asked for by name). Measurements behind the
thresholds are in the README's performance section.
- Winograd F(2x2, 3x3) for float32 3x3 convolutions with 128+ channels on maps below 200x200 (a dilated one runs on
  its dilation phases): 16 multiplies per 2x2 output tile instead of 36, as 16 batched matmuls between elementwise
  transforms, for the forward pass, the input gradient and (below 120x120) the weight gradient.
- Weight gradient in row strips on large maps: XLA:CPU's weight gradient of one large convolution is slower than
  the sum of the strips' (each strip with its halo).
- Dilated convolutions whose taps mostly read padding (fc6) as per-tap matmuls over the valid overlap only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

STRIP_ROWS = 20  # rows per weight-gradient strip
MIN_STRIP_PIXELS = 120 * 120  # maps smaller than this keep XLA's single weight-gradient convolution
MAX_VALID_FRACTION = 0.8  # per-tap matmuls when the taps' valid overlap is below this share of the full work
MIN_WINOGRAD_CHANNELS = 128  # Winograd for 3x3 convolutions with at least this many input and output channels
MAX_WINOGRAD_PIXELS = 200 * 200  # ... on maps smaller than this (larger maps: its transforms cost what it saves)


def _conv(x: jax.Array, w: jax.Array, dilation: int, padding) -> jax.Array:
  return lax.conv_general_dilated(x, w, (1, 1), padding, rhs_dilation=(dilation, dilation),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _tap_ranges(n: int, kernel: int, dilation: int) -> list[tuple[int, int, int]]:
  """(offset, first, end) per tap along one axis: output positions first..end-1 read input position + offset."""
  offsets = [(k - kernel // 2) * dilation for k in range(kernel)]
  return [(o, max(0, -o), min(n, n - o)) for o in offsets]


def valid_fraction(height: int, width: int, kernel: int, dilation: int) -> float:
  """Share of a 'SAME' convolution's multiply-adds that do not read the zero padding."""
  rows = sum(max(0, end - first) for _, first, end in _tap_ranges(height, kernel, dilation))
  cols = sum(max(0, end - first) for _, first, end in _tap_ranges(width, kernel, dilation))
  return rows * cols / (kernel * height * kernel * width)


def conv_by_taps(x: jax.Array, w: jax.Array, dilation: int) -> jax.Array:
  """'SAME' convolution as one matmul per kernel tap over the output region whose input is in the image."""
  _, h, wd, _ = x.shape
  kh, kw = w.shape[:2]
  out = None
  for ky, (oy, r0, r1) in enumerate(_tap_ranges(h, kh, dilation)):
    for kx, (ox, c0, c1) in enumerate(_tap_ranges(wd, kw, dilation)):
      if r0 >= r1 or c0 >= c1:
        continue
      part = jnp.einsum("bhwc,co->bhwo", x[:, r0 + oy:r1 + oy, c0 + ox:c1 + ox], w[ky, kx])
      part = jnp.pad(part, ((0, 0), (r0, h - r1), (c0, wd - c1), (0, 0)))
      out = part if out is None else out + part
  return out


def _weight_grad(x: jax.Array, w: jax.Array, g: jax.Array, dilation: int, strips: int) -> jax.Array:
  """d<conv(x, w), g>/dw, as the sum of `strips` row strips' weight gradients (each strip with its halo)."""
  pad = dilation * (w.shape[0] // 2)
  rows = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0)))
  edges = np.linspace(0, x.shape[1], strips + 1).astype(int)
  dw = None
  for a, b in zip(edges[:-1], edges[1:], strict=True):
    strip = rows[:, a:b + 2 * pad]  # output rows a..b-1 read these input rows, halo included
    (part,) = jax.vjp(lambda w_, s=strip: _conv(s, w_, dilation, ((0, 0), (pad, pad))), w)[1](g[:, a:b])
    dw = part if dw is None else dw + part
  return dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_strip_wgrad(x: jax.Array, w: jax.Array, dilation: int, strips: int) -> jax.Array:
  return _conv(x, w, dilation, "SAME")


def _strip_fwd(x, w, dilation, strips):
  return _conv(x, w, dilation, "SAME"), (x, w)


def _strip_bwd(dilation, strips, residuals, g):
  x, w = residuals
  (dx,) = jax.vjp(lambda x_: _conv(x_, w, dilation, "SAME"), x)[1](g)
  return dx, _weight_grad(x, w, g, dilation, strips)


_conv_strip_wgrad.defvjp(_strip_fwd, _strip_bwd)

# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): each 2x2 output tile from a 4x4 input tile with 16 multiplies per
# channel pair instead of 36. Y = A^T [(G w G^T) * (B^T d B)] A, the products summed over input channels.
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
_G_FLIP = [3, 1, 2, 0]  # G applied to a reversed kernel = G's rows 0 and 3 swapped


def _sandwich(left: np.ndarray, grid: list[list], right: np.ndarray) -> list[list]:
  """left @ grid @ right^T for small constant matrices and a grid of arrays, as explicit sums without zero terms."""
  def mix(matrix, parts):
    return [sum(float(c) * p for c, p in zip(row, parts, strict=True) if c) for row in matrix]
  cols = [mix(left, [row[j] for row in grid]) for j in range(len(grid[0]))]  # cols[j][k]
  return [mix(right, [col[k] for col in cols]) for k in range(left.shape[0])]


def _sandwich_stacked(left: np.ndarray, grid: list[list], right: np.ndarray) -> jax.Array:
  """`_sandwich` with its entries stacked row-major along a new leading axis."""
  return jnp.stack([e for row in _sandwich(left, grid, right) for e in row])


def winograd_kernel(w: jax.Array) -> jax.Array:
  """G w G^T per channel pair: [3, 3, Cin, Cout] -> [16, Cin, Cout]."""
  return _sandwich_stacked(_G, [[w[i, j] for j in range(3)] for i in range(3)], _G)


def _tile_counts(x: jax.Array) -> tuple[int, int]:
  return -(-x.shape[1] // 2), -(-x.shape[2] // 2)


def _input_transform(x: jax.Array) -> jax.Array:
  """B^T d B for every 4x4 input tile d (stride 2, 'SAME' padding): [B, H, W, C] -> [16, tiles, C]."""
  b, h, wd, c = x.shape
  th, tw = _tile_counts(x)
  xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - wd), (0, 0)))
  tiles = [[xp[:, i:i + 2 * th:2, j:j + 2 * tw:2] for j in range(4)] for i in range(4)]  # tile element (i, j)
  return _sandwich_stacked(_BT, tiles, _BT).reshape(16, b * th * tw, c)


def winograd_conv(x: jax.Array, u: jax.Array, transposed: bool = False) -> jax.Array:
  """'SAME' 3x3 convolution of x [B, H, W, Cin] with a transformed kernel u [16, Cin, Cout] (or [16, Cout, Cin]
  with `transposed`, contracting u's last axis)."""
  b, h, wd, _ = x.shape
  th, tw = _tile_counts(x)
  m = jnp.einsum("ktc,koc->kto" if transposed else "ktc,kco->kto", _input_transform(x), u)
  m = m.reshape(4, 4, b, th, tw, m.shape[-1])
  out = _sandwich(_AT, [[m[k, l] for l in range(4)] for k in range(4)], _AT)  # out[a][c]: [B, th, tw, Cout]
  y = jnp.stack([jnp.stack(row, axis=3) for row in out], axis=2)  # [B, th, 2, tw, 2, Cout]
  return y.reshape(b, 2 * th, 2 * tw, -1)[:, :h, :wd]


def winograd_weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """d<conv(x, w), g>/dw in the Winograd domain: G^T [sum over tiles of (B^T d B)^T (A g A^T)] G."""
  b, h, wd, _ = x.shape
  th, tw = _tile_counts(x)
  gp = jnp.pad(g, ((0, 0), (0, 2 * th - h), (0, 2 * tw - wd), (0, 0)))
  g_tiles = [[gp[:, a::2, c::2] for c in range(2)] for a in range(2)]  # output tile element (a, c)
  dm = _sandwich_stacked(_AT.T, g_tiles, _AT.T).reshape(16, b * th * tw, -1)
  du = jnp.einsum("ktc,kto->kco", _input_transform(x), dm)
  return _sandwich_stacked(_G.T, [[du[4 * k + l] for l in range(4)] for k in range(4)], _G.T).reshape(3, 3, *du.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_winograd(x: jax.Array, w: jax.Array, strips: int) -> jax.Array:
  return winograd_conv(x, winograd_kernel(w))


def _winograd_fwd(x, w, strips):
  u = winograd_kernel(w)
  return winograd_conv(x, u), (x, w, u)


def _winograd_bwd(strips, residuals, g):
  """The input gradient is the convolution of g with the reversed, transposed kernel, whose transform is u's tiles
  permuted (read transposed). The weight gradient is Winograd's too (strips=0), or XLA's in row strips: on maps
  of 120x120 and more the strips are faster."""
  x, w, u = residuals
  u_flipped = jnp.stack([u[4 * _G_FLIP[k] + _G_FLIP[l]] for k in range(4) for l in range(4)])
  dw = winograd_weight_grad(x, g) if strips == 0 else _weight_grad(x, w, g, 1, strips)
  return winograd_conv(g, u_flipped, transposed=True), dw


_conv_winograd.defvjp(_winograd_fwd, _winograd_bwd)


def _to_phases(x: jax.Array, d: int) -> jax.Array:
  """[B, H, W, C] -> [B*d*d, ceil(H/d), ceil(W/d), C]: a dilation-d convolution is a plain one on each phase."""
  b, h, wd, c = x.shape
  hp, wp = -(-h // d), -(-wd // d)
  x = jnp.pad(x, ((0, 0), (0, hp * d - h), (0, wp * d - wd), (0, 0)))
  return x.reshape(b, hp, d, wp, d, c).transpose(0, 2, 4, 1, 3, 5).reshape(b * d * d, hp, wp, c)


def _from_phases(y: jax.Array, d: int, h: int, wd: int) -> jax.Array:
  _, hp, wp, c = y.shape
  y = y.reshape(-1, d, d, hp, wp, c).transpose(0, 3, 1, 4, 2, 5).reshape(-1, hp * d, wp * d, c)
  return y[:, :h, :wd]


def choose(x_shape: tuple[int, ...], w_shape: tuple[int, ...], dilation: int, dtype) -> str:
  """Which form `conv2d` runs for these shapes: 'matmul' (1x1), 'taps', 'winograd', 'winograd_phases' (dilated),
  'strips' or 'xla'."""
  h, wd = x_shape[1:3]
  if tuple(w_shape[:2]) == (1, 1):
    return "matmul"
  if valid_fraction(h, wd, w_shape[0], dilation) < MAX_VALID_FRACTION:
    return "taps"
  if (tuple(w_shape[:2]) == (3, 3) and min(w_shape[2:]) >= MIN_WINOGRAD_CHANNELS and h * wd < MAX_WINOGRAD_PIXELS
          and jnp.dtype(dtype) == jnp.float32):
    return "winograd" if dilation == 1 else "winograd_phases"
  return "strips" if h * wd >= MIN_STRIP_PIXELS else "xla"


def conv2d(x: jax.Array, w: jax.Array, dilation: int = 1) -> jax.Array:
  """x [B, H, W, Cin] * w [k, k, Cin, Cout] with 'SAME' padding and `dilation`, in the form XLA:CPU runs fastest."""
  h, wd = x.shape[1:3]
  form = choose(x.shape, w.shape, dilation, x.dtype)
  strips = max(1, h // STRIP_ROWS) if h * wd >= MIN_STRIP_PIXELS else 0
  if form == "matmul":
    return jnp.einsum("bhwc,co->bhwo", x, w[0, 0])
  if form == "taps":
    return conv_by_taps(x, w, dilation)
  if form == "winograd":
    return _conv_winograd(x, w, strips)
  if form == "winograd_phases":
    return _from_phases(_conv_winograd(_to_phases(x, dilation), w, 0), dilation, h, wd)
  if form == "strips":
    return _conv_strip_wgrad(x, w, dilation, strips)
  return _conv(x, w, dilation, "SAME")
