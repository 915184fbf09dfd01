"""The same network and train step in PyTorch, timed alternately with scaleattn's JAX step on the same machine.

  pip install torch  # optional; the scaleattn package never imports it
  PYTHONPATH=. python launch/torch_reference.py --config=configs/voc.py --scales=1,1-0.75-0.5 --rounds=10 --out=FILE.json
  PYTHONPATH=. python launch/torch_reference.py --config=configs/deeplab_v2.py --scales=1-0.75-0.5 --rounds=10 \
      --out=FILE.json

Both sides: the config's backbone, either DeepLab-LargeFOV (VGG-16, Caffe ceil-mode pools, dilated conv5 and fc6)
or DeepLab v2 (dilated ResNet with frozen BatchNorm and ASPP, as deeplab-pytorch builds it, in the config's stride
layout); the scales resized with align-corners bilinear interpolation, per-scale scores (and, for the attention
head, the features) brought to the scale-1 grid, the fusion (attention head: 3x3 conv + ReLU + dropout, 1x1 conv,
softmax over scales; or average, max), cross-entropy with ignore label 255 on the fused and (extra supervision) on
every scale's output, and an SGD momentum update with weight decay. Rounds alternate one JAX step and one PyTorch
step, so both see the same machine state; medians are reported with their ratio, beside the machine's float32
matmul peak measured in the same run.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from torch import nn

from scaleattn.models import registry
from scaleattn.perf import host_memory, measure

FLAGS = flags.FLAGS  # --config, --scales, --batch_size and --out are scaleattn.benchmark's
flags.DEFINE_integer("rounds", 10, "Timed rounds (one step of each framework per round) after warm-up.")
flags.DEFINE_list("frameworks", ["jax", "torch"], "Frameworks to time; with both, their steps alternate.")
flags.DEFINE_float("pause_s", 1.0, "Idle time before each timed step, so neither framework's spinning worker "
                   "threads eat into the other's step.")
flags.DEFINE_bool("channels_last", False, "Run PyTorch in channels-last memory format.")


def _conv(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation)


class LargeFOV(nn.Module):
  """DeepLab-LargeFOV; returns (scores, fc7)."""

  def __init__(self, cfg, num_classes):
    super().__init__()
    layers, cin = [], 3
    for block, (width, depth) in enumerate(zip(cfg.block_widths, cfg.block_depths, strict=True), start=1):
      for _ in range(depth):
        layers += [_conv(cin, width, dilation=cfg.conv5_dilation if block == 5 else 1), nn.ReLU(inplace=True)]
        cin = width
      if block <= 3 or cfg.stride1_pools:
        layers.append(nn.MaxPool2d(3, stride=2 if block <= 3 else 1, padding=1, ceil_mode=True))
    self.features = nn.Sequential(*layers)
    self.fc6 = _conv(cin, cfg.fc_width, kernel=cfg.fc6_kernel, dilation=cfg.fc6_dilation)
    self.fc7 = _conv(cfg.fc_width, cfg.fc_width, kernel=1)
    self.fc8 = _conv(cfg.fc_width, num_classes, kernel=1)
    self.feature_channels = cfg.fc_width
    self.drop = nn.Dropout(cfg.dropout_rate)

  def forward(self, x):
    x = self.drop(F.relu(self.fc6(self.features(x))))
    fc7 = self.drop(F.relu(self.fc7(x)))
    return self.fc8(fc7), fc7


class FrozenBatchNorm(nn.BatchNorm2d):
  """BatchNorm with its statistics and affine fixed, in training too (DeepLab v2 trains it so)."""

  def __init__(self, channels: int, eps: float):
    super().__init__(channels, eps)
    self.weight.requires_grad_(False)
    self.bias.requires_grad_(False)

  def forward(self, x):
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvBN(nn.Sequential):
  """deeplab-pytorch's _ConvBnReLU: a bias-free convolution, frozen BatchNorm, an optional ReLU."""

  def __init__(self, cin, cout, kernel, stride, dilation, relu, eps):
    layers = [nn.Conv2d(cin, cout, kernel, stride, dilation * (kernel // 2), dilation, bias=False),
              FrozenBatchNorm(cout, eps)]
    super().__init__(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class Bottleneck(nn.Module):
  """1x1 reduce, dilated 3x3, 1x1 increase, plus the identity or a 1x1 projection; the stride in the 1x1 (Caffe,
  deeplab-pytorch) or in the 3x3 (torchvision)."""

  def __init__(self, cin, cout, stride, dilation, projection, stride_in_3x3, eps):
    super().__init__()
    reduce_stride, conv_stride = (1, stride) if stride_in_3x3 else (stride, 1)
    self.reduce = ConvBN(cin, cout // 4, 1, reduce_stride, 1, True, eps)
    self.conv3x3 = ConvBN(cout // 4, cout // 4, 3, conv_stride, dilation, True, eps)
    self.increase = ConvBN(cout // 4, cout, 1, 1, 1, False, eps)
    self.shortcut = ConvBN(cin, cout, 1, stride, 1, False, eps) if projection else nn.Identity()

  def forward(self, x):
    return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


class DeepLabV2(nn.Module):
  """deeplab-pytorch's DeepLabV2 (stem, ceil-mode pool, four bottleneck stages, ASPP summed); the stages as
  scaleattn's backbone plans them for the config (blocks, channels, strides, dilations); returns (scores, res5)."""

  def __init__(self, cfg, num_classes):
    super().__init__()
    plan = registry.build_backbone(cfg).stage_plan()
    eps, width = cfg.backbone.bn_eps, cfg.backbone.width
    layers, cin = [ConvBN(3, width, 7, 2, 1, True, eps), nn.MaxPool2d(3, 2, 1, ceil_mode=True)], width
    for _, depth, cout, stride, dilation in plan:
      for block in range(depth):
        layers.append(Bottleneck(cin, cout, stride if block == 0 else 1, dilation, block == 0,
                                 cfg.backbone.stride_in_3x3, eps))
        cin = cout
    self.features = nn.Sequential(*layers)
    self.aspp = nn.ModuleList(nn.Conv2d(cin, num_classes, 3, 1, d, d) for d in cfg.backbone.aspp_dilations)
    self.feature_channels = cin

  def forward(self, x):
    x = self.features(x)
    return sum(c(x) for c in self.aspp), x


BACKBONES = {"largefov": lambda cfg: LargeFOV(cfg.backbone, cfg.num_classes),
             **{name: lambda cfg: DeepLabV2(cfg, cfg.num_classes) for name in ("resnet50", "resnet101", "resnet152")}}


class ShareNet(nn.Module):
  """The backbone shared across scales + the fusion (average/max without a head); one scale: the backbone."""

  def __init__(self, cfg):
    super().__init__()
    self.scales, self.fusion = tuple(cfg.scales), cfg.fusion.name
    self.backbone = BACKBONES[cfg.backbone.name](cfg)
    if len(self.scales) > 1 and self.fusion == "attention":
      width = self.backbone.feature_channels
      self.head = nn.Sequential(_conv(len(self.scales) * width, cfg.fusion.hidden), nn.ReLU(inplace=True),
                                nn.Dropout(cfg.fusion.dropout_rate), _conv(cfg.fusion.hidden, len(self.scales), 1))

  def forward(self, images):
    h, w = images.shape[2:]
    scores, feats = [], []
    for s in self.scales:
      size = (int(np.floor((h - 1) * s + 1e-9)) + 1, int(np.floor((w - 1) * s + 1e-9)) + 1)
      x = images if s == 1.0 else F.interpolate(images, size=size, mode="bilinear", align_corners=True)
      sc, ft = self.backbone(x)
      if scores:
        grid = scores[0].shape[2:]
        sc = F.interpolate(sc, size=grid, mode="bilinear", align_corners=True)
        if self.fusion == "attention":  # only the attention head reads the features
          ft = F.interpolate(ft, size=grid, mode="bilinear", align_corners=True)
      scores.append(sc)
      feats.append(ft)
    if len(scores) == 1:
      return scores[0], scores
    stacked = torch.stack(scores, dim=1)  # [B, S, C, h, w]
    if self.fusion == "average":
      return stacked.mean(1), scores
    if self.fusion == "max":
      return stacked.max(1).values, scores
    weights = torch.softmax(self.head(torch.cat(feats, dim=1)), dim=1)  # [B, S, h, w]
    return (weights.unsqueeze(2) * stacked).sum(1), scores


def torch_step_fn(config, batch_size: int, channels_last: bool):
  """A closure running one PyTorch train step on a fixed random batch."""
  torch.manual_seed(0)
  cfg = config.model
  model = ShareNet(cfg)
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9, weight_decay=5e-4)
  crop = config.input.crop_size
  images = torch.randn(batch_size, 3, crop, crop) * 50
  if channels_last:
    model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
  with torch.no_grad():
    grid = model(images)[0].shape[2:]
  rows = np.floor(np.arange(grid[0]) * (crop - 1) / (grid[0] - 1) + 0.5).astype(int)
  labels = torch.randint(0, cfg.num_classes, (batch_size, crop, crop))[:, rows][:, :, rows]
  supervise_scales = config.loss.extra_supervision and len(cfg.scales) > 1

  def step():
    opt.zero_grad(set_to_none=True)
    fused, per_scale = model(images)
    loss = F.cross_entropy(fused, labels, ignore_index=255)
    if supervise_scales:
      loss = loss + sum(F.cross_entropy(s, labels, ignore_index=255) for s in per_scale)
    loss.backward()
    opt.step()
    return float(loss)

  return step


def main(argv):
  del argv
  retained = host_memory.retain_on_cpu(FLAGS.retain_host_memory)  # for both frameworks: one process
  base = FLAGS.config
  scale_sets = [tuple(float(s) for s in x.split("-")) for x in FLAGS.scales] or [tuple(base.model.scales)]
  results = []
  for scales in scale_sets:
    config = base.copy_and_resolve_references()
    config.model.scales = scales
    config.loss.per_scale_grid = "output"  # as the PyTorch step: every scale's loss on the scale-1 grid
    config.train.batch_size = FLAGS.batch_size
    steps = {"jax": lambda c: measure.train_runner(c).run,
             "torch": lambda c: torch_step_fn(c, FLAGS.batch_size, FLAGS.channels_last)}
    runners = {name: steps[name](config) for name in FLAGS.frameworks}
    times = {name: [] for name in runners}
    peak = measure.matmul_peak_gflops("float32")  # the machine's state as this case starts
    for run in runners.values():  # compile / warm up
      run()
    for _ in range(FLAGS.rounds):
      for name, run in runners.items():
        time.sleep(FLAGS.pause_s)
        t = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - t)
    row = {"scales": list(scales), "fusion": config.model.fusion.name, "batch_size": FLAGS.batch_size,
           "crop_size": config.input.crop_size, "torch_channels_last": FLAGS.channels_last, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "pause_s": FLAGS.pause_s, "host_memory_retained": retained,
           "matmul_peak_gflops_float32": peak}
    for name, ts in times.items():
      row[f"{name}_median_s"], row[f"{name}_times_s"] = float(np.median(ts)), ts
    if len(times) == 2:
      row["torch_over_jax"] = row["torch_median_s"] / row["jax_median_s"]
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("times_s")}), flush=True)
    results.append(row)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"environment": measure.environment(), "backbone": base.model.backbone.name, "cases": results}, f,
                indent=2)


if __name__ == "__main__":
  app.run(main)
