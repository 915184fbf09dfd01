"""VGG-16 sources for DeepLab-LargeFOV: torchvision's and timm's ImageNet VGG-16, and the Caffe models of DeepLab
and of the paper's authors (the fc-reduced ImageNet `init.caffemodel` and models trained from it).

ImageNet VGG-16 (torchvision names; timm's are renamed to them first):
  features.{0,2,5,7,10,12,14,17,19,21,24,26,28} -> conv1_1, conv1_2, conv2_1, ..., conv5_3 (OIHW -> HWIO).
  classifier.0 (fc6, 4096 x 25088) -> viewed as (4096, 512, 7, 7); every 4th filter, taps 0, 3, 6 of the 7x7
      kernel in both dimensions -> fc6 3x3x512x1024 (run with dilation 12, which spans what 7x7 did at 4). This is
      how DeepLab made its `init.caffemodel`.
  classifier.3 (fc7, 4096 x 4096) -> every 4th output and input -> fc7 1x1x1024x1024.
  classifier.6 (ImageNet's 1000 classes) is dropped; fc8 keeps its initialiser.
  `fc_width` (a divisor of 4096, the model's config.model.backbone.fc_width) sets the decimation.

Caffe (layer names conv1_1 .. conv5_3, fc6, fc7, fc8*): weights [O, I, kh, kw] -> HWIO. fc6 and fc7 stored as
InnerProduct ([O, I * k * k]) are reshaped to convolutions; a full-size fc6 (4096 outputs, 7x7) is decimated as
above. fc8 is the layer named 'fc8' or, failing that, the shortest name starting with 'fc8' ('fc8_voc12'; a
multi-scale model's other branches carry longer names); it is kept when it reads fc7's output, whatever its class
count (the loader decides whether the count fits the model).

The first layer is rewritten for this project's input (see `scaleattn.weights.inputs`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from scaleattn.weights import inputs, sources

CONV_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
              "conv4_3", "conv5_1", "conv5_2", "conv5_3")
# torchvision `features` index of every VGG-16 convolution (ReLUs and pools sit between them).
TORCHVISION_INDEX = dict(zip(CONV_NAMES, (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), strict=True))
_CONV_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_FC_IN, _FC_OUT, _FC6_GRID = 512, 4096, 7
_FC6_TAPS = slice(0, _FC6_GRID, 3)  # taps 0, 3, 6
_TORCHVISION_IGNORED = ("classifier.6.weight", "classifier.6.bias")  # the 1000 ImageNet classes
_TIMM_RENAMES = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.", "head.fc.": "classifier.6."}

Params = dict[str, dict[str, np.ndarray]]


def torchvision_shapes() -> dict[str, tuple[int, ...]]:
  """The shape of every torchvision VGG-16 tensor the conversion reads."""
  shapes = {}
  for name, c_in, c_out in zip(CONV_NAMES, (3,) + _CONV_WIDTHS[:-1], _CONV_WIDTHS, strict=True):
    shapes[f"features.{TORCHVISION_INDEX[name]}.weight"] = (c_out, c_in, 3, 3)
    shapes[f"features.{TORCHVISION_INDEX[name]}.bias"] = (c_out,)
  shapes["classifier.0.weight"] = (_FC_OUT, _FC_IN * _FC6_GRID * _FC6_GRID)
  shapes["classifier.0.bias"] = (_FC_OUT,)
  shapes["classifier.3.weight"] = (_FC_OUT, _FC_OUT)
  shapes["classifier.3.bias"] = (_FC_OUT,)
  return shapes


def _check_torchvision(state: Mapping[str, Any], source: str) -> None:
  expected = torchvision_shapes()
  problems = [f"{k}: missing (expected shape {s})" for k, s in expected.items() if k not in state]
  problems += [f"{k}: shape {tuple(np.shape(state[k]))}, expected {s}" for k, s in expected.items()
               if k in state and tuple(np.shape(state[k])) != s]
  problems += [f"{k}: not a tensor of torchvision's VGG-16" for k in state
               if k not in expected and k not in _TORCHVISION_IGNORED]
  if problems:
    raise ValueError(f"{source} is not a torchvision VGG-16 state dict (batch-norm VGG is not supported):\n  "
                     + "\n  ".join(problems))


def _fc_step(fc_width: int) -> int:
  if fc_width < 1 or _FC_OUT % fc_width:
    raise ValueError(f"fc_width={fc_width}: expected a divisor of VGG-16's {_FC_OUT} fc filters (1024 for LargeFOV)")
  return _FC_OUT // fc_width


def _decimated_fc6(weight: np.ndarray, bias: np.ndarray, step: int) -> dict[str, np.ndarray]:
  """ImageNet fc6 [4096, 512, 7, 7] -> every `step`-th filter, taps 0, 3, 6: a 3x3 HWIO kernel."""
  return {"kernel": weight[::step, :, _FC6_TAPS, _FC6_TAPS].transpose(2, 3, 1, 0), "bias": bias[::step]}


def _hwio(weight: np.ndarray) -> np.ndarray:
  return weight.transpose(2, 3, 1, 0)


def _contiguous(params: Params) -> dict[str, Params]:
  return {"backbone": {layer: {k: np.ascontiguousarray(v, np.float32) for k, v in leaves.items()}
                       for layer, leaves in params.items()}}


def from_torchvision(state: Mapping[str, Any], *, source: str, mean_rgb: Sequence[float], fc_width: int = 1024,
                     **_: Any) -> dict[str, Params]:
  """torchvision VGG-16 state dict -> {'backbone': DeepLabLargeFOV parameters without fc8}."""
  step = _fc_step(fc_width)
  _check_torchvision(state, source)
  get = lambda k: np.asarray(state[k], np.float32)
  params: Params = {name: {"kernel": _hwio(get(f"features.{i}.weight")), "bias": get(f"features.{i}.bias")}
                    for name, i in TORCHVISION_INDEX.items()}
  params["conv1_1"] = dict(zip(("kernel", "bias"), inputs.from_torchvision(
      params["conv1_1"]["kernel"], params["conv1_1"]["bias"], mean_rgb), strict=True))
  fc6 = get("classifier.0.weight").reshape(_FC_OUT, _FC_IN, _FC6_GRID, _FC6_GRID)
  params["fc6"] = _decimated_fc6(fc6, get("classifier.0.bias"), step)
  params["fc7"] = {"kernel": get("classifier.3.weight")[::step, ::step].T[None, None],
                   "bias": get("classifier.3.bias")[::step]}
  return _contiguous(params)


def from_timm(state: Mapping[str, Any], *, source: str, mean_rgb: Sequence[float], fc_width: int = 1024,
              **_: Any) -> dict[str, Params]:
  """timm's VGG-16 (fc6/fc7 as convolutions under 'pre_logits', fc8 as 'head.fc') through the torchvision path."""
  renamed = {}
  for key, value in state.items():
    for old, new in _TIMM_RENAMES.items():
      key = key.replace(old, new, 1) if key.startswith(old) else key
    renamed[key] = value
  for key in ("classifier.0.weight", "classifier.3.weight"):
    if key in renamed:
      renamed[key] = np.reshape(renamed[key], (np.shape(renamed[key])[0], -1))
  return from_torchvision(renamed, source=source, mean_rgb=mean_rgb, fc_width=fc_width)


