"""DeepLab v2 ResNet-101 + ASPP: scaleattn's Flax model on converted weights against deeplab-pytorch's network.

  pip install torch  # optional; the scaleattn package never imports it
  PYTHONPATH=. python launch/resnet_parity.py --out=launch/results/resnet_parity.json

The PyTorch side is written here after deeplab-pytorch's libs/models/resnet.py and deeplabv2.py (conv-BN-ReLU
units named conv/bn, bottlenecks reduce/conv3x3/increase/shortcut with the stride in `reduce`, the stem's
MaxPool2d(3, 2, 1, ceil_mode=True), ASPP c0..c3 with dilations 6, 12, 18, 24) inside an MSC-like wrapper, so its
state dict has the checkpoints' names (`base.layer2.block1.reduce.conv.weight`, `base.aspp.c0.weight`). Random
weights, with BatchNorm statistics taken from a calibration image (a trained network's activations stay O(1); raw
initial statistics would not), are saved as a .pth, read back without PyTorch (`scaleattn.weights.sources`),
converted and run by the Flax model, single scale, on a 513 x 513 image: BGR minus Caffe's mean for PyTorch, RGB
minus the same mean for Flax. Reported: max |difference| of scores and features, and per-pixel label agreement.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from torch import nn

from scaleattn.data.preprocessing import CAFFE_MEAN_RGB
from scaleattn.models.resnet import BLOCK_DEPTHS, DeepLabV2
from scaleattn.weights import resnet as resnet_weights  # noqa: F401 - registers the ResNet layouts
from scaleattn.weights import sources

flags.DEFINE_integer("size", 513, "Image side.")
flags.DEFINE_integer("num_classes", 21, "Classes (ASPP outputs).")
flags.DEFINE_list("conv_impls", ["xla", "cpu"], "Flax convolution implementations to compare.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and images.")
flags.DEFINE_string("out", "launch/results/resnet_parity.json", "Results file.")
FLAGS = flags.FLAGS


class ConvBnReLU(nn.Sequential):
  def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, dilation: int, relu: bool = True):
    super().__init__()
    self.add_module("conv", nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False))
    self.add_module("bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=1.0))  # momentum 1: calibration sets the stats
    if relu:
      self.add_module("relu", nn.ReLU())


class Bottleneck(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int, dilation: int, projection: bool):
    super().__init__()
    mid = cout // 4
    self.reduce = ConvBnReLU(cin, mid, 1, stride, 0, 1)
    self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dilation, dilation)
    self.increase = ConvBnReLU(mid, cout, 1, 1, 0, 1, relu=False)
    self.shortcut = ConvBnReLU(cin, cout, 1, stride, 0, 1, relu=False) if projection else nn.Identity()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


class ResLayer(nn.Sequential):
  def __init__(self, blocks: int, cin: int, cout: int, stride: int, dilation: int):
    super().__init__()
    for i in range(blocks):
      self.add_module(f"block{i + 1}", Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1, dilation,
                                                  i == 0))


class Stem(nn.Sequential):
  def __init__(self, cout: int):
    super().__init__()
    self.add_module("conv1", ConvBnReLU(3, cout, 7, 2, 3, 1))
    self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class ASPP(nn.Module):
  def __init__(self, cin: int, cout: int, rates: tuple[int, ...]):
    super().__init__()
    for i, rate in enumerate(rates):
      self.add_module(f"c{i}", nn.Conv2d(cin, cout, 3, 1, padding=rate, dilation=rate, bias=True))
    for conv in self.children():
      nn.init.normal_(conv.weight, mean=0, std=0.01)
      nn.init.constant_(conv.bias, 0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return sum(stage(x) for stage in self.children())


class DeepLabV2Torch(nn.Sequential):
  def __init__(self, num_classes: int, blocks: tuple[int, ...], rates: tuple[int, ...] = (6, 12, 18, 24)):
    super().__init__()
    ch = [64 * 2 ** p for p in range(6)]
    self.add_module("layer1", Stem(ch[0]))
    self.add_module("layer2", ResLayer(blocks[0], ch[0], ch[2], 1, 1))
    self.add_module("layer3", ResLayer(blocks[1], ch[2], ch[3], 2, 1))
    self.add_module("layer4", ResLayer(blocks[2], ch[3], ch[4], 1, 2))
    self.add_module("layer5", ResLayer(blocks[3], ch[4], ch[5], 1, 4))
    self.add_module("aspp", ASPP(ch[5], num_classes, rates))

  def features(self, x: torch.Tensor) -> torch.Tensor:
    for name in ("layer1", "layer2", "layer3", "layer4", "layer5"):
      x = getattr(self, name)(x)
    return x


class MSC(nn.Module):
  """Only for the checkpoints' `base.` names (single scale here)."""

  def __init__(self, base: nn.Module):
    super().__init__()
    self.base = base


