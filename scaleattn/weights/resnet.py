"""DeepLab v2 ResNet weights from three sources into `scaleattn.models.resnet.DeepLabV2` variables.

Layouts (registered with `scaleattn.weights.sources`; each recognised by its names):
  torchvision_resnet   torchvision's ImageNet ResNet-50/101/152 (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`,
                       `layer1.0.downsample.0.weight`, ...): stride in the 3x3 (run it with `stride_in_3x3=True`),
                       RGB in [0, 1] normalised by ImageNet's mean and std; `fc` is dropped, there is no ASPP.
  caffe_deeplab_resnet the authors' DeepLab v2 caffemodels, as `sources.read_any` reads them (`conv1/weight`,
                       `bn_conv1/mean`, `scale_conv1/gamma`, `res2a_branch1/weight`, `res4b22_branch2c/weight`,
                       `fc1_voc12_c0/weight`, ...): stride in the 1x1 reduce, BGR 0..255 minus Caffe's mean. The
                       multi-scale copies (`*_res075`, `*_res05`: the same shared weights) and `fc1000` are skipped.
  deeplab_pytorch      deeplab-pytorch's DeepLab v2 (MSC) checkpoints (`base.layer1.conv1.conv.weight`,
                       `base.layer2.block1.reduce.bn.running_mean`, `...conv3x3...`, `...increase...`,
                       `...shortcut...`, `base.aspp.c0.weight`; `base.` optional): Caffe's weights and input.

Result: {'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}} in DeepLabV2's names (`stem/conv1`,
`res3_1/reduce`, `aspp/c0`), kernels HWIO; BatchNorm as (mean, var, scale, bias) for eps 1e-5. The depth comes from
the names; `check_fit` (or `convert(..., expected=...)`) compares the result with a model's variables and names the
first parameter that does not fit. The first convolution absorbs the difference between the source's input and the
pipeline's (RGB 0..255 minus `mean_rgb`): input channels flipped for BGR sources, scaled by the source's
normalisation, and the mean's difference moved into conv1's BatchNorm mean. That last step is exact away from
conv1's 3-pixel zero-padded border (there the source pads with its own zero, another colour); a source whose mean
equals `mean_rgb` (Caffe's sources with DeepLab's mean) converts exactly everywhere.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from scaleattn.data.preprocessing import CAFFE_MEAN_RGB
from scaleattn.models.resnet import STAGES
from scaleattn.weights import sources

# What the sources' networks take, as RGB 0..255 minus `mean`, times `scale` per channel.
TORCHVISION_MEAN_RGB = tuple(255.0 * m for m in (0.485, 0.456, 0.406))
TORCHVISION_SCALE_RGB = tuple(1.0 / (255.0 * s) for s in (0.229, 0.224, 0.225))
UNITS = ("reduce", "conv3x3", "increase", "shortcut")  # a bottleneck's convolutions, shortcut in first blocks only
OPTIONAL_LAYERS = ("aspp",)  # what an ImageNet source lacks: the model keeps its initialisation there

Unit = tuple[int, int, str]  # (stage, block, unit); (1, 1, 'conv1') is the stem
Variables = dict[str, Any]


class UnitNames(NamedTuple):
  """A source's names for one convolution and its BatchNorm."""
  kernel: str
  mean: str
  var: str
  scale: str
  bias: str


class Naming(NamedTuple):
  """How a layout names units and ASPP branches, and what its network takes as input."""
  what: str
  unit_names: Callable[[set[str], Unit], UnitNames]
  aspp_names: Callable[[set[str]], list[tuple[str, str]]]
  input_order: str
  mean_rgb: Sequence[float]
  scale_rgb: Sequence[float]
  ignored: Callable[[str], bool]
  stride_in_3x3: bool  # where the stage's first block strides


