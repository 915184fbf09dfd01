"""Writes the small weight files under tests/fixtures/weights/ with the tools that define those formats, so the
project's own readers are tested against what Caffe's schema, PyTorch and safetensors really write. Run once, where
those tools are installed (never a dependency of the package or its tests):

  pip install torch safetensors 'protobuf<4'
  pip download caffe2onnx==2.0.1 --no-deps   # its caffe_upsample_pb2.py: Caffe's schema, compiled by protoc
  CAFFE_PB2_DIR=<unpacked>/caffe2onnx/proto python launch/write_weight_fixtures.py

Nothing here imports scaleattn. The tests rebuild the expected values from the same formulas (np.arange based) or
read them from the reference .npz written beside each caffemodel.
"""
from __future__ import annotations

import os
import sys

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "weights")
CONV_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
              "conv4_3", "conv5_1", "conv5_2", "conv5_3")
BLOCK_WIDTHS = (4, 6, 8, 8, 8)  # a LargeFOV-shaped net small enough for a NumPy forward in a test
FC_WIDTH, V1_CLASSES, V2_CLASSES = 16, 5, 7


def _widths() -> list[int]:
  return [BLOCK_WIDTHS[int(name[4]) - 1] for name in CONV_NAMES]


def largefov_weights(seed: int, classes: int) -> dict[str, np.ndarray]:
  """Caffe-layout weights: '<layer>/weight' [O, I, kh, kw] and '<layer>/bias' [O] (fc8 included)."""
  rng = np.random.default_rng(seed)
  out, c_in = {}, 3
  for name, c_out in zip(CONV_NAMES, _widths(), strict=True):
    out[f"{name}/weight"] = rng.normal(0, np.sqrt(2 / (9 * c_in)), (c_out, c_in, 3, 3))
    out[f"{name}/bias"] = rng.normal(0, 0.1, c_out)
    c_in = c_out
  for name, c_out, k in (("fc6", FC_WIDTH, 3), ("fc7", FC_WIDTH, 1), ("fc8", classes, 1)):
    out[f"{name}/weight"] = rng.normal(0, np.sqrt(2 / (k * k * c_in)), (c_out, c_in, k, k))
    out[f"{name}/bias"] = rng.normal(0, 0.1, c_out)
    c_in = c_out
  return out


def write_caffemodels(pb2) -> None:
  from google.protobuf.internal import encoder  # noqa: PLC0415

  # V1: 'layers', enum types, legacy num/channels/height/width, float data; fc7 an INNER_PRODUCT stored [1, 1, O, I];
  # conv2_1's weights written unpacked (valid protobuf, as older writers produced); layers without blobs between.
  ref = largefov_weights(1, V1_CLASSES)
  net = pb2.NetParameter(name="largefov_v1")
  net.layers.add(name="data", type=pb2.V1LayerParameter.DATA)
  for layer in CONV_NAMES + ("fc6", "fc7", "fc8_voc12"):
    key = "fc8" if layer.startswith("fc8") else layer
    w, b = ref[f"{key}/weight"], ref[f"{key}/bias"]
    kind = pb2.V1LayerParameter.INNER_PRODUCT if layer == "fc7" else pb2.V1LayerParameter.CONVOLUTION
    msg = net.layers.add(name=layer, type=kind)
    shape = (1, 1) + w.shape[:2] if layer == "fc7" else w.shape
    wb = msg.blobs.add(num=shape[0], channels=shape[1], height=shape[2], width=shape[3])
    if layer != "conv2_1":
      wb.data.extend(w.astype(np.float32).ravel().tolist())
    msg.blobs.add(num=1, channels=1, height=1, width=b.size).data.extend(b.astype(np.float32).ravel().tolist())
    net.layers.add(name=f"relu_{layer}", type=pb2.V1LayerParameter.RELU)
  # conv2_1's weight data as unpacked floats: protobuf's own encoders write the blob, its layer and the net around it
  # (the schema says packed, which the generated code always writes; parsers must accept both).
  unpacked = []
  encoder.FloatEncoder(5, True, False)(unpacked.append, ref["conv2_1/weight"].astype(np.float32).ravel().tolist(),
                                       True)
  wrap = lambda field, payload: encoder.TagBytes(field, 2) + encoder._VarintBytes(len(payload)) + payload  # noqa: SLF001
  chunks = [pb2.NetParameter(name=net.name).SerializeToString()]
  for layer in net.layers:
    if layer.name == "conv2_1":
      head = pb2.V1LayerParameter(name=layer.name, type=layer.type).SerializeToString()
      blob = layer.blobs[0].SerializeToString() + b"".join(unpacked)
      layer_bytes = head + wrap(6, blob) + wrap(6, layer.blobs[1].SerializeToString())
    else:
      layer_bytes = layer.SerializeToString()
    chunks.append(wrap(2, layer_bytes))
  data = b"".join(chunks)
  parsed = pb2.NetParameter.FromString(data)
  conv2_1 = [l for l in parsed.layers if l.name == "conv2_1"][0]
  assert np.array_equal(np.array(conv2_1.blobs[0].data, np.float32), ref["conv2_1/weight"].astype(np.float32).ravel())
  assert parsed.SerializeToString() != data  # the file really holds the unpacked form
  _write("largefov_v1_float.caffemodel", data)
  np.savez(os.path.join(OUT, "largefov_v1_float.reference.npz"), **{k: v.astype(np.float32) for k, v in ref.items()})

  # V2: 'layer', string types, BlobShape, double data; fc6 an InnerProduct [O, I * 9]; a second, longer-named fc8 as
  # a multi-scale model's other branch; BatchNorm (with its scale factor, and one factor 0) and Scale layers.
  ref = largefov_weights(2, V2_CLASSES)
  rng = np.random.default_rng(3)
  bn = {"mean": rng.normal(0, 1, 6), "variance": rng.uniform(0.5, 2, 6), "factor": np.array([0.999]),
        "gamma": rng.normal(1, 0.1, 6), "beta": rng.normal(0, 0.1, 6)}
  net = pb2.NetParameter(name="largefov_v2")
  net.layer.add(name="data", type="Input")

  def add(name: str, kind: str, *arrays: np.ndarray) -> None:
    msg = net.layer.add(name=name, type=kind)
    for a in arrays:
      blob = msg.blobs.add()
      blob.shape.dim.extend(a.shape)
      blob.double_data.extend(np.asarray(a, np.float64).ravel().tolist())

  for layer in CONV_NAMES:
    add(layer, "Convolution", ref[f"{layer}/weight"], ref[f"{layer}/bias"])
    add(f"relu_{layer}", "ReLU")
  add("fc6", "InnerProduct", ref["fc6/weight"].reshape(FC_WIDTH, -1), ref["fc6/bias"])
  add("fc7", "Convolution", ref["fc7/weight"], ref["fc7/bias"])
  add("fc8_pascal", "Convolution", ref["fc8/weight"], ref["fc8/bias"])
  add("fc8_pascal_res075", "Convolution", ref["fc8/weight"] + 1, ref["fc8/bias"] + 1)
  add("bn_extra", "BatchNorm", bn["mean"], bn["variance"], bn["factor"])
  add("bn_zero", "BatchNorm", bn["mean"], bn["variance"], np.zeros(1))
  add("scale_extra", "Scale", bn["gamma"], bn["beta"])
  _write("largefov_v2_double.caffemodel", net.SerializeToString())
  np.savez(os.path.join(OUT, "largefov_v2_double.reference.npz"),
           **{k: v for k, v in ref.items()}, **{f"bn/{k}": v for k, v in bn.items()})


