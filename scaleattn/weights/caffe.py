"""Caffe .caffemodel files (a serialised NetParameter) read without Caffe or compiled proto files.

Only what weights need is decoded, by field number (caffe.proto):
  NetParameter      name 1, layers 2 (V1LayerParameter), layer 100 (LayerParameter)
  V1LayerParameter  name 4, type 5 (enum: CONVOLUTION 4, INNER_PRODUCT 14, DECONVOLUTION 39), blobs 6
  LayerParameter    name 1, type 2 (string), blobs 7
  BlobProto         num 1, channels 2, height 3, width 4 (legacy shape), data 5 (float), double_data 8 (double),
                    shape 7 (BlobShape: dim 1, int64)
Repeated numbers may be packed or not (both are valid protobuf). Layers come out as flat names (see
`scaleattn.weights.sources`): Convolution/InnerProduct/Deconvolution 'weight' (shape as stored; the legacy 4-D shape
of an InnerProduct, [1, 1, O, I], becomes [O, I]) and 'bias' (1-D); BatchNorm 'mean' and 'variance' divided by
its scale factor (a zero factor gives zeros, as in Caffe); Scale 'gamma' and 'beta'; other layers '0', '1', ...
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from etils import epath

_V1_TYPES = {4: "Convolution", 14: "InnerProduct", 39: "Deconvolution"}
_WEIGHT_TYPES = ("Convolution", "InnerProduct", "Deconvolution")
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
# First tags a NetParameter can start with: name 1, layers 2, input 3 (bytes); input_dim 4, force_backward 5
# (varint); state 6, input_shape 8 (bytes); debug_info 7 (varint); layer 100 (bytes, two-byte tag).
_NET_FIRST_TAGS = (b"\x0a", b"\x12", b"\x1a", b"\x20", b"\x28", b"\x32", b"\x38", b"\x42", b"\xa2\x06")


class _Truncated(ValueError):
  """A field runs past the end of its message."""


def looks_like(head: bytes) -> bool:
  """Whether a file starting with `head` may be a caffemodel (the full read decides)."""
  return any(head.startswith(tag) for tag in _NET_FIRST_TAGS)


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    if pos >= end:
      raise _Truncated("varint past the end")
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, pos
    shift += 7
    if shift > 63:
      raise ValueError("varint longer than 10 bytes")


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
  """(field number, wire type, value start, value end) for each field of the message in buf[start:end]; a varint's
  value is decoded by the caller from its start."""
  pos = start
  while pos < end:
    key, pos = _varint(buf, pos, end)
    field, wire = key >> 3, key & 7
    if field == 0:
      raise ValueError(f"field number 0 at byte {pos}")
    if wire == _VARINT:
      _, stop = _varint(buf, pos, end)
    elif wire == _FIXED64:
      stop = pos + 8
    elif wire == _FIXED32:
      stop = pos + 4
    elif wire == _BYTES:
      length, pos = _varint(buf, pos, end)
      stop = pos + length
    else:
      raise ValueError(f"wire type {wire} (groups) at byte {pos}; caffe.proto has none")
    if stop > end:
      raise _Truncated(f"field {field} ends at byte {stop}, past its message's end {end}")
    yield field, wire, pos, stop
    pos = stop


def _unpacked_run(buf: memoryview, pos: int, end: int, tag: int, width: int, dtype: str) -> tuple[np.ndarray, int]:
  """Consecutive unpacked fixed-width values (tag byte + `width` bytes each) from the one at `pos` (just after its
  tag), read at once; returns them and the position after the run."""
  records = (end - pos + 1) // (width + 1)
  raw = np.frombuffer(buf, np.uint8, count=records * (width + 1), offset=pos - 1).reshape(records, width + 1)
  not_tag = np.flatnonzero(raw[:, 0] != tag)
  count = int(not_tag[0]) if not_tag.size else records
  return raw[:count, 1:].copy().view(dtype).ravel(), pos - 1 + count * (width + 1)


def _numbers(buf: memoryview, start: int, end: int, number: int, wire_width: int, dtype: str) -> np.ndarray:
  """Repeated fixed-width field `number` of a message, packed or not, as one array."""
  parts, pos = [], start
  tag_unpacked = (number << 3) | (_FIXED32 if wire_width == 4 else _FIXED64)
  while pos < end:
    key, value_pos = _varint(buf, pos, end)
    if key == tag_unpacked and number < 16:  # one-byte tag: read the whole run at once
      run, pos = _unpacked_run(buf, value_pos, end, key, wire_width, dtype)
      parts.append(run)
      continue
    field, wire, vstart, vstop = next(_fields(buf, pos, end))
    if field == number and wire == _BYTES:
      if (vstop - vstart) % wire_width:
        raise ValueError(f"packed field {number}: {vstop - vstart} bytes, not a multiple of {wire_width}")
      parts.append(np.frombuffer(buf[vstart:vstop], dtype).copy())
    elif field == number:
      raise ValueError(f"field {number}: wire type {wire}, expected packed or fixed-width numbers")
    pos = vstop
  native = np.dtype(dtype).newbyteorder("=")
  return np.concatenate(parts).astype(native) if parts else np.zeros(0, native)


def _blob(buf: memoryview, start: int, end: int) -> np.ndarray:
  legacy, dims, floats, doubles = {}, None, False, False
  for field, wire, vstart, vstop in _fields(buf, start, end):
    if field in (1, 2, 3, 4) and wire == _VARINT:
      legacy[field] = _varint(buf, vstart, vstop)[0]
    elif field == 7 and wire == _BYTES:
      dims = []
      for f, w, s, e in _fields(buf, vstart, vstop):
        if f != 1:
          continue
        if w == _VARINT:
          dims.append(_varint(buf, s, e)[0])
        else:  # packed varints
          p = s
          while p < e:
            d, p = _varint(buf, p, e)
            dims.append(d)
    elif field == 5:
      floats = True
    elif field == 8:
      doubles = True
  if doubles and floats:
    raise ValueError("a blob with both float and double data")
  data = _numbers(buf, start, end, 8, 8, "<f8") if doubles else _numbers(buf, start, end, 5, 4, "<f4")
  if dims is None:
    dims = [legacy.get(i, 0) for i in (1, 2, 3, 4)] if legacy else [data.size]
  shape = tuple(int(d) for d in dims)
  if int(np.prod(shape)) != data.size:
    raise ValueError(f"a blob of shape {shape} holds {data.size} values")
  return data.reshape(shape)


def _layer(buf: memoryview, start: int, end: int, v1: bool) -> tuple[str, str, list[np.ndarray]]:
  name_field, type_field, blobs_field = (4, 5, 6) if v1 else (1, 2, 7)
  name, kind, blobs = "", "", []
  for field, wire, vstart, vstop in _fields(buf, start, end):
    if field == name_field and wire == _BYTES:
      name = bytes(buf[vstart:vstop]).decode("utf-8", "replace")
    elif field == type_field and v1 and wire == _VARINT:
      code = _varint(buf, vstart, vstop)[0]
      kind = _V1_TYPES.get(code, f"V1 type {code}")
    elif field == type_field and not v1 and wire == _BYTES:
      kind = bytes(buf[vstart:vstop]).decode("utf-8", "replace")
    elif field == blobs_field and wire == _BYTES:
      blobs.append(_blob(buf, vstart, vstop))
  return name, kind, blobs


def _named_arrays(name: str, kind: str, blobs: list[np.ndarray]) -> dict[str, np.ndarray]:
  """A layer's blobs under the names of the module docstring."""
  if kind in _WEIGHT_TYPES:
    weight = blobs[0]
    if kind == "InnerProduct" and weight.ndim == 4 and weight.shape[:2] == (1, 1):
      weight = weight.reshape(weight.shape[2:])
    out = {f"{name}/weight": weight}
    if len(blobs) > 1:
      out[f"{name}/bias"] = blobs[1].reshape(-1)
    return out
  if kind == "BatchNorm":
    if len(blobs) != 3 or blobs[2].size != 1:
      raise ValueError(f"BatchNorm layer {name!r}: expected blobs mean, variance and a 1-element scale factor, got "
                       f"shapes {[b.shape for b in blobs]}")
    factor = float(blobs[2].reshape(()))
    scale = 0.0 if factor == 0 else 1.0 / factor
    return {f"{name}/mean": blobs[0].reshape(-1) * scale, f"{name}/variance": blobs[1].reshape(-1) * scale}
  if kind == "Scale":
    return dict(zip((f"{name}/gamma", f"{name}/beta"), (b.reshape(-1) for b in blobs), strict=False))
  return {f"{name}/{i}": b for i, b in enumerate(blobs)}


