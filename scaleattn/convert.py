"""Converts weights from elsewhere into this project's .npz, recognising the source by the names inside it:
torchvision's or timm's ImageNet VGG-16 (.pth or .safetensors, read without PyTorch), DeepLab-LargeFOV or VGG-16
caffemodels (the paper's authors' `init.caffemodel` and trained models, read without Caffe), or a file this
command wrote. See `scaleattn.weights` for the formats and `scaleattn.weights.vgg` for the mapping.

  python -m scaleattn.convert --src=vgg16-397923af.pth --out=vgg16_largefov.npz
  python -m scaleattn.convert --src=imagenet:vgg16 --out=vgg16_largefov.npz    # downloaded once, verified
  python -m scaleattn.main --config=configs/voc.py --config.init_from=vgg16_largefov.npz ...

`config.init_from` also takes any of these sources directly (converted on the fly, `scaleattn.weights.load_init`).
The output holds one float32 array per parameter, keyed by its path in the model's tree ('backbone/fc6/kernel',
HWIO); its first layer takes this project's input (RGB 0..255 minus --mean_rgb), whatever the source took.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from scaleattn import weights
from scaleattn.config import defaults
from scaleattn.weights import tree


def save_pretrained(path: str, backbone: Mapping[str, Any]) -> None:
  """Writes backbone parameters (layer -> name -> array) as a converted file (whole or not at all)."""
  tree.save(path, {"backbone": backbone})


def load_pretrained(path: str) -> dict[str, Any]:
  """A converted file or any recognised source as a parameter tree ({'backbone': ...}), for input minus Caffe's
  mean (the configs' default, config.input.mean_rgb in `scaleattn.config.defaults`). Callers that know their config's
  mean use `scaleattn.weights.load_init`."""
  _, loaded = weights.convert_file(weights.resolve(path), mean_rgb=defaults.get_config().input.mean_rgb)
  return loaded


def merge_pretrained(params: Mapping[str, Any], pretrained: Mapping[str, Any], *,
                     source: str = "pretrained parameters") -> dict[str, Any]:
  """`scaleattn.weights.merge`; `pretrained` is a tree from `load_pretrained`, or bare backbone layers."""
  loaded = pretrained if "backbone" in pretrained else {"backbone": pretrained}
  return weights.merge(params, loaded, source=source)


def main(argv: Sequence[str] | None = None) -> None:
  recipe = defaults.get_config()  # the defaults below are the recipe's
  parser = argparse.ArgumentParser(prog="python -m scaleattn.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help="a weights file (.pth, .safetensors, .caffemodel, .npz; its "
                      "layout is recognised from its names) or named weights: imagenet:vgg16")
  parser.add_argument("--out", required=True, help="output .npz, for config.init_from")
  parser.add_argument("--mean_rgb", type=float, nargs=3, default=tuple(recipe.input.mean_rgb), metavar=("R", "G", "B"),
                      help="the mean the pipeline subtracts (config.input.mean_rgb), 0..255; default %(default)s")
  parser.add_argument("--fc_width", type=int, default=recipe.model.backbone.fc_width,
                      help="the model's fc6/fc7 width (config.model.backbone.fc_width), for ImageNet VGG-16 sources; "
                      "default %(default)s")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  start = time.perf_counter()
  layout, params = weights.convert_file(weights.resolve(args.src), mean_rgb=args.mean_rgb, fc_width=args.fc_width)
  tree.save(args.out, params)
  layers = ", ".join(f"{part}: {len(params[part])} layers" for part in params)
  print(f"Wrote {args.out} from {args.src} (layout {layout}; {layers}) in {time.perf_counter() - start:.1f} s; "
        f"train from it with --config.init_from={args.out}")


if __name__ == "__main__":
  main()
