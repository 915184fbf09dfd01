"""Permutohedral-lattice Gaussian filter (Adams, Baek & Davis 2010), jit-compatible with static shapes.

out_i ~ sum_j exp(-|f_i - f_j|^2 / 2) values_j for features f [N, d] already divided by the kernel's stds. As in
Kraehenbuehl's densecrf (permutohedral.cpp, whose conventions this follows), each feature vector is elevated into
the hyperplane x_0 + ... + x_d = 0 of R^{d+1} (scaled so that the lattice blur below has the kernel's unit std),
splatted onto the d + 1 vertices of its enclosing simplex with barycentric weights, blurred with [1, 2, 1] along
each of the d + 1 lattice directions, and sliced back with the same weights. Only lattice points that some pixel
touches exist (the lattice is sparse); blur neighbours that do not exist read zero, as in densecrf.

Static shapes. A lattice point's d integer coordinates are packed into one uint32 key; the keys of all N (d + 1)
vertices go into a hash table built on the device (`lattice_keys`), which numbers the distinct ones, and each
point's 2 (d + 1) blur neighbours are looked up in it. The number of distinct points (`Keys.count`) depends on
the data; the arrays are sized for a static `capacity`. `capacities` gives the sizes to compile for: the smallest
one that holds the image's lattice is chosen at run time (lax.switch), as sizing every image for the worst case,
N (d + 1) points, makes the blur and the splat's buffers several times larger than the lattices of real images
(N / 5 to N / 6 points on the 513x513 synthetic images of launch/crf_reference.py with DeepLab's bilateral stds).
The hash table is sized for the worst case (8 bytes per slot, 1.5 to 3 slots per vertex): about 32 MB for a
513x513 image's appearance lattice, held while the CRF runs.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_ABSENT = np.uint32(np.iinfo(np.uint32).max)  # the key of absent pixels (valid=False), above every lattice point's


def elevation_matrix(d: int) -> np.ndarray:
  """[d + 1, d]: features (in stds) to the hyperplane coordinates; densecrf's E, scaled by sqrt(2/3) (d + 1) so
  the lattice's [1, 2, 1] blur along the d + 1 directions has the unit std of the target kernel (Adams et al. p.6)."""
  scale = math.sqrt(2.0 / 3.0) * (d + 1) / np.sqrt((np.arange(d) + 1.0) * (np.arange(d) + 2.0))
  e = np.zeros((d + 1, d))
  for j in range(d + 1):
    e[j, j:] = scale[j:]
    if j > 0:
      e[j, j - 1] = -j * scale[j - 1]
  return e


class KeyLayout(NamedTuple):
  """How d lattice coordinates pack into one uint32 (mixed radix). All coordinates of a lattice point are congruent
  mod d + 1, so the first is stored whole and the others divided by d + 1: lower[0] + digit 0 is coordinate 0,
  (lower[i] + digit i) (d + 1) + (coordinate 0 mod d + 1) is coordinate i."""
  lower: tuple[int, ...]
  radix: tuple[int, ...]

  @property
  def size(self) -> int:
    return math.prod(self.radix)


def key_layout(bounds: tuple[tuple[float, float], ...]) -> KeyLayout:
  """The layout for features within `bounds` ((low, high) per feature, in stds): every vertex of every enclosing
  simplex and all their blur neighbours get distinct keys below the absent pixels' key."""
  d = len(bounds)
  e = elevation_matrix(d)
  low = np.asarray([b[0] for b in bounds], np.float64)
  high = np.asarray([b[1] for b in bounds], np.float64)
  lo = np.minimum(e * low, e * high).sum(axis=1)
  hi = np.maximum(e * low, e * high).sum(axis=1)
  # A vertex is the rounded elevation (to a multiple of d + 1, moved by up to d + 1 onto the plane) plus a
  # canonical offset of at most d; a neighbour is at most d further: 4 (d + 1) covers all three.
  margin = 4 * (d + 1)
  lower = [int(math.floor(lo[0])) - margin]
  radix = [int(math.ceil(hi[0])) + margin - lower[0] + 1]
  for i in range(1, d):
    first, last = (int(math.floor(lo[i])) - margin) // (d + 1), (int(math.ceil(hi[i])) + margin) // (d + 1)
    lower.append(first)
    radix.append(last - first + 1)
  layout = KeyLayout(tuple(lower), tuple(radix))
  if layout.size >= int(_ABSENT):
    raise ValueError(f"permutohedral lattice keys for feature bounds {bounds}: {layout.size} possible lattice points "
                     f"do not fit a uint32 key (expected < {_ABSENT}); use larger stds or another filter")
  return layout


