"""The Caffe reader against caffemodels written through Caffe's own schema (tests/fixtures/weights, made by
launch/write_weight_fixtures.py): every blob against the reference arrays written beside them, BatchNorm and Scale
against Caffe's formula, the converted LargeFOV against a NumPy forward of the Caffe weights on BGR input, and each
kind of bad input."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn import weights
from scaleattn.models import DeepLabLargeFOV
from scaleattn.weights import caffe, vgg
from tests import numpy_reference

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "weights"
V1, V2 = FIXTURES / "largefov_v1_float.caffemodel", FIXTURES / "largefov_v2_double.caffemodel"
CAFFE_MEAN_BGR = np.array([104.008, 116.669, 122.675])
DEPTHS, WIDTHS, FC_WIDTH = (2, 2, 3, 3, 3), (4, 6, 8, 8, 8), 16
# The fixtures' network: DeepLab-LargeFOV's prototxt (conv5 dilated 2, fc6 3x3 dilated 12, 3x3 pools after
# conv4 and conv5), narrowed.
GEOMETRY = dict(conv5_dilation=2, fc6_dilation=12, fc6_kernel=3, stride1_pools=True)


def reference(path):
  with np.load(str(path).replace(".caffemodel", ".reference.npz")) as data:
    return {k: data[k] for k in data.files}


@pytest.mark.parametrize("path, fc8, dtype", [(V1, "fc8_voc12", np.float32), (V2, "fc8_pascal", np.float64)])
def test_reader_returns_every_blob(path, fc8, dtype):
  state, ref = caffe.read(str(path)), reference(path)
  for layer in vgg.CONV_NAMES + ("fc6", "fc7"):
    np.testing.assert_array_equal(state[f"{layer}/weight"].reshape(ref[f"{layer}/weight"].shape),
                                  ref[f"{layer}/weight"].astype(dtype))
    np.testing.assert_array_equal(state[f"{layer}/bias"], ref[f"{layer}/bias"].astype(dtype))
    assert state[f"{layer}/weight"].dtype == dtype
  np.testing.assert_array_equal(state[f"{fc8}/weight"], ref["fc8/weight"].astype(dtype))
  # Stored shapes: V1's legacy 4-D InnerProduct [1, 1, O, I] becomes [O, I]; V2's InnerProduct fc6 stays [O, I*9].
  assert state["fc7/weight"].shape == ((16, 16) if path == V1 else (16, 16, 1, 1))
  assert state["fc6/weight"].shape == ((16, 8, 3, 3) if path == V1 else (16, 72))
  assert not any(k.startswith(("relu", "data")) for k in state)  # layers without blobs leave nothing


def test_batchnorm_divides_by_the_scale_factor_and_scale_gives_gamma_beta():
  state, bn = caffe.read(str(V2)), {k[3:]: v for k, v in reference(V2).items() if k.startswith("bn/")}
  np.testing.assert_allclose(state["bn_extra/mean"], bn["mean"] / 0.999, rtol=1e-15)
  np.testing.assert_allclose(state["bn_extra/variance"], bn["variance"] / 0.999, rtol=1e-15)
  np.testing.assert_array_equal(state["bn_zero/mean"], np.zeros(6))  # factor 0: Caffe multiplies by 0
  np.testing.assert_array_equal(state["bn_zero/variance"], np.zeros(6))
  np.testing.assert_array_equal(state["scale_extra/gamma"], bn["gamma"])
  np.testing.assert_array_equal(state["scale_extra/beta"], bn["beta"])


def run_model(backbone, image_rgb, mean_rgb, num_classes):
  model = DeepLabLargeFOV(num_classes, block_widths=WIDTHS, block_depths=DEPTHS, fc_width=FC_WIDTH, **GEOMETRY,
                          dropout_rate=0.0, fc8_init_std=0.01)
  x = jnp.asarray((image_rgb - np.asarray(mean_rgb))[None], jnp.float32)
  scores, _ = model.apply({"params": jax.tree.map(jnp.asarray, backbone)}, x, train=False)
  return np.asarray(scores[0], np.float64)


def caffe_forward(ref, image_rgb):
  """The Caffe network on its own input: BGR minus Caffe's mean, weights [O, I, kh, kw] as written."""
  params = {k.split("/")[0]: {} for k in ref if not k.startswith("bn/")}
  for key, value in ref.items():
    if key.startswith("bn/"):
      continue
    layer, leaf = key.split("/")
    params[layer]["kernel" if leaf == "weight" else "bias"] = (
        np.einsum("oihw->hwio", value) if leaf == "weight" else value).astype(np.float64)
  bgr = image_rgb[..., ::-1] - CAFFE_MEAN_BGR
  return numpy_reference.largefov(params, bgr[None], DEPTHS, fc6_dilation=GEOMETRY["fc6_dilation"],
                                  conv5_dilation=GEOMETRY["conv5_dilation"],
                                  stride1_pools=GEOMETRY["stride1_pools"])[0][0]


