"""torchvision/timm VGG-16 -> DeepLab-LargeFOV conversion against an index-by-index NumPy reference, the folded first
layer against the source layer on the source's own normalised input, the CLI, and merging into a model's parameters."""
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes
from scaleattn import convert, weights
from scaleattn.models import build_model
from scaleattn.weights import vgg

CONV_INDEX = {"conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7, "conv3_1": 10, "conv3_2": 12, "conv3_3": 14,
              "conv4_1": 17, "conv4_2": 19, "conv4_3": 21, "conv5_1": 24, "conv5_2": 26, "conv5_3": 28}
WIDTHS = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
OUR_MEAN = np.array([122.675, 116.669, 104.008])
TV_MEAN, TV_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def state():
  """A torchvision VGG-16 state dict with full shapes and random values (classifier.6 included, as in the file)."""
  rng = np.random.default_rng(0)
  rand = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  sd = {}
  for i, index in enumerate(CONV_INDEX.values()):
    sd[f"features.{index}.weight"] = rand(WIDTHS[i + 1], WIDTHS[i], 3, 3)
    sd[f"features.{index}.bias"] = rand(WIDTHS[i + 1])
  for index, (n_out, n_in) in {0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)}.items():
    sd[f"classifier.{index}.weight"] = rand(n_out, n_in)
    sd[f"classifier.{index}.bias"] = rand(n_out)
  return sd


def to_largefov(state, mean_rgb=tuple(OUR_MEAN), source="vgg16.pth"):
  return vgg.from_torchvision(state, source=source, mean_rgb=mean_rgb)["backbone"]


@pytest.fixture(scope="module")
def converted(state):
  return to_largefov(state)


def test_mapping_tensor_by_tensor(state, converted):
  assert set(converted) == set(CONV_INDEX) | {"fc6", "fc7"}  # no fc8
  for name, index in CONV_INDEX.items():
    w = state[f"features.{index}.weight"]
    if name != "conv1_1":  # conv1_1 is folded; test_first_layer_* checks it
      np.testing.assert_array_equal(converted[name]["kernel"], np.einsum("oihw->hwio", w))
      np.testing.assert_array_equal(converted[name]["bias"], state[f"features.{index}.bias"])
  # fc6: output o <- VGG filter 4o; tap (h, w) <- 7x7 position (3h, 3w); flat VGG column c * 49 + row * 7 + col.
  h, w, c, o = np.meshgrid(np.arange(3), np.arange(3), np.arange(512), np.arange(1024), indexing="ij")
  fc6 = state["classifier.0.weight"][4 * o, c * 49 + 3 * h * 7 + 3 * w]
  np.testing.assert_array_equal(converted["fc6"]["kernel"], fc6)
  np.testing.assert_array_equal(converted["fc6"]["bias"], state["classifier.0.bias"][0::4])
  i, o = np.meshgrid(np.arange(1024), np.arange(1024), indexing="ij")
  np.testing.assert_array_equal(converted["fc7"]["kernel"][0, 0], state["classifier.3.weight"][4 * o, 4 * i])
  np.testing.assert_array_equal(converted["fc7"]["bias"], state["classifier.3.bias"][0::4])
  for leaves in converted.values():
    assert all(v.dtype == np.float32 for v in leaves.values())


