"""Conversion time of each source format at full VGG-16 size (random weights), through `scaleattn.weights`.

  python launch/conversion_times.py write --dir=D     # where torch and safetensors are installed
  python launch/conversion_times.py time --dir=D --out=launch/results/conversion_times.json   # project environment
(the caffemodel comes from launch/caffe_parity.py write --dir=D)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

TV_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
            17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}


def write(out_dir: str) -> None:
  import torch  # noqa: PLC0415
  from safetensors.torch import save_file  # noqa: PLC0415

  g = torch.Generator().manual_seed(0)
  sd = {}
  for i, (o, c) in TV_CONVS.items():
    sd[f"features.{i}.weight"], sd[f"features.{i}.bias"] = torch.randn(o, c, 3, 3, generator=g), torch.randn(o)
  for i, (o, c) in {0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)}.items():
    sd[f"classifier.{i}.weight"], sd[f"classifier.{i}.bias"] = torch.randn(o, c, generator=g), torch.randn(o)
  torch.save(sd, os.path.join(out_dir, "vgg16_zip.pth"))
  torch.save(sd, os.path.join(out_dir, "vgg16_legacy.pth"), _use_new_zipfile_serialization=False)
  timm = {k: v for k, v in sd.items() if k.startswith("features.")}
  timm["pre_logits.fc1.weight"] = sd["classifier.0.weight"].reshape(4096, 512, 7, 7)
  timm["pre_logits.fc2.weight"] = sd["classifier.3.weight"].reshape(4096, 4096, 1, 1)
  timm["pre_logits.fc1.bias"], timm["pre_logits.fc2.bias"] = sd["classifier.0.bias"], sd["classifier.3.bias"]
  timm["head.fc.weight"], timm["head.fc.bias"] = sd["classifier.6.weight"], sd["classifier.6.bias"]
  save_file({k: v.contiguous() for k, v in timm.items()}, os.path.join(out_dir, "vgg16_timm.safetensors"))


def measure(out_dir: str, results: str) -> None:
  from scaleattn import weights  # noqa: PLC0415
  from scaleattn.weights import tree  # noqa: PLC0415

  mean = (122.675, 116.669, 104.008)
  files = ["vgg16_zip.pth", "vgg16_legacy.pth", "vgg16_timm.safetensors", "largefov_random.caffemodel"]
  report = {"command": f"python launch/conversion_times.py time --dir=D --out={results}", "runs": 3, "files": {}}
  first = None
  for name in files:
    path = os.path.join(out_dir, name)
    times = []
    for _ in range(3):
      start = time.perf_counter()
      layout, params = weights.convert_file(path, mean_rgb=mean)
      times.append(time.perf_counter() - start)
    report["files"][name] = {"layout": layout, "bytes": os.path.getsize(path), "median_s": float(np.median(times))}
    flat = tree.flatten(params)
    if name.startswith("vgg16_"):  # the same random VGG-16 in three containers: the same parameters
      first = first or flat
      report["files"][name]["identical_to_zip_pth"] = flat.keys() == first.keys() and all(
          np.array_equal(flat[k], first[k]) for k in flat)
  tree.save(os.path.join(out_dir, "converted.npz"), params)
  times = []
  for _ in range(3):
    start = time.perf_counter()
    layout, _ = weights.convert_file(os.path.join(out_dir, "converted.npz"), mean_rgb=mean)
    times.append(time.perf_counter() - start)
  report["files"]["converted.npz"] = {"layout": layout, "bytes": os.path.getsize(os.path.join(out_dir, "converted.npz")),
                                      "median_s": float(np.median(times))}
  with open(results, "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("step", choices=("write", "time"))
  parser.add_argument("--dir", required=True)
  parser.add_argument("--out", default="launch/results/conversion_times.json")
  args = parser.parse_args()
  write(args.dir) if args.step == "write" else measure(args.dir, args.out)


if __name__ == "__main__":
  main()