def parse(data: bytes, source: str) -> dict[str, np.ndarray]:
  """The arrays of a serialised NetParameter; `source` names it in errors."""
  buf = memoryview(data)
  state: dict[str, np.ndarray] = {}
  layers = 0
  try:
    for field, wire, vstart, vstop in _fields(buf, 0, len(buf)):
      if field in (2, 100) and wire == _BYTES:
        name, kind, blobs = _layer(buf, vstart, vstop, v1=field == 2)
        layers += 1
        if not blobs:
          continue
        if not name:
          raise ValueError(f"layer {layers} has weights but no name")
        arrays = _named_arrays(name, kind, blobs)
        if any(k in state for k in arrays):
          raise ValueError(f"two layers named {name!r} hold weights")
        state.update(arrays)
  except _Truncated as e:
    raise ValueError(f"{source}: truncated or not a caffemodel ({e})") from e
  except ValueError as e:
    raise ValueError(f"{source}: not a readable caffemodel: {e}") from e
  if not state:
    raise ValueError(f"{source}: not a caffemodel with weights ({layers} layers, none with blobs)")
  return state


def read(path: str) -> dict[str, np.ndarray]:
  """The arrays of the caffemodel at `path` (see the module docstring for their names)."""
  return parse(epath.Path(path).read_bytes(), path)