def write_torch() -> None:
  """A tiny state dict, zip and legacy formats: several dtypes, a non-contiguous view at an offset, a 0-d tensor,
  two tensors sharing one storage."""
  import torch  # noqa: PLC0415

  base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
  shared = torch.arange(12, dtype=torch.float64)
  state = {
      "features.0.weight": torch.arange(4 * 3 * 3 * 3, dtype=torch.float32).reshape(4, 3, 3, 3) / 8,
      "features.0.bias": torch.tensor([-1.5, 0.0, 2.25, 1e-3], dtype=torch.float64),
      "classifier.0.weight": base[1:5, ::2].t(),  # shape (5, 4), offset 10, strides (2, 10)
      "classifier.0.bias": torch.arange(5, dtype=torch.float16) - 2,
      "classifier.3.weight": (torch.arange(6, dtype=torch.float32) / 3).to(torch.bfloat16),
      "features.1.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
      "shared.a": shared[2:6],
      "shared.b": shared.view(3, 4)[:, 1],
  }
  with open(os.path.join(OUT, "tiny_state_zip.pth"), "wb") as f:
    torch.save(state, f)
  with open(os.path.join(OUT, "tiny_state_legacy.pth"), "wb") as f:
    torch.save(state, f, _use_new_zipfile_serialization=False)
  with open(os.path.join(OUT, "tiny_module.pth"), "wb") as f:  # a whole module: must be refused, never run
    torch.save(torch.nn.Linear(2, 1), f)


def write_safetensors() -> None:
  """timm's VGG names with tiny shapes (the reader is shape-agnostic; layouts are tested elsewhere)."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  save_file({"features.0.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
             "pre_logits.fc1.bias": np.arange(3, dtype=np.float64) - 1,
             "head.fc.weight": np.arange(6, dtype=np.float16).reshape(3, 2)},
            os.path.join(OUT, "tiny_timm.safetensors"), metadata={"format": "pt"})


def _write(name: str, data: bytes) -> None:
  with open(os.path.join(OUT, name), "wb") as f:
    f.write(data)


def main() -> None:
  sys.path.insert(0, os.environ["CAFFE_PB2_DIR"])
  import caffe_upsample_pb2  # noqa: PLC0415

  os.makedirs(OUT, exist_ok=True)
  write_caffemodels(caffe_upsample_pb2)
  write_torch()
  write_safetensors()
  for name in sorted(os.listdir(OUT)):
    print(f"{name}: {os.path.getsize(os.path.join(OUT, name))} bytes")


if __name__ == "__main__":
  main()