def _units(names: set[str], naming: Naming, source: str) -> Iterator[Unit]:
  """The stem, then every block's units, stage by stage, as many blocks as the names have."""
  yield (1, 1, "conv1")
  for stage in STAGES:
    block = 1
    while naming.unit_names(names, (stage, block, "reduce")).kernel in names:
      yield from ((stage, block, u) for u in UNITS if block == 1 or u != "shortcut")
      block += 1
    if block == 1:
      raise sources.missing_error(source, naming.what, [naming.unit_names(names, (stage, 1, "reduce")).kernel],
                                  names)


def _path(unit: Unit) -> tuple[str, ...]:
  stage, block, name = unit
  return ("stem", name) if name == "conv1" else (f"res{stage}_{block}", name)


def _set(tree: dict, path: Sequence[str], leaves: dict) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = leaves


def convert(naming: Naming, state: Mapping[str, Any], *, source: str = "state dict",
            mean_rgb: Sequence[float] = CAFFE_MEAN_RGB, expected: Mapping[str, Any] | None = None,
            stride_in_3x3: bool | None = None) -> Variables:
  """A state dict in `naming`'s layout -> DeepLabV2 variables (module docstring); `source` names it in errors;
  `expected`: a model's variables (or their shapes) the result must fit (`check_fit`); `stride_in_3x3`: the
  model's stride layout, which must be the source's (shapes cannot tell them apart)."""
  if len(mean_rgb) != 3:
    raise ValueError(f"mean_rgb={tuple(mean_rgb)}: expected 3 values (R, G, B)")
  if stride_in_3x3 is not None and stride_in_3x3 != naming.stride_in_3x3 and naming is TORCHVISION:
    # ImageNet classification weights initialise either layout: where a stage's first block strides is a choice
    # fine-tuning absorbs (DeepLab v2's own ImageNet init strides in the 1x1), not a trained segmentation model's.
    logging.warning("%s: torchvision's ResNet strides in the 3x3 convolution, the model in the 1x1 reduce "
                    "convolution: its weights initialise the model, which is not the same network.", source)
  elif stride_in_3x3 is not None and stride_in_3x3 != naming.stride_in_3x3:
    raise ValueError(f"{source}: a {naming.what} strides in its {'3x3' if naming.stride_in_3x3 else '1x1 reduce'} "
                     f"convolution; set config.model.backbone.stride_in_3x3={naming.stride_in_3x3} (the model has "
                     f"{stride_in_3x3})")
  names = set(state)
  used: set[str] = set()

  def get(name: str) -> np.ndarray:
    if name not in state:
      raise sources.missing_error(source, naming.what, [name], names)
    used.add(name)
    return np.asarray(state[name], np.float64)

  params: dict = {}
  stats: dict = {}
  for unit in _units(names, naming, source):
    n = naming.unit_names(names, unit)
    kernel = get(n.kernel).transpose(2, 3, 1, 0)  # OIHW -> HWIO
    mean = get(n.mean)
    if unit[2] == "conv1":
      kernel, offset = fold_input(kernel, naming, mean_rgb)
      mean = mean - offset  # the source's conv1 output is ours plus `offset`
    _set(params, _path(unit), {"kernel": kernel.astype(np.float32)})
    _set(stats, _path(unit), {k: v.astype(np.float32) for k, v in
                              (("mean", mean), ("var", get(n.var)), ("scale", get(n.scale)), ("bias", get(n.bias)))})
  aspp = naming.aspp_names(names)
  if aspp:
    params["aspp"] = {f"c{i}": {"kernel": get(w).transpose(2, 3, 1, 0).astype(np.float32),
                                "bias": get(b).astype(np.float32)} for i, (w, b) in enumerate(aspp)}
  unknown = sorted(k for k in names - used if not naming.ignored(k))
  if unknown:
    raise ValueError(f"{source}: names a {naming.what} does not have (another architecture?): {', '.join(unknown)}")
  variables = {"params": {"backbone": params}, "batch_stats": {"backbone": stats}}
  if expected is not None:
    check_fit(variables, expected, source)
  return variables