def _image(rng: np.random.Generator, size: int) -> np.ndarray:
  """RGB 0..255 [size, size, 3]: smooth colour gradients and rectangles (regions, as in a photo) plus noise."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  img = np.stack([128 + 100 * np.sin(3 * xx + c) * np.cos(2 * yy - c) for c in range(3)], axis=-1)
  for _ in range(12):
    r0, c0 = rng.integers(0, size - 64, 2)
    h, w = rng.integers(32, size // 2, 2)
    img[r0:r0 + h, c0:c0 + w] = rng.uniform(0, 255, 3)
  return np.clip(img + rng.normal(0, 8, img.shape), 0, 255)


def _randomise(model: DeepLabV2Torch, calibration: torch.Tensor, rng: np.random.Generator) -> None:
  """Random BN affines; statistics of `calibration`'s activations (momentum 1: one train-mode pass sets them)."""
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, module.num_features)))
        module.bias.copy_(torch.from_numpy(rng.normal(0, 0.2, module.num_features)))
    model.train()
    model(calibration)
    model.eval()


def main(argv):
  del argv
  torch.manual_seed(FLAGS.seed)
  rng = np.random.default_rng(FLAGS.seed)
  mean_bgr = np.asarray(CAFFE_MEAN_RGB)[::-1]
  to_torch = lambda rgb: torch.from_numpy(np.ascontiguousarray((rgb[..., ::-1] - mean_bgr).transpose(2, 0, 1)[None],
                                                               np.float32))
  base = DeepLabV2Torch(FLAGS.num_classes, BLOCK_DEPTHS[101])
  _randomise(base, to_torch(_image(rng, 321)), rng)
  image = _image(rng, FLAGS.size)
  start = time.perf_counter()
  with torch.no_grad():
    feats_t = base.features(to_torch(image))
    scores_t = base.aspp(feats_t)
  torch_s = time.perf_counter() - start
  scores_t, feats_t = (t[0].permute(1, 2, 0).numpy().astype(np.float64) for t in (scores_t, feats_t))

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "deeplabv2_resnet101_msc_random.pth")
    torch.save(MSC(base).state_dict(), path)
    pth_mb = os.path.getsize(path) / 2 ** 20
    layout, variables = sources.convert_file(path, mean_rgb=CAFFE_MEAN_RGB)
  variables = {collection: tree["backbone"] for collection, tree in variables.items()}

  cases = []
  x = (image - np.asarray(CAFFE_MEAN_RGB))[None].astype(np.float32)
  for impl in FLAGS.conv_impls:
    model = DeepLabV2(FLAGS.num_classes, block_depths=BLOCK_DEPTHS[101], conv_impl=impl)
    apply = jax.jit(model.apply, static_argnames="train")
    start = time.perf_counter()
    scores, feats = jax.block_until_ready(apply(variables, x, train=False))
    first_s = time.perf_counter() - start
    scores, feats = np.asarray(scores[0], np.float64), np.asarray(feats[0], np.float64)
    labels_t, labels = scores_t.argmax(-1), scores.argmax(-1)
    top2 = np.sort(scores_t, axis=-1)
    cases.append({
        "conv_impl": impl,
        "scores_shape": list(scores.shape),
        "scores_max_abs_diff": float(np.abs(scores - scores_t).max()),
        "scores_max_abs": float(np.abs(scores_t).max()),
        "features_max_abs_diff": float(np.abs(feats - feats_t).max()),
        "features_max_abs": float(np.abs(feats_t).max()),
        "label_agreement": float((labels == labels_t).mean()),
        # a disagreement is a near tie when PyTorch's top two scores differ by less than twice the largest difference
        "disagreements_at_near_ties": float(np.mean((top2[..., -1] - top2[..., -2])[labels != labels_t]
                                                    < 2 * np.abs(scores - scores_t).max())) if (labels != labels_t).any()
                                      else None,
        "torch_labels_distinct": int(np.unique(labels_t).size),
        "torch_median_top2_margin": float(np.median(top2[..., -1] - top2[..., -2])),
        "jax_compile_and_run_s": first_s,
    })
    print(json.dumps(cases[-1]))
  result = {
      "command": "PYTHONPATH=. python " + " ".join(sys.argv),
      "what": "random-weight DeepLab v2 ResNet-101 + ASPP in deeplab-pytorch's layout, saved as .pth, read without "
              "PyTorch, converted, Flax vs PyTorch forward, single scale",
      "image_size": FLAGS.size, "num_classes": FLAGS.num_classes, "seed": FLAGS.seed,
      "layout": layout, "pth_mib": round(pth_mb, 1), "torch": torch.__version__, "jax": jax.__version__,
      "device": jax.devices()[0].device_kind, "torch_forward_s": torch_s, "cases": cases,
  }
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