def conv_oihw(x_chw: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
  """PyTorch-style 3x3 cross-correlation without padding: x [C, H, W], w [O, C, 3, 3] -> [O, H-2, W-2]."""
  _, height, width = x_chw.shape
  out = np.zeros((w.shape[0], height - 2, width - 2)) + b[:, None, None]
  for dy in range(3):
    for dx in range(3):
      out += np.einsum("oc,chw->ohw", w[:, :, dy, dx], x_chw[:, dy:dy + height - 2, dx:dx + width - 2])
  return out


def test_first_layer_on_our_input_equals_source_layer_on_torchvision_input(state, converted):
  img = np.random.default_rng(1).uniform(0, 255, size=(9, 11, 3))
  ours = (img - OUR_MEAN).astype(np.float32)
  tv = ((img / 255 - TV_MEAN) / TV_STD).transpose(2, 0, 1)
  want = conv_oihw(tv, state["features.0.weight"].astype(np.float64), state["features.0.bias"]).transpose(1, 2, 0)
  # The converted layer as the model runs it (flax, SAME padding); the interior is what padding cannot change.
  conv = nn.Conv(64, (3, 3), padding="SAME")
  got = conv.apply({"params": jax.tree.map(jnp.asarray, converted["conv1_1"])}, jnp.asarray(ours[None]))[0]
  np.testing.assert_allclose(np.asarray(got)[1:-1, 1:-1], want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_first_layer_follows_the_configured_mean(state):
  mean = np.array([100.0, 110.0, 120.0])
  params = to_largefov(state, mean_rgb=tuple(mean))
  img = np.random.default_rng(2).uniform(0, 255, size=(3, 3, 3))
  got = np.einsum("hwio,hwi->o", params["conv1_1"]["kernel"].astype(np.float64), img - mean)
  got += params["conv1_1"]["bias"]
  tv = ((img / 255 - TV_MEAN) / TV_STD).transpose(2, 0, 1)
  want = conv_oihw(tv, state["features.0.weight"].astype(np.float64), state["features.0.bias"])[:, 0, 0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_through_torch(state, converted, tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "vgg16.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  read = weights.read_any(str(path))
  assert set(read) == set(state)
  params = to_largefov(read)
  for layer, leaves in converted.items():
    for k, v in leaves.items():
      np.testing.assert_array_equal(params[layer][k], v)
  img = np.random.default_rng(3).uniform(0, 255, size=(7, 8, 3))
  tv = torch.from_numpy(((img / 255 - TV_MEAN) / TV_STD).transpose(2, 0, 1)[None].astype(np.float32))
  want = torch.nn.functional.conv2d(tv, torch.from_numpy(state["features.0.weight"]),
                                    torch.from_numpy(state["features.0.bias"]))[0].numpy().transpose(1, 2, 0)
  k = params["conv1_1"]["kernel"]
  ours = (img - OUR_MEAN).astype(np.float32)
  got = sum(np.einsum("hwi,io->hwo", ours[dy:dy + 5, dx:dx + 6], k[dy, dx]) for dy in range(3) for dx in range(3))
  np.testing.assert_allclose(got + params["conv1_1"]["bias"], want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_timm_names_convert_like_torchvision(state, converted):
  """timm's VGG-16 file: torchvision's tensors renamed, fc6/fc7 stored as convolutions (its own filter function)."""
  timm = {k: v for k, v in state.items() if k.startswith("features.")}
  timm["pre_logits.fc1.weight"] = state["classifier.0.weight"].reshape(4096, 512, 7, 7)
  timm["pre_logits.fc1.bias"] = state["classifier.0.bias"]
  timm["pre_logits.fc2.weight"] = state["classifier.3.weight"].reshape(4096, 4096, 1, 1)
  timm["pre_logits.fc2.bias"] = state["classifier.3.bias"]
  timm["head.fc.weight"], timm["head.fc.bias"] = state["classifier.6.weight"], state["classifier.6.bias"]
  layout = weights.sources.find_layout(set(timm), "vgg16.safetensors")
  assert layout.name == "timm-vgg16"
  params = layout.convert(timm, source="vgg16.safetensors", mean_rgb=tuple(OUR_MEAN))["backbone"]
  for layer, leaves in converted.items():
    for k, v in leaves.items():
      np.testing.assert_array_equal(params[layer][k], v)


def test_rejects_a_state_dict_that_is_not_vgg16(state):
  bad = dict(state)
  bad["features.2.weight"] = np.zeros(64, np.float32)  # as in VGG-16 with batch norm
  bad["features.1.running_mean"] = np.zeros(64, np.float32)
  del bad["classifier.3.bias"]
  with pytest.raises(ValueError, match="vgg16_bn.pth") as e:
    to_largefov(bad, source="vgg16_bn.pth")
  msg = str(e.value)
  assert "features.2.weight: shape (64,), expected (64, 64, 3, 3)" in msg
  assert "features.1.running_mean" in msg and "classifier.3.bias: missing" in msg


def test_cli_on_npz(state, tmp_path):
  src, out = tmp_path / "vgg16.npz", tmp_path / "out" / "vgg16_largefov.npz"
  np.savez(src, **state)
  subprocess.run([sys.executable, "-m", "scaleattn.convert", f"--src={src}", f"--out={out}"], check=True,
                 capture_output=True)
  loaded = convert.load_pretrained(str(out))["backbone"]
  assert set(loaded) == set(CONV_INDEX) | {"fc6", "fc7"}
  np.testing.assert_array_equal(loaded["conv3_2"]["kernel"], np.einsum("oihw->hwio", state["features.12.weight"]))
  np.testing.assert_array_equal(loaded["fc7"]["bias"], state["classifier.3.bias"][::4])
  assert loaded["fc6"]["kernel"].shape == (3, 3, 512, 1024) and loaded["conv1_1"]["kernel"].shape == (3, 3, 3, 64)
  with np.load(out) as raw:  # the documented format: '<part>/<layer>/<kernel|bias>' arrays
    assert sorted(raw.files)[:2] == ["backbone/conv1_1/bias", "backbone/conv1_1/kernel"] and len(raw.files) == 30


def model_params(**backbone_overrides):
  """Abstract MultiScaleNet parameters filled with 7 (stand-ins for an initialisation)."""
  cfg = shapes.get_config("smoke").model
  cfg.backbone.update(backbone_overrides)
  model = build_model(cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False))
  return jax.tree.map(lambda s: np.full(s.shape, 7, s.dtype), abstract["params"])


def test_merge_into_vgg16_model(converted):
  params = model_params(block_widths=(64, 128, 256, 512, 512), block_depths=(2, 2, 3, 3, 3), fc_width=1024)
  merged = convert.merge_pretrained(params, converted)
  for layer, leaves in converted.items():
    for k, v in leaves.items():
      np.testing.assert_array_equal(merged["backbone"][layer][k], v)
  assert np.all(merged["backbone"]["fc8"]["kernel"] == 7) and merged["backbone"]["fc8"]["kernel"].shape[-1] == 5
  assert all(np.all(v == 7) for v in jax.tree.leaves(merged["fusion"]))
  assert np.all(params["backbone"]["fc6"]["kernel"] == 7)  # the input tree is left alone


def test_merge_names_every_mismatch(converted):
  params = model_params()  # the narrow smoke model: nothing fits
  with pytest.raises(ValueError, match="vgg16_largefov.npz does not fit the model") as e:
    convert.merge_pretrained(params, converted, source="vgg16_largefov.npz")
  msg = str(e.value)
  assert "backbone/conv1_1/kernel: model expects (3, 3, 3, 4), got (3, 3, 3, 64)" in msg
  assert "backbone/fc6/kernel: model expects (3, 3, 8, 16), got (3, 3, 512, 1024)" in msg
  assert "backbone/conv1_2: the model's backbone has no such layer" in msg
