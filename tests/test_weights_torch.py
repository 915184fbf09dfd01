"""PyTorch and safetensors files read without either library, against files those libraries wrote
(tests/fixtures/weights, made by launch/write_weight_fixtures.py) and the formulas the values were made from."""
import io
import pathlib
import pickle
import zipfile

import numpy as np
import pytest

from scaleattn import weights
from scaleattn.weights import safetensors, torch_pickle

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "weights"


def bfloat16(values: np.ndarray) -> np.ndarray:
  """float32 -> bfloat16 (round to nearest even) -> float32, on the bits."""
  bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
  rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
  return rounded.astype(np.uint32).view(np.float32)


EXPECTED = {
    "features.0.weight": (np.arange(108, dtype=np.float32).reshape(4, 3, 3, 3) / 8, np.float32),
    "features.0.bias": (np.array([-1.5, 0.0, 2.25, 1e-3]), np.float64),
    "classifier.0.weight": (np.arange(60, dtype=np.float32).reshape(6, 10)[1:5, ::2].T, np.float32),
    "classifier.0.bias": (np.arange(5) - 2, np.float16),
    "classifier.3.weight": (bfloat16(np.arange(6, dtype=np.float32) / 3), np.float32),
    "features.1.num_batches_tracked": (np.array(7), np.int64),
    "shared.a": (np.arange(12.0)[2:6], np.float64),
    "shared.b": (np.arange(12.0).reshape(3, 4)[:, 1], np.float64),
}


@pytest.mark.parametrize("name", ["tiny_state_zip.pth", "tiny_state_legacy.pth"])
def test_state_dict_as_pytorch_wrote_it(name):
  state = weights.read_any(str(FIXTURES / name))
  assert set(state) == set(EXPECTED)
  for key, (want, dtype) in EXPECTED.items():
    assert state[key].dtype == dtype and state[key].shape == want.shape, key
    np.testing.assert_array_equal(state[key], want.astype(dtype), err_msg=key)
    assert state[key].flags.c_contiguous and state[key].flags.writeable


def test_a_pickled_module_is_refused_not_run():
  with pytest.raises(ValueError, match=r"tiny_module.pth: not a readable torch.save file: refusing to load "
                     r"torch\.nn\.modules\.linear\.Linear"):
    weights.read_any(str(FIXTURES / "tiny_module.pth"))


def test_only_allowed_globals_resolve():
  class Evil:
    def __reduce__(self):
      return (print, ("ran",))
  payload = pickle.dumps({"x": Evil()})
  with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
    torch_pickle._Unpickler(io.BytesIO(payload), lambda *a: None).load()


def test_truncated_pth_files(tmp_path):
  legacy = (FIXTURES / "tiny_state_legacy.pth").read_bytes()
  path = tmp_path / "cut.pth"
  path.write_bytes(legacy[:-10])
  with pytest.raises(ValueError, match=r"cut.pth: truncated in storage"):
    weights.read_any(str(path))
  with zipfile.ZipFile(FIXTURES / "tiny_state_zip.pth") as src, zipfile.ZipFile(tmp_path / "gap.pth", "w") as dst:
    for item in src.infolist():
      if not item.filename.endswith("/data/0"):
        dst.writestr(item, src.read(item))
  with pytest.raises(ValueError, match=r"gap.pth: storage 0 is missing from the archive"):
    weights.read_any(str(tmp_path / "gap.pth"))


def test_safetensors_as_the_library_wrote_it():
  state = weights.read_any(str(FIXTURES / "tiny_timm.safetensors"))
  np.testing.assert_array_equal(state["features.0.weight"], np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2))
  np.testing.assert_array_equal(state["pre_logits.fc1.bias"], np.arange(3.0) - 1)
  assert state["head.fc.weight"].dtype == np.float16
  np.testing.assert_array_equal(state["head.fc.weight"], np.arange(6).reshape(3, 2))


def test_truncated_safetensors(tmp_path):
  path = tmp_path / "cut.safetensors"
  path.write_bytes((FIXTURES / "tiny_timm.safetensors").read_bytes()[:-8])
  with pytest.raises(ValueError, match=r"cut.safetensors: tensor .* does not fit the file"):
    safetensors.read(str(path))
