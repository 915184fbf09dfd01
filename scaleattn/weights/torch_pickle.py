"""PyTorch `torch.save` files (state dicts) read into NumPy without PyTorch.

Two container formats: the zip one (torch >= 1.6: '<prefix>/data.pkl' plus one '<prefix>/data/<key>' entry per
storage) and the legacy one (pickles in sequence: magic number, protocol version, system info, the object, the
storage keys, then each storage as an int64 element count and its raw bytes; torchvision's VGG-16 file is one).
The object pickle is read by an Unpickler that resolves only the few globals a state dict needs (below) and
refuses anything else, so reading a file never runs code from it. Tensors are views (offset, size, stride) into
their storage; each becomes a contiguous NumPy array. bfloat16 becomes float32 (NumPy has no bfloat16).
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np
from etils import epath

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_BFLOAT16 = "bfloat16"
# torch.<Name>Storage -> element type (little-endian; every torch.save file of the zip format is, and the legacy
# files this reads are checked to be).
STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": _BFLOAT16,
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?", "UntypedStorage": "u1",
}


class _StorageType:
  """What `torch.<Name>Storage` stands for in a pickle: the element type of a storage."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = STORAGE_DTYPES[name]

  @property
  def itemsize(self) -> int:
    return 2 if self.dtype == _BFLOAT16 else np.dtype(self.dtype).itemsize

  def decode(self, raw: bytes) -> np.ndarray:
    if self.dtype == _BFLOAT16:
      return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, self.dtype).astype(np.dtype(self.dtype).newbyteorder("="), copy=False)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_unused: Any) -> np.ndarray:
  """torch._utils._rebuild_tensor(_v2): the view (offset, size, stride) of `storage`, sharing its memory (a legacy
  file's storages are filled in after its tensors are built; `read` copies every tensor out at the end)."""
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f"tensor with size {size} and stride {stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
  if offset < 0 or last >= storage.size:
    raise pickle.UnpicklingError(f"tensor view (offset {offset}, size {size}, stride {stride}) runs past its "
                                 f"storage of {storage.size} elements")
  return np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * storage.itemsize for s in stride),
                                         writeable=False)


def _rebuild_parameter(data: np.ndarray, *_unused: Any) -> np.ndarray:
  return data


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED` and torch's storage types; storages come from `load_storage(type, key, numel)`."""

  def __init__(self, file: BinaryIO, load_storage: Callable[[_StorageType, str, int], np.ndarray]):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[module, name]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}; a state dict of tensors needs "
                                 "only torch._utils._rebuild_tensor_v2, torch.*Storage and collections.OrderedDict "
                                 "(save model.state_dict(), not the model)")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"storage {key} of type {storage_type!r:.80}")
    storage = self._load_storage(storage_type, key, numel)
    view = pid[5] if len(pid) > 5 else None  # legacy storage views: (view key, offset, size)
    if view is not None:
      _, offset, size = view
      storage = storage[int(offset):int(offset) + int(size)]
    return storage


class _PlainData(pickle.Unpickler):
  """For the legacy format's other pickles (numbers, strings, lists, dicts): no globals at all."""

  def find_class(self, module: str, name: str) -> Any:
    raise pickle.UnpicklingError(f"unexpected {module}.{name} outside the state dict")


def is_torch_zip(path: str) -> bool:
  """Whether the zip file at `path` is a torch.save archive (has a '<prefix>/data.pkl')."""
  with epath.Path(path).open("rb") as f, zipfile.ZipFile(f) as z:
    return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())


def _read_zip(f: BinaryIO, source: str) -> Any:
  with zipfile.ZipFile(f) as z:
    pickles = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{source}: expected one data.pkl in the archive, found {pickles}")
    prefix = pickles[0][:-len("data.pkl")]
    if f"{prefix}byteorder" in z.namelist() and z.read(f"{prefix}byteorder").strip() != b"little":
      raise ValueError(f"{source}: big-endian tensors are not supported")
    cache: dict[str, np.ndarray] = {}

    def load_storage(kind: _StorageType, key: str, numel: int) -> np.ndarray:
      if key not in cache:
        try:
          raw = z.read(f"{prefix}data/{key}")
        except KeyError as e:
          raise ValueError(f"{source}: storage {key} is missing from the archive") from e
        if len(raw) < numel * kind.itemsize:
          raise ValueError(f"{source}: storage {key} has {len(raw)} bytes, expected {numel} x {kind.itemsize}")
        cache[key] = kind.decode(raw[:numel * kind.itemsize])
      return cache[key]

    with z.open(pickles[0]) as p:
      return _Unpickler(io.BytesIO(p.read()), load_storage).load()


def _read_legacy(f: BinaryIO, source: str) -> Any:
  if _PlainData(f).load() != _LEGACY_MAGIC:
    raise ValueError(f"{source}: a pickle but not a torch.save file (no magic number)")
  if _PlainData(f).load() != _LEGACY_PROTOCOL:
    raise ValueError(f"{source}: unsupported torch.save protocol")
  info = _PlainData(f).load()
  if isinstance(info, Mapping) and not info.get("little_endian", True):
    raise ValueError(f"{source}: big-endian tensors are not supported")
  wanted: dict[str, tuple[_StorageType, int]] = {}
  placeholders: dict[str, np.ndarray] = {}

  def defer(kind: _StorageType, key: str, numel: int) -> np.ndarray:
    # Storages follow the object pickle: hand out zeroed placeholders now, fill them in place once read.
    if key not in placeholders:
      wanted[key] = (kind, numel)
      placeholders[key] = np.zeros(numel, np.float32 if kind.dtype == _BFLOAT16 else kind.dtype)
    return placeholders[key]

  obj = _Unpickler(f, defer).load()
  keys = _PlainData(f).load()
  for key in map(str, keys):
    numel_bytes = f.read(8)
    if len(numel_bytes) < 8:
      raise ValueError(f"{source}: truncated before storage {key}")
    kind, numel = wanted.get(key, (None, 0))
    if kind is None:
      raise ValueError(f"{source}: storage {key} is not used by any tensor")
    (stored,) = struct.unpack("<q", numel_bytes)
    raw = f.read(stored * kind.itemsize)
    if stored < numel or len(raw) < stored * kind.itemsize:
      raise ValueError(f"{source}: truncated in storage {key} ({len(raw)} of {stored * kind.itemsize} bytes)")
    placeholders[key][...] = kind.decode(raw)[:numel]
  if missing := sorted(set(wanted) - set(map(str, keys))):
    raise ValueError(f"{source}: storages {missing} are used by tensors but not in the file")
  return obj


def _state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
  """The name -> array entries of a loaded object (unwrapping a 'state_dict' or 'model' entry), copied out."""
  for key in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{source}: expected a state dict (name -> tensor), got {type(obj).__name__}")
  state = {str(k): np.array(v, order="C") for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not state:
    raise ValueError(f"{source}: a dict without tensors (keys {list(obj)[:10]})")
  return state


def read(path: str) -> dict[str, np.ndarray]:
  """The tensors of the state dict saved at `path` (a 'state_dict' or 'model' entry is unwrapped)."""
  with epath.Path(path).open("rb") as f:
    head = f.read(4)
    f.seek(0)
    try:
      obj = _read_zip(f, path) if head == b"PK\x03\x04" else _read_legacy(f, path)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error) as e:
      raise ValueError(f"{path}: not a readable torch.save file: {e}") from e
  return _state_dict(obj, path)