def _caffe_fc8_name(names: set[str]) -> str | None:
  layers = sorted({n.rpartition("/")[0] for n in names if n.startswith("fc8") and n.endswith("/weight")},
                  key=lambda n: (n != "fc8", len(n), n))
  return layers[0] if layers else None


def from_caffe(state: Mapping[str, Any], *, source: str, mean_rgb: Sequence[float], fc_width: int = 1024,
               **_: Any) -> dict[str, Params]:
  """A DeepLab/VGG-16 caffemodel's arrays (from `scaleattn.weights.caffe`) -> {'backbone': ...}, fc8 included
  when present (see the module docstring)."""
  required = [f"{layer}/{leaf}" for layer in CONV_NAMES + ("fc6", "fc7") for leaf in ("weight", "bias")]
  missing = sorted({k.rpartition("/")[0] for k in required if k not in state})
  if missing:
    found = sorted({k.rpartition("/")[0] for k in state})
    raise ValueError(f"{source}: not a complete DeepLab-LargeFOV caffemodel; missing layers {', '.join(missing)}; "
                     f"layers found: {', '.join(found)}")
  get = lambda k: np.asarray(state[k], np.float32)
  params: Params = {}
  c_in = 3
  for name in CONV_NAMES:
    weight = get(f"{name}/weight")
    if weight.ndim != 4 or weight.shape[1] != c_in or weight.shape[2:] != (3, 3):
      raise ValueError(f"{source}: layer {name} has weights of shape {weight.shape}, expected [O, {c_in}, 3, 3]")
    params[name] = {"kernel": _hwio(weight), "bias": get(f"{name}/bias")}
    c_in = weight.shape[0]
  params["conv1_1"] = dict(zip(("kernel", "bias"), inputs.from_caffe_bgr(
      params["conv1_1"]["kernel"], params["conv1_1"]["bias"], mean_rgb), strict=True))
  fc6, fc6_bias = get("fc6/weight"), get("fc6/bias")
  taps = fc6[0].size // c_in
  grid = int(round(np.sqrt(taps)))
  if grid * grid * c_in != fc6[0].size:
    raise ValueError(f"{source}: fc6 weights of shape {fc6.shape} are not a square kernel over {c_in} channels")
  fc6 = fc6.reshape(fc6.shape[0], c_in, grid, grid)
  if grid == _FC6_GRID and fc6.shape[0] == _FC_OUT:  # the original ImageNet VGG-16 caffemodel
    step = _fc_step(fc_width)
    params["fc6"] = _decimated_fc6(fc6, fc6_bias, step)
  else:
    step = 1
    params["fc6"] = {"kernel": _hwio(fc6), "bias": fc6_bias}
  fc_out = params["fc6"]["kernel"].shape[-1]
  fc7 = get("fc7/weight").reshape(get("fc7/weight").shape[0], -1)[::step, ::step]
  if fc7.shape[1] != fc_out:
    raise ValueError(f"{source}: fc7 weights of shape {get('fc7/weight').shape} do not read fc6's {fc_out} outputs")
  params["fc7"] = {"kernel": fc7.T[None, None], "bias": get("fc7/bias")[::step]}
  fc8 = _caffe_fc8_name(set(state))
  if fc8 is not None:
    weight = get(f"{fc8}/weight")
    weight = weight.reshape(weight.shape[0], -1)
    if weight.shape[1] == fc7.shape[0] and f"{fc8}/bias" in state:
      params["fc8"] = {"kernel": weight.T[None, None], "bias": get(f"{fc8}/bias")}
      logging.info("%s: fc8 from layer %s (%d classes).", source, fc8, weight.shape[0])
    else:
      logging.info("%s: layer %s (weights %s) does not read fc7's %d outputs; fc8 is not taken from the file.",
                   source, fc8, get(f"{fc8}/weight").shape, fc7.shape[0])
  return _contiguous(params)


def _has(*names: str):
  return lambda found: all(n in found for n in names)


TORCHVISION = sources.register(sources.Layout(
    name="torchvision-vgg16", description="torchvision's ImageNet VGG-16 ('features.N', 'classifier.N')",
    matches=_has("features.0.weight", "features.28.weight", "classifier.0.weight"), convert=from_torchvision,
    input_order="rgb"))
TIMM = sources.register(sources.Layout(
    name="timm-vgg16", description="timm's ImageNet VGG-16 ('features.N', 'pre_logits.fc1', 'head.fc')",
    matches=_has("features.0.weight", "features.28.weight", "pre_logits.fc1.weight"), convert=from_timm,
    input_order="rgb"))
CAFFE = sources.register(sources.Layout(
    name="caffe-largefov", description="DeepLab-LargeFOV / VGG-16 caffemodel ('conv1_1' .. 'conv5_3', 'fc6', 'fc7', "
    "'fc8*')", matches=_has("conv1_1/weight", "fc6/weight"), convert=from_caffe, input_order="bgr"))
