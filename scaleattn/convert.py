"""ImageNet VGG-16 (torchvision) weights into DeepLab-LargeFOV backbone parameters, the way DeepLab derived its
own initialisation from VGG-16.

  python -m scaleattn.convert --src=vgg16.pth --out=vgg16_largefov.npz   # .pth needs PyTorch; .npz does not
  python -m scaleattn.main --config=configs/voc.py --config.init_from=vgg16_largefov.npz ...

Mapping (torchvision name -> DeepLabLargeFOV parameter):
  features.{0,2,5,7,10,12,14,17,19,21,24,26,28} -> conv1_1, conv1_2, conv2_1, ..., conv5_3 (OIHW -> HWIO).
  classifier.0 (fc6, 4096 x 25088) -> viewed as (4096, 512, 7, 7); every 4th filter, taps 0, 3, 6 of the 7x7
      kernel in both dimensions -> fc6 3x3x512x1024 (run with dilation 12, which spans what 7x7 did at 4).
  classifier.3 (fc7, 4096 x 4096) -> every 4th output and input -> fc7 1x1x1024x1024.
  classifier.6 (ImageNet classes) is dropped; fc8 keeps its own initialiser.

Input normalisation. torchvision's VGG-16 takes RGB scaled to [0, 1] and normalised with the ImageNet mean and
std; our pipeline feeds RGB in 0..255 minus `config.input.mean_rgb` (DeepLab's mean). Both are per-channel affine
maps of the same pixels, so conv1_1 absorbs the difference: its kernel is divided by 255 * std per input channel
and its bias gets the kernel applied to the constant offset. On our inputs the converted conv1_1 then computes
exactly what torchvision's conv1_1 computes on its normalised inputs, everywhere but the one-pixel border, where
both pad with zeros and zero means a different colour (DeepLab's mean here, ImageNet's mean there). Both orders
are RGB, so no channel swap is needed (DeepLab's Caffe VGG-16 was BGR; that file is not what this reads).

Output file: an uncompressed .npz, one float32 array per parameter, keyed '<layer>/<kernel|bias>' (for example
'fc6/kernel', HWIO): the parameter tree of DeepLabLargeFOV without fc8. `load_pretrained` reads it back and
`merge_pretrained` puts it into a freshly initialised MultiScaleNet.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from scaleattn.preprocessing import CAFFE_MEAN_RGB

# What torchvision's ImageNet models expect: RGB in [0, 1], minus this mean, divided by this std.
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)

# torchvision `features` index of every VGG-16 convolution (ReLUs and pools sit between them) -> our name.
CONV_LAYERS = {0: "conv1_1", 2: "conv1_2", 5: "conv2_1", 7: "conv2_2", 10: "conv3_1", 12: "conv3_2",
               14: "conv3_3", 17: "conv4_1", 19: "conv4_2", 21: "conv4_3", 24: "conv5_1", 26: "conv5_2",
               28: "conv5_3"}
_CONV_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_FC_IN, _FC_OUT, _FC6_GRID = 512, 4096, 7
_FC6_TAPS = slice(0, _FC6_GRID, 3)  # taps 0, 3, 6
_IGNORED = ("classifier.6.weight", "classifier.6.bias")  # the 1000 ImageNet classes

Params = dict[str, dict[str, np.ndarray]]


def vgg16_source_shapes() -> dict[str, tuple[int, ...]]:
  """The shape of every torchvision VGG-16 tensor the conversion reads."""
  shapes = {}
  for (index, _), c_in, c_out in zip(CONV_LAYERS.items(), (3,) + _CONV_WIDTHS[:-1], _CONV_WIDTHS, strict=True):
    shapes[f"features.{index}.weight"] = (c_out, c_in, 3, 3)
    shapes[f"features.{index}.bias"] = (c_out,)
  shapes["classifier.0.weight"] = (_FC_OUT, _FC_IN * _FC6_GRID * _FC6_GRID)
  shapes["classifier.0.bias"] = (_FC_OUT,)
  shapes["classifier.3.weight"] = (_FC_OUT, _FC_OUT)
  shapes["classifier.3.bias"] = (_FC_OUT,)
  return shapes


def _check_state(state: Mapping[str, Any], source: str) -> None:
  expected = vgg16_source_shapes()
  problems = [f"{k}: missing (expected shape {s})" for k, s in expected.items() if k not in state]
  problems += [f"{k}: shape {tuple(np.shape(state[k]))}, expected {s}" for k, s in expected.items()
               if k in state and tuple(np.shape(state[k])) != s]
  problems += [f"{k}: not a tensor of torchvision's VGG-16" for k in state if k not in expected and k not in _IGNORED]
  if problems:
    raise ValueError(f"{source} is not a torchvision VGG-16 state dict (batch-norm VGG is not supported):\n  "
                     + "\n  ".join(problems))


def fold_input_normalisation(kernel: np.ndarray, bias: np.ndarray, mean_rgb: Sequence[float]
                             ) -> tuple[np.ndarray, np.ndarray]:
  """Rewrites a first-layer conv (HWIO) trained on torchvision-normalised RGB for RGB 0..255 minus `mean_rgb`.

  torchvision's input per channel c is x_tv = (img / 255 - m_c) / s_c, and ours is x = img - mean_c, so
  x_tv = a_c * x + t_c with a_c = 1 / (255 s_c), t_c = (mean_c - 255 m_c) a_c: scale the kernel's input channels
  by a_c and add the kernel applied to t to the bias.
  """
  if len(mean_rgb) != 3:
    raise ValueError(f"mean_rgb={tuple(mean_rgb)}: expected 3 values (R, G, B)")
  scale = 1.0 / (255.0 * np.asarray(TORCHVISION_STD, np.float64))
  shift = (np.asarray(mean_rgb, np.float64) - 255.0 * np.asarray(TORCHVISION_MEAN, np.float64)) * scale
  kernel = kernel.astype(np.float64)
  new_bias = bias.astype(np.float64) + np.einsum("hwio,i->o", kernel, shift)
  return (kernel * scale[:, None]).astype(np.float32), new_bias.astype(np.float32)


def vgg16_to_largefov(state: Mapping[str, Any], *, mean_rgb: Sequence[float] = CAFFE_MEAN_RGB,
                      fc_width: int = 1024, source: str = "state dict") -> Params:
  """torchvision VGG-16 state dict (name -> array) -> DeepLabLargeFOV parameters without fc8 (see the module
  docstring for the mapping). `fc_width` (a divisor of 4096) sets the fc6/fc7 decimation: 1024 keeps every 4th
  filter, as DeepLab did. `source` names the input in error messages."""
  if fc_width < 1 or _FC_OUT % fc_width:
    raise ValueError(f"fc_width={fc_width}: expected a divisor of VGG-16's {_FC_OUT} fc filters (1024 for LargeFOV)")
  _check_state(state, source)
  get = lambda k: np.asarray(state[k], np.float32)
  step = _FC_OUT // fc_width
  params: Params = {}
  for index, name in CONV_LAYERS.items():
    params[name] = {"kernel": get(f"features.{index}.weight").transpose(2, 3, 1, 0),
                    "bias": get(f"features.{index}.bias")}
  kernel, bias = fold_input_normalisation(params["conv1_1"]["kernel"], params["conv1_1"]["bias"], mean_rgb)
  params["conv1_1"] = {"kernel": kernel, "bias": bias}
  fc6 = get("classifier.0.weight").reshape(_FC_OUT, _FC_IN, _FC6_GRID, _FC6_GRID)[::step, :, _FC6_TAPS, _FC6_TAPS]
  params["fc6"] = {"kernel": fc6.transpose(2, 3, 1, 0), "bias": get("classifier.0.bias")[::step]}
  fc7 = get("classifier.3.weight")[::step, ::step]
  params["fc7"] = {"kernel": fc7.T[None, None], "bias": get("classifier.3.bias")[::step]}
  return {layer: {k: np.ascontiguousarray(v) for k, v in leaves.items()} for layer, leaves in params.items()}


def read_state(path: str) -> dict[str, np.ndarray]:
  """A state dict from a torchvision .pth (needs PyTorch) or an .npz with the same names."""
  path_ = epath.Path(path)
  if not path_.exists():
    raise FileNotFoundError(f"--src={path}: no such file")
  if path_.suffix == ".npz":
    with path_.open("rb") as f, np.load(f) as data:
      return {k: data[k] for k in data.files}
  if path_.suffix not in (".pth", ".pt"):
    raise ValueError(f"--src={path}: expected a .pth/.pt (PyTorch) or .npz file")
  try:
    import torch  # noqa: PLC0415 - optional: only .pth files need it.
  except ImportError as e:
    raise ImportError(f"Reading {path} needs PyTorch: pip install 'scaleattn[torch]' (or torch), or save the "
                      "state dict as .npz where torch is installed: np.savez('vgg16.npz', **{k: v.numpy() for k, "
                      "v in torch.load('vgg16.pth').items()})") from e
  with path_.open("rb") as f:
    state = torch.load(f, map_location="cpu", weights_only=True)
  if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def save_pretrained(path: str, params: Params) -> None:
  """Writes the converted tree as '<layer>/<name>' arrays (written to a temporary name, then renamed)."""
  path_ = epath.Path(path)
  path_.parent.mkdir(parents=True, exist_ok=True)
  tmp = path_.parent / (path_.name + ".tmp")
  with tmp.open("wb") as f:
    np.savez(f, **{f"{layer}/{k}": v for layer, leaves in params.items() for k, v in leaves.items()})
  tmp.replace(path_)


def load_pretrained(path: str) -> Params:
  """Reads a file written by `python -m scaleattn.convert` (or `save_pretrained`)."""
  path_ = epath.Path(path)
  if not path_.exists():
    raise FileNotFoundError(f"init_from={path}: no such file; create it with python -m scaleattn.convert")
  params: Params = {}
  with path_.open("rb") as f, np.load(f) as data:
    for key in data.files:
      layer, sep, name = key.partition("/")
      if not sep or "/" in name:
        raise ValueError(f"{path}: array {key!r} is not named '<layer>/<kernel|bias>'; not a converted file")
      params.setdefault(layer, {})[name] = data[key]
  return params


def merge_pretrained(params: Mapping[str, Any], pretrained: Mapping[str, Mapping[str, Any]], *,
                     source: str = "pretrained parameters") -> dict[str, Any]:
  """A MultiScaleNet parameter tree with its backbone layers replaced by `pretrained` (layer -> name -> array).

  Every pretrained array must name an existing backbone parameter of the same shape; all mismatches are reported
  at once. Backbone layers absent from `pretrained` (fc8 for a converted VGG-16) and the fusion head keep their
  values.
  """
  if "backbone" not in params:
    raise ValueError(f"merge_pretrained: expected a MultiScaleNet tree with 'backbone', got keys {list(params)}")
  backbone = params["backbone"]
  merged, problems = dict(backbone), []
  for layer, leaves in pretrained.items():
    if layer not in backbone:
      problems.append(f"{layer}: the model's backbone has no such layer (it has {', '.join(backbone)})")
      continue
    merged[layer] = dict(backbone[layer])
    for name, value in leaves.items():
      key = f"backbone/{layer}/{name}"
      if name not in backbone[layer]:
        problems.append(f"{key}: the model has no such parameter")
      elif np.shape(value) != np.shape(backbone[layer][name]):
        problems.append(f"{key}: model expects {tuple(np.shape(backbone[layer][name]))}, "
                        f"got {tuple(np.shape(value))}")
      else:
        merged[layer][name] = np.asarray(value, dtype=backbone[layer][name].dtype)
  if problems:
    raise ValueError(f"{source} does not fit the model (a file from scaleattn.convert fits config.model."
                     "backbone.block_widths=(64, 128, 256, 512, 512), block_depths=(2, 2, 3, 3, 3), fc_width=1024):\n  "
                     + "\n  ".join(problems))
  kept = [layer for layer in backbone if layer not in pretrained]
  logging.info("Backbone from %s; layers keeping their initialisation: %s", source, ", ".join(kept) or "none")
  return {**params, "backbone": merged}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m scaleattn.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help="torchvision VGG-16 state dict: .pth (needs PyTorch) or .npz "
                      "with the same names")
  parser.add_argument("--out", required=True, help="output .npz, for config.init_from")
  parser.add_argument("--mean_rgb", type=float, nargs=3, default=CAFFE_MEAN_RGB, metavar=("R", "G", "B"),
                      help="the mean the pipeline subtracts (config.input.mean_rgb), 0..255; default %(default)s")
  parser.add_argument("--fc_width", type=int, default=1024,
                      help="the model's fc6/fc7 width (config.model.backbone.fc_width)")
  args = parser.parse_args(argv)
  params = vgg16_to_largefov(read_state(args.src), mean_rgb=args.mean_rgb, fc_width=args.fc_width, source=args.src)
  save_pretrained(args.out, params)
  print(f"Wrote {args.out}; train from it with --config.init_from={args.out}")


if __name__ == "__main__":
  main()
