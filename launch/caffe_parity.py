"""The outside check of the Caffe path: a DeepLab-LargeFOV caffemodel with random weights at full VGG-16 size, in
V1 format (written through Caffe's own schema), converted by `python -m scaleattn.convert`, run by this project's
model on a 513x513 image, and compared with an independent PyTorch forward of the same weights on Caffe's input
(BGR minus Caffe's mean). Two environments, because PyTorch and Caffe's schema are never dependencies:

  # where torch and 'protobuf<4' are installed, with caffe2onnx 2.0.1's caffe_upsample_pb2.py unpacked:
  CAFFE_PB2_DIR=<dir> python launch/caffe_parity.py write --dir=D
  # in the project's environment:
  python launch/caffe_parity.py compare --dir=D --out=launch/results/caffe_parity.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CONV = (("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ("conv2_2", 128, 128),
        ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv4_1", 256, 512),
        ("conv4_2", 512, 512), ("conv4_3", 512, 512), ("conv5_1", 512, 512), ("conv5_2", 512, 512),
        ("conv5_3", 512, 512))
CAFFE_MEAN_BGR = np.array([104.008, 116.669, 122.675], np.float32)
SIZE, CLASSES = 513, 21


def caffe_weights(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """He-scaled random weights, [O, I, kh, kw], as DeepLab's init.caffemodel shapes them (fc8 21-way)."""
  rng = np.random.default_rng(seed)
  layers = [(n, i, o, 3) for n, i, o in CONV] + [("fc6", 512, 1024, 3), ("fc7", 1024, 1024, 1),
                                                 ("fc8_voc12", 1024, CLASSES, 1)]
  return {name: (rng.normal(0, np.sqrt(2 / (k * k * c_in)), (c_out, c_in, k, k)).astype(np.float32),
                 rng.normal(0, 0.05, c_out).astype(np.float32)) for name, c_in, c_out, k in layers}


def test_image() -> np.ndarray:
  """A smooth RGB image (blobs of colour), uint8 513x513."""
  rng = np.random.default_rng(1)
  y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
  img = np.zeros((SIZE, SIZE, 3))
  for _ in range(12):
    cy, cx, r = rng.uniform(0, 1, 3)
    img += rng.uniform(0, 255, 3) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.02 + 0.1 * r))[..., None]
  return np.clip(img / img.max() * 255 + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def write(out_dir: str) -> None:
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415
  sys.path.insert(0, os.environ["CAFFE_PB2_DIR"])
  import caffe_upsample_pb2 as pb2  # noqa: PLC0415

  os.makedirs(out_dir, exist_ok=True)
  params = caffe_weights()
  net = pb2.NetParameter(name="deeplab_largefov_random")
  for name, (w, b) in params.items():
    layer = net.layers.add(name=name, type=pb2.V1LayerParameter.CONVOLUTION)
    layer.blobs.add(num=w.shape[0], channels=w.shape[1], height=w.shape[2], width=w.shape[3]).data.extend(w.ravel())
    layer.blobs.add(num=1, channels=1, height=1, width=b.size).data.extend(b)
    net.layers.add(name=f"relu_{name}", type=pb2.V1LayerParameter.RELU)
  with open(os.path.join(out_dir, "largefov_random.caffemodel"), "wb") as f:
    f.write(net.SerializeToString())
  image = test_image()
  np.save(os.path.join(out_dir, "image.npy"), image)

  # Caffe's DeepLab-LargeFOV: BGR minus mean; 3x3 convs pad = dilation; ceil-mode 3x3 pools (pad 1) of stride 2, 2,
  # 2, 1, 1; conv5 dilated 2, fc6 3x3 dilated 12; ReLU after all but fc8.
  x = torch.from_numpy((image[..., ::-1].astype(np.float32) - CAFFE_MEAN_BGR).transpose(2, 0, 1).copy())[None]
  t = {k: (torch.from_numpy(w), torch.from_numpy(b)) for k, (w, b) in params.items()}
  with torch.no_grad():
    for block, (names, stride) in enumerate(zip(((0, 2), (2, 4), (4, 7), (7, 10), (10, 13)), (2, 2, 2, 1, 1), strict=True)):
      for name, _, _ in CONV[names[0]:names[1]]:
        dil = 2 if block == 4 else 1
        x = F.relu(F.conv2d(x, *t[name], padding=dil, dilation=dil))
      x = F.max_pool2d(x, 3, stride, padding=1, ceil_mode=True)
    x = F.relu(F.conv2d(x, *t["fc6"], padding=12, dilation=12))
    x = F.relu(F.conv2d(x, *t["fc7"]))
    scores = F.conv2d(x, *t["fc8_voc12"])[0].numpy().transpose(1, 2, 0)
  np.save(os.path.join(out_dir, "torch_scores.npy"), scores)
  print(f"wrote {out_dir}: scores {scores.shape}")


def compare(out_dir: str, results: str) -> None:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from configs import voc  # noqa: PLC0415
  from scaleattn import weights  # noqa: PLC0415
  from scaleattn.models import build_model  # noqa: PLC0415

  src, npz = os.path.join(out_dir, "largefov_random.caffemodel"), os.path.join(out_dir, "largefov_random.npz")
  command = [sys.executable, "-m", "scaleattn.convert", f"--src={src}", f"--out={npz}"]
  start = time.perf_counter()
  subprocess.run(command, check=True)
  convert_s = time.perf_counter() - start

  config = voc.get_config()
  config.model.scales = (1.0,)
  model = build_model(config.model)
  image = np.load(os.path.join(out_dir, "image.npy"))
  x = jnp.asarray((image.astype(np.float32) - np.asarray(config.input.mean_rgb, np.float32))[None])
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]
  fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  params = weights.load_init(npz, fresh, mean_rgb=config.input.mean_rgb)
  ours = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, train=False).fused)(params, x)[0])
  theirs = np.load(os.path.join(out_dir, "torch_scores.npy"))
  agree = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
  report = {  # D: the --dir given to both steps
      "commands": ["CAFFE_PB2_DIR=<dir> python launch/caffe_parity.py write --dir=D",
                   f"python launch/caffe_parity.py compare --dir=D --out={results}"],
      "convert_command": "python -m scaleattn.convert --src=D/largefov_random.caffemodel --out=D/largefov_random.npz",
      "caffemodel": "V1 (NetParameter.layers, enum types, legacy num/channels/height/width), float data, random "
                    "He-scaled weights at full DeepLab-LargeFOV VGG-16 size, fc8 21-way",
      "image": f"{SIZE}x{SIZE} synthetic RGB", "score_grid": list(ours.shape),
      "label_agreement": agree, "max_abs_score_diff": float(np.abs(ours - theirs).max()),
      "max_abs_score": float(np.abs(theirs).max()),
      "convert_seconds_with_interpreter_start": round(convert_s, 2),
      "caffemodel_bytes": os.path.getsize(src), "device": jax.devices()[0].platform,
  }
  os.makedirs(os.path.dirname(results), exist_ok=True)
  with open(results, "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("step", choices=("write", "compare"))
  parser.add_argument("--dir", required=True)
  parser.add_argument("--out", default="launch/results/caffe_parity.json")
  args = parser.parse_args()
  write(args.dir) if args.step == "write" else compare(args.dir, args.out)


if __name__ == "__main__":
  main()