def fold_input(kernel: np.ndarray, naming: Naming, mean_rgb: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """The source's first kernel (HWIO, input channels in its order) for our input, and the per-output offset the
  source's convolution has on top: its input is scale * (ours + mean_rgb - source mean), per RGB channel."""
  if naming.input_order == "bgr":
    kernel = kernel[:, :, ::-1]
  scale = np.asarray(naming.scale_rgb, np.float64)
  shift = scale * (np.asarray(mean_rgb, np.float64) - np.asarray(naming.mean_rgb, np.float64))
  return kernel * scale[:, None], np.einsum("hwio,i->o", kernel, shift)


def check_fit(converted: Variables, expected: Mapping[str, Any], source: str) -> None:
  """Raises at the first converted variable, in network order, that the model (`expected`: a DeepLabV2's
  variables, or a MultiScaleNet's with 'backbone'; arrays or shapes) lacks or has in another shape, then at the
  first model variable the checkpoint lacks. Layers in OPTIONAL_LAYERS may be absent from `converted` as a whole."""
  for collection, tree in converted.items():
    want = expected.get(collection, {})
    have, model = _flat(tree["backbone"]), _flat(want.get("backbone", want))
    for path, shape in have.items():
      if path not in model:
        raise ValueError(f"{source} does not fit the model: {collection} backbone/{path} (shape {shape}) is not in "
                         "the model (another depth?)")
      if model[path] != shape:
        raise ValueError(f"{source} does not fit the model: {collection} backbone/{path} is {shape} in the "
                         f"checkpoint, {model[path]} in the model (another depth, width or class count?)")
    absent_layers = {p.split("/")[0] for p in model} - {p.split("/")[0] for p in have}
    for path, shape in model.items():
      if path not in have and not (path.split("/")[0] in OPTIONAL_LAYERS and path.split("/")[0] in absent_layers):
        raise ValueError(f"{source} does not fit the model: {collection} backbone/{path} (shape {shape}) is not in "
                         "the checkpoint (another depth?)")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = tuple(np.shape(value))
  return out


# torchvision ----------------------------------------------------------------------------------------------------

_TORCHVISION_UNITS = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3"),
                      "shortcut": ("downsample.0", "downsample.1")}


def _torchvision_unit(names: set[str], unit: Unit) -> UnitNames:
  stage, block, name = unit
  conv, bn = ("conv1", "bn1") if name == "conv1" else (
      f"layer{stage - 1}.{block - 1}.{c}" for c in _TORCHVISION_UNITS[name])
  return UnitNames(f"{conv}.weight", f"{bn}.running_mean", f"{bn}.running_var", f"{bn}.weight", f"{bn}.bias")


TORCHVISION = Naming("torchvision ResNet (bottleneck)", _torchvision_unit, lambda names: [], "rgb",
                     TORCHVISION_MEAN_RGB, TORCHVISION_SCALE_RGB,
                     lambda k: k.startswith("fc.") or k.endswith(".num_batches_tracked"), stride_in_3x3=True)

# deeplab-pytorch -------------------------------------------------------------------------------------------------


def _deeplab_pytorch_prefix(names: set[str]) -> str:
  return "base." if "base.layer1.conv1.conv.weight" in names else ""


def _deeplab_pytorch_unit(names: set[str], unit: Unit) -> UnitNames:
  stage, block, name = unit
  p = _deeplab_pytorch_prefix(names)
  u = f"{p}layer1.conv1" if name == "conv1" else f"{p}layer{stage}.block{block}.{name}"
  return UnitNames(f"{u}.conv.weight", f"{u}.bn.running_mean", f"{u}.bn.running_var", f"{u}.bn.weight",
                   f"{u}.bn.bias")


def _deeplab_pytorch_aspp(names: set[str]) -> list[tuple[str, str]]:
  p = _deeplab_pytorch_prefix(names)
  count = sum(1 for k in names if re.fullmatch(rf"{re.escape(p)}aspp\.c\d+\.weight", k))
  return [(f"{p}aspp.c{i}.weight", f"{p}aspp.c{i}.bias") for i in range(count)]