def _pack(coords: jax.Array, layout: KeyLayout) -> jax.Array:
  """[..., d] int32 lattice coordinates -> [...] uint32 keys."""
  d = coords.shape[-1]
  key = jnp.zeros(coords.shape[:-1], jnp.uint32)
  for i in reversed(range(1, d)):
    digit = jnp.floor_divide(coords[..., i], d + 1) - layout.lower[i]
    key = key * np.uint32(layout.radix[i]) + digit.astype(jnp.uint32)
  return key * np.uint32(layout.radix[0]) + (coords[..., 0] - layout.lower[0]).astype(jnp.uint32)


def _unpack(key: jax.Array, layout: KeyLayout) -> jax.Array:
  """[...] uint32 keys -> [..., d] int32 lattice coordinates (the inverse of _pack)."""
  d = len(layout.radix)
  first = (key % np.uint32(layout.radix[0])).astype(jnp.int32) + layout.lower[0]
  key = key // np.uint32(layout.radix[0])
  remainder = first % (d + 1)
  coords = [first]
  for i in range(1, d):
    digit = (key % np.uint32(layout.radix[i])).astype(jnp.int32)
    coords.append((digit + layout.lower[i]) * (d + 1) + remainder)
    key = key // np.uint32(layout.radix[i])
  return jnp.stack(coords, axis=-1)


def _computed_once(columns: list[jax.Array]) -> list[jax.Array]:
  """The same [N] float32 columns, materialised: XLA CPU otherwise fuses their (long) expressions into every
  consumer and recomputes them there, which made the simplex search 3x slower. A dot with the identity is exact
  for finite values (each output is one product by 1 plus products by 0; the features are clipped to their bounds)
  and is not fused into its consumers; XLA CPU drops optimization barriers before fusing."""
  m = jnp.stack(columns, axis=-1)
  m = jnp.dot(m, jnp.eye(m.shape[-1], dtype=m.dtype), precision=jax.lax.Precision.HIGHEST)
  return [m[:, k] for k in range(m.shape[-1])]


def _enclosing_simplex(features: jax.Array) -> tuple[jax.Array, jax.Array]:
  """features [N, d] -> (vertex coordinates [N, d + 1, d] int32, barycentric weights [N, d + 1]): densecrf's
  Permutohedral::init, vectorised over pixels. Written with one [N] vector per coordinate, as densecrf's loops: with
  [N, d + 1, d + 1] comparisons and reductions XLA CPU ran this part 10x slower."""
  d = features.shape[1]
  e = elevation_matrix(d)
  f = [features[:, k] for k in range(d)]
  elevated = [sum(float(e[j, k]) * f[k] for k in range(d) if e[j, k] != 0.0) for j in range(d + 1)]
  nearest = [jnp.round(x / (d + 1)) * (d + 1) for x in elevated]  # the closest remainder-0 point, per coordinate
  off_plane = jnp.round(sum(nearest) / (d + 1)).astype(jnp.int32)
  residual = [x - y for x, y in zip(elevated, nearest, strict=True)]
  # rank_i: how many coordinates have a larger residual (ties broken by index, as densecrf does), plus off_plane.
  rank = [off_plane] * (d + 1)
  for i in range(d + 1):
    for j in range(i + 1, d + 1):
      i_smaller = (residual[i] < residual[j]).astype(jnp.int32)
      rank[i], rank[j] = rank[i] + i_smaller, rank[j] + 1 - i_smaller
  wrap = [(r < 0).astype(jnp.int32) - (r > d).astype(jnp.int32) for r in rank]  # back onto the plane
  nearest = [x + (d + 1) * w.astype(jnp.float32) for x, w in zip(nearest, wrap, strict=True)]
  rank = [(r + (d + 1) * w).astype(jnp.float32) for r, w in zip(rank, wrap, strict=True)]
  v = [(x - y) / (d + 1) for x, y in zip(elevated, nearest, strict=True)]
  once = _computed_once(rank + nearest + v)
  rank, nearest, v = [r.astype(jnp.int32) for r in once[:d + 1]], once[d + 1:2 * d + 2], once[2 * d + 2:]
  # densecrf adds v_i at slot d - rank_i and subtracts it at d - rank_i + 1 (slot d + 1 wraps onto slot 0, plus 1):
  # with s_k the v of the coordinate of rank k, slot m gets s_(d - m) - s_(d - m + 1).
  s = [sum(jnp.where(rank[i] == k, v[i], 0.0) for i in range(d + 1)) for k in range(d + 1)]
  barycentric = [s[d] + 1.0 - s[0]] + [s[d - m] - s[d - m + 1] for m in range(1, d + 1)]
  # Vertex r: coordinate i is nearest_i + r if rank_i <= d - r, else nearest_i + r - (d + 1).
  coords = jnp.stack([jnp.stack([nearest[i].astype(jnp.int32) + r - (d + 1) * (rank[i] > d - r).astype(jnp.int32)
                                 for i in range(d)], axis=-1) for r in range(d + 1)], axis=1)
  return coords, jnp.stack(barycentric, axis=-1)


