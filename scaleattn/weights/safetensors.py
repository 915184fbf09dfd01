"""`.safetensors` files read by hand: an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets into the data that follows), then the raw little-endian data. No code runs, so any such file is safe."""
from __future__ import annotations

import json
import struct

import numpy as np
from etils import epath

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U8": "u1", "BOOL": "?"}
_MAX_HEADER = 100_000_000


def looks_like(head: bytes) -> bool:
  """Whether a file starting with `head` (>= 9 bytes) may be a safetensors file (the full read decides)."""
  return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < _MAX_HEADER


def read(path: str) -> dict[str, np.ndarray]:
  """The tensors in `path`; bfloat16 ones become float32."""
  data = epath.Path(path).read_bytes()
  if len(data) < 8:
    raise ValueError(f"{path}: truncated safetensors file ({len(data)} bytes)")
  (length,) = struct.unpack("<Q", data[:8])
  if 8 + length > len(data):
    raise ValueError(f"{path}: truncated safetensors file (header of {length} bytes, file of {len(data)})")
  try:
    header = json.loads(data[8:8 + length])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a safetensors file (bad JSON header: {e})") from e
  body = memoryview(data)[8 + length:]
  state = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    start, stop = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if entry["dtype"] == "BF16":
      raw, dtype = np.frombuffer(body[start:stop], "<u2"), "bf16"
    elif entry["dtype"] in DTYPES:
      raw, dtype = np.frombuffer(body[start:stop], DTYPES[entry["dtype"]]), DTYPES[entry["dtype"]]
    else:
      raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}; expected one of {sorted(DTYPES)} or BF16")
    if stop > len(body) or raw.size != int(np.prod(shape)):
      raise ValueError(f"{path}: tensor {name} (shape {shape}, bytes {start}..{stop}) does not fit the file's "
                       f"{len(body)} data bytes")
    array = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "bf16" else raw.astype(
        np.dtype(dtype).newbyteorder("="))
    state[name] = array.reshape(shape)
  return state