@pytest.mark.parametrize("path, classes", [(V1, 5), (V2, 7)])
def test_converted_model_on_rgb_equals_caffe_network_on_bgr(path, classes):
  mean_rgb = tuple(CAFFE_MEAN_BGR[::-1])
  layout, params = weights.convert_file(str(path), mean_rgb=mean_rgb)
  assert layout == "caffe-largefov"
  assert params["backbone"]["fc8"]["kernel"].shape == (1, 1, FC_WIDTH, classes)  # fc8_pascal, not _res075
  image = np.random.default_rng(0).uniform(0, 255, size=(19, 21, 3))
  want = caffe_forward(reference(path), image)
  got = run_model(params["backbone"], image, mean_rgb, classes)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_first_layer_absorbs_another_mean():
  """With a pipeline mean other than Caffe's, conv1_1 on our input equals Caffe's conv1_1 on its own input
  (inside the border, where zero padding stands for different colours)."""
  mean_rgb = (120.0, 110.0, 100.0)
  _, params = weights.convert_file(str(V1), mean_rgb=mean_rgb)
  ref = reference(V1)
  image = np.random.default_rng(1).uniform(0, 255, size=(6, 7, 3))
  bgr = (image[..., ::-1] - CAFFE_MEAN_BGR)[None]
  want = numpy_reference.conv(bgr, np.einsum("oihw->hwio", ref["conv1_1/weight"]), ref["conv1_1/bias"])
  conv1_1 = params["backbone"]["conv1_1"]
  got = numpy_reference.conv((image - np.asarray(mean_rgb))[None], conv1_1["kernel"].astype(np.float64),
                             conv1_1["bias"])
  np.testing.assert_allclose(got[0, 1:-1, 1:-1], want[0, 1:-1, 1:-1], rtol=1e-5, atol=1e-4)


def test_truncated_file_is_an_error_naming_it(tmp_path):
  data = V1.read_bytes()
  for cut in (len(data) - 3, len(data) // 2, 7):
    path = tmp_path / f"cut{cut}.caffemodel"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=rf"{path}: truncated or not a caffemodel"):
      caffe.read(str(path))


def test_a_file_that_is_not_a_caffemodel(tmp_path):
  path = tmp_path / "notes.caffemodel"
  path.write_bytes(b"this is a text file, not weights\n" * 10)
  with pytest.raises(ValueError, match=rf"{path}: not a weights file this project reads"):
    weights.read_any(str(path))
  path.write_bytes(b"\x0a\x03abc" + bytes(range(200, 256)))  # starts like a NetParameter, then garbage
  with pytest.raises(ValueError, match=rf"{path}: (truncated or not a caffemodel|not a readable caffemodel)"):
    caffe.read(str(path))


def test_missing_layers_are_listed_beside_the_layers_found(tmp_path):
  state = caffe.read(str(V2))
  partial = {k: v for k, v in state.items() if not k.startswith(("conv4_2/", "fc7/"))}
  with pytest.raises(ValueError, match="part.caffemodel: not a complete DeepLab-LargeFOV caffemodel; missing layers "
                     "conv4_2, fc7; layers found: bn_extra, bn_zero, conv1_1, conv1_2"):
    vgg.from_caffe(partial, source="part.caffemodel", mean_rgb=(1, 2, 3))


def test_convert_cli_writes_nothing_on_error(tmp_path):
  from scaleattn import convert  # noqa: PLC0415
  bad, out = tmp_path / "bad.caffemodel", tmp_path / "out.npz"
  bad.write_bytes(V1.read_bytes()[:-100])
  with pytest.raises(ValueError, match="truncated"):
    convert.main([f"--src={bad}", f"--out={out}"])
  assert list(tmp_path.iterdir()) == [bad]
  convert.main([f"--src={V1}", f"--out={out}"])
  with np.load(out) as data:
    assert "backbone/fc8/kernel" in data.files and data["backbone/fc6/kernel"].shape == (3, 3, 8, 16)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.caffemodel", "out.npz"]