class Lattice(NamedTuple):
  """One image's lattice at a static capacity K; index K is an always-zero slot (missing neighbours, absent
  pixels)."""
  vertex: jax.Array  # [N, d + 1] int32: the lattice point of each simplex vertex of each pixel
  weight: jax.Array  # [N, d + 1] float32: its barycentric weight (0 for absent pixels)
  neighbours: jax.Array  # [d + 1, 2, K + 1] int32: each point's neighbour one step back / forward per direction


class Keys(NamedTuple):
  """The capacity-independent part of a lattice: every pixel vertex's key, and the distinct keys in a hash table
  (open addressing, linear probing) that numbers them."""
  key: jax.Array  # [N, d + 1] uint32 (the absent pixels' key for absent pixels)
  weight: jax.Array  # [N, d + 1] float32 barycentric weights (0 for absent pixels)
  point: jax.Array  # [N, d + 1] int32: the lattice point (number of the key) of each vertex, -1 for absent pixels
  table: jax.Array  # [T] uint32: the distinct keys of present pixels, at their slots; _ABSENT where free
  number: jax.Array  # [T] int32: the number of the key in each slot (slots in order)
  count: jax.Array  # int32: distinct keys of present pixels (lattice points)
  probes: jax.Array  # int32: the most slots an insertion visited; a lookup of a stored key visits no more


def _hash_slots(key: jax.Array, size: int) -> jax.Array:
  """Fibonacci hashing of uint32 keys onto [0, size), size a power of two."""
  return ((key * np.uint32(2654435761)) >> np.uint32(32 - size.bit_length() + 1)).astype(jnp.int32)


def _table_size(entries: int) -> int:
  """A power of two at least 1.5 times `entries` (and 2): every vertex's key could be distinct."""
  return 1 << max(math.ceil(math.log2(1.5 * max(entries, 1))), 1)


def lattice_keys(features: jax.Array, valid: jax.Array, layout: KeyLayout) -> Keys:
  """features [N, d] in stds, within the bounds the layout was made for; valid [N] bool.

  The distinct keys are found with a hash table built on the device: in each round every key not yet stored tries
  its current slot, the smallest key wins a free slot, and the others move to the next slot. Keys that are equal
  probe alike, so they end in the same slot. On XLA CPU this was 2.4x faster than sorting the keys and searching
  each vertex's key among them."""
  coords, weight = _enclosing_simplex(features.astype(jnp.float32))
  keys = jnp.where(valid[:, None], _pack(coords, layout), _ABSENT)
  flat = keys.reshape(-1)
  size = _table_size(flat.shape[0])

  def unstored(carry):
    return jnp.any(~carry[2])

  def insert_round(carry):
    table, slot, stored, rounds = carry
    free = ~stored & (table[slot] == _ABSENT)
    table = table.at[jnp.where(free, slot, size)].min(flat, mode="drop")
    stored = stored | (table[slot] == flat)
    return table, jnp.where(stored, slot, (slot + 1) & (size - 1)), stored, rounds + 1

  # The first round outside the loop: the carry then varies as the keys do under shard_map.
  first = insert_round((jnp.full(size, _ABSENT, jnp.uint32), _hash_slots(flat, size), flat == _ABSENT, 0))
  table, slot, _, rounds = jax.lax.while_loop(unstored, insert_round, first)
  occupied = table != _ABSENT
  number = jnp.cumsum(occupied.astype(jnp.int32)) - 1
  point = jnp.where(flat == _ABSENT, -1, number[slot]).reshape(keys.shape)
  return Keys(keys, jnp.where(valid[:, None], weight, 0.0), point, table, number,
              jnp.sum(occupied).astype(jnp.int32), jnp.asarray(rounds, jnp.int32))


def _find(keys: Keys, query: jax.Array) -> jax.Array:
  """[Q] uint32 keys -> their numbers, -1 where not in the table (a query equal to _ABSENT, the free slots' mark,
  would read a free slot's meaningless number: lattice points' keys are all below it)."""
  size = keys.table.shape[0]

  def probe(_, carry):
    slot, found = carry
    found = jnp.where((found < 0) & (keys.table[slot] == query), keys.number[slot], found)
    return (slot + 1) & (size - 1), found

  slot = _hash_slots(query, size)  # the first probe outside the loop, as in lattice_keys
  first = ((slot + 1) & (size - 1), jnp.where(keys.table[slot] == query, keys.number[slot], -1))
  return jax.lax.fori_loop(1, keys.probes, probe, first)[1]