DEEPLAB_PYTORCH = Naming("deeplab-pytorch DeepLab v2", _deeplab_pytorch_unit, _deeplab_pytorch_aspp, "bgr",
                         CAFFE_MEAN_RGB, (1.0, 1.0, 1.0), lambda k: k.endswith(".num_batches_tracked"),
                         stride_in_3x3=False)

# Caffe -----------------------------------------------------------------------------------------------------------

_CAFFE_BRANCHES = {"reduce": "branch2a", "conv3x3": "branch2b", "increase": "branch2c", "shortcut": "branch1"}
_CAFFE_COPY = re.compile(r"(^|_)res0(75|5)(_|/|$)")  # the multi-scale branches' copies of the shared weights
_CAFFE_ASPP = re.compile(r"fc1_(\w+?)_c(\d+)/weight")


def _caffe_block(names: set[str], stage: int, block: int) -> str:
  """'a', 'b', 'c', ... or, where the stage numbers them (ResNet-101/152's deep stages), 'a', 'b1', 'b2', ..."""
  if block == 1:
    return "a"
  return f"b{block - 1}" if f"res{stage}b1_branch2a/weight" in names else chr(ord("a") + block - 1)


def _caffe_unit(names: set[str], unit: Unit) -> UnitNames:
  stage, block, name = unit
  if name == "conv1":
    conv, bn, scale = "conv1", "bn_conv1", "scale_conv1"
  else:
    suffix = f"{stage}{_caffe_block(names, stage, block)}_{_CAFFE_BRANCHES[name]}"
    conv, bn, scale = f"res{suffix}", f"bn{suffix}", f"scale{suffix}"
  return UnitNames(f"{conv}/weight", f"{bn}/mean", f"{bn}/variance", f"{scale}/gamma", f"{scale}/beta")


def _caffe_aspp(names: set[str]) -> list[tuple[str, str]]:
  found = sorted((m.group(1), int(m.group(2))) for k in names if (m := _CAFFE_ASPP.fullmatch(k)))
  tags = sorted({tag for tag, _ in found})
  if len(tags) > 1:
    raise ValueError(f"Caffe DeepLab v2: ASPP branches of several heads ({', '.join(f'fc1_{t}' for t in tags)}); "
                     "expected one")
  return [(f"fc1_{tag}_c{i}/weight", f"fc1_{tag}_c{i}/bias") for tag, i in sorted(found, key=lambda f: f[1])]


CAFFE = Naming("Caffe DeepLab v2 ResNet", _caffe_unit, _caffe_aspp, "bgr", CAFFE_MEAN_RGB, (1.0, 1.0, 1.0),
               lambda k: bool(_CAFFE_COPY.search(k)) or k.startswith("fc1000/"), stride_in_3x3=False)


torchvision_to_deeplab = functools.partial(convert, TORCHVISION)
caffe_to_deeplab = functools.partial(convert, CAFFE)
deeplab_pytorch_to_deeplab = functools.partial(convert, DEEPLAB_PYTORCH)

sources.register(sources.Layout(
    "torchvision_resnet", "torchvision ImageNet ResNet-50/101/152 (run with stride_in_3x3=True)",
    lambda names: {"conv1.weight", "bn1.running_mean", "layer1.0.conv3.weight"} <= names, torchvision_to_deeplab,
    "rgb"))
sources.register(sources.Layout(
    "caffe_deeplab_resnet", "the authors' DeepLab v2 ResNet caffemodels (and their ImageNet init)",
    lambda names: {"conv1/weight", "bn_conv1/mean", "res2a_branch2a/weight"} <= names, caffe_to_deeplab, "bgr"))
sources.register(sources.Layout(
    "deeplab_pytorch", "deeplab-pytorch DeepLab v2 ResNet checkpoints (MSC or not)",
    lambda names: bool({"base.layer1.conv1.conv.weight", "layer1.conv1.conv.weight"} & names),
    deeplab_pytorch_to_deeplab, "bgr"))