def with_capacity(keys: Keys, layout: KeyLayout, capacity: int) -> Lattice:
  """The lattice of `keys` sized for `capacity` points; correct only if keys.count <= capacity."""
  d = len(layout.radix)
  occupied = (keys.table != _ABSENT) & (keys.number < capacity)
  unique = jnp.full(capacity, _ABSENT, jnp.uint32).at[jnp.where(occupied, keys.number, capacity)].set(
      keys.table, mode="drop")
  coords = _unpack(unique, layout)  # [K, d]
  present = jnp.arange(capacity) < keys.count
  neighbours = []
  for j in range(d + 1):
    step = np.full(d, -1, np.int32)  # one step along direction j: -1 on every coordinate, +d on coordinate j
    if j < d:
      step[j] = d
    pair = []
    for sign in (-1, 1):
      found = _find(keys, _pack(coords + sign * step, layout))
      pair.append(jnp.concatenate([jnp.where(present & (found >= 0) & (found < capacity), found, capacity),
                                   jnp.full(1, capacity, jnp.int32)]))
    neighbours.append(jnp.stack(pair))
  # Points past the capacity (possible only if the caller chose it too small) read and write the zero slot.
  vertex = jnp.where((keys.point < 0) | (keys.point >= capacity), capacity, keys.point)
  return Lattice(vertex, keys.weight, jnp.stack(neighbours))


def apply(lattice: Lattice, values: jax.Array) -> jax.Array:
  """values [N, C] -> [N, C]: splat, blur, slice. Unscaled: densecrf's [1, 2, 1] blur (gain 2 per direction) and
  slice factor 1 / (1 + 2^-d): proportional to the Gaussian filter, by a factor that depends on the data (blur
  mass that reaches missing lattice points is lost), which normalized messages divide out."""
  n, c = values.shape
  d = lattice.vertex.shape[1] - 1
  size = lattice.neighbours.shape[-1]
  values = values.astype(jnp.float32)
  # XLA CPU's speed depends on the formulation (one 513x513 image, 21 classes): a loop over the vertices ran 1.9x
  # faster than one [N (d + 1), C] scatter; a loop over the directions with two gathers ran over 10x faster than
  # one gather of both neighbours or the directions unrolled.

  def splat(r: int, grid: jax.Array) -> jax.Array:
    return grid.at[lattice.vertex[:, r]].add(lattice.weight[:, r, None] * values, mode="promise_in_bounds")

  def blur(j: int, grid: jax.Array) -> jax.Array:
    back, forward = lattice.neighbours[j]
    return grid + 0.5 * (grid.at[back].get(mode="promise_in_bounds") + grid.at[forward].get(mode="promise_in_bounds"))

  # The first vertex outside the loop: the carry then varies as the values do under shard_map.
  grid = jax.lax.fori_loop(1, d + 1, splat, splat(0, jnp.zeros((size, c), jnp.float32)))
  grid = jax.lax.fori_loop(0, d + 1, blur, grid)
  alpha = 1.0 / (1.0 + 2.0 ** -d)
  return alpha * sum(lattice.weight[:, r:r + 1] * grid.at[lattice.vertex[:, r]].get(mode="promise_in_bounds")
                     for r in range(d + 1))


def capacities(n: int, d: int, layout: KeyLayout) -> tuple[int, ...]:
  """The lattice sizes compiled for, smallest first: N / 4 points (see the module docstring) and the most there
  can be, N (d + 1) or the number of distinct keys; one size when the most is at most N / 2."""
  full = min(n * (d + 1), layout.size)
  small = -(-n // 4)
  return (full,) if full <= 2 * small else (small, full)


def switch_capacity(keys: Keys, options: tuple[int, ...]) -> jax.Array:
  """Index of the smallest capacity in `options` that holds the lattice."""
  return jnp.searchsorted(jnp.asarray(options, jnp.int32), keys.count).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="bounds")
def permutohedral_filter(values: jax.Array, features: jax.Array, valid: jax.Array,
                         bounds: tuple[tuple[float, float], ...]) -> jax.Array:
  """values [N, C], features [N, d] (divided by the stds, within `bounds`: (low, high) per feature), valid [N]
  -> [N, C], proportional to sum_j exp(-|f_i - f_j|^2 / 2) values_j over present pixels j (see apply).

  One lattice per call; dense_crf builds its lattices once per image and reuses them in every iteration."""
  n, d = features.shape
  layout = key_layout(bounds)
  keys = lattice_keys(features, valid, layout)
  options = capacities(n, d, layout)
  branches = [functools.partial(lambda k: apply(with_capacity(keys, layout, k), values), k) for k in options]
  return jax.lax.switch(switch_capacity(keys, options), branches)
