"""NumPy (float64) DeepLab v2 ResNet, written from PyTorch's and Caffe's layer definitions (OIHW kernels, NCHW-free
NHWC arrays), over units named independently of any weights layout: ('conv1',), (stage, block, unit) and
('aspp', i). Plus random unit sets and their rendering into each source layout's state dict."""
import itertools

import numpy as np
import numpy_reference as ref

EPS = 1e-5
UNITS = ("reduce", "conv3x3", "increase", "shortcut")


def conv(x, w_oihw, stride=1, padding=0, dilation=1):
  """PyTorch's Conv2d (no bias) on NHWC x: zero padding, then tap by tap with stride and dilation."""
  o, _, kh, kw = w_oihw.shape
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  span_h, span_w = dilation * (kh - 1) + 1, dilation * (kw - 1) + 1
  oh = (xp.shape[1] - span_h) // stride + 1
  ow = (xp.shape[2] - span_w) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, o))
  for i, j in itertools.product(range(kh), range(kw)):
    patch = xp[:, i * dilation:i * dilation + stride * (oh - 1) + 1:stride,
               j * dilation:j * dilation + stride * (ow - 1) + 1:stride]
    out += patch @ w_oihw[:, :, i, j].T
  return out


def batch_norm(x, bn):
  """Eval-mode BatchNorm: (x - running mean) / sqrt(running var + eps) * gamma + beta."""
  return (x - bn["mean"]) / np.sqrt(bn["var"] + EPS) * bn["gamma"] + bn["beta"]


def unit(x, units, key, stride=1, padding=0, dilation=1, relu=True):
  y = batch_norm(conv(x, units[key]["weight"], stride, padding, dilation), units[key]["bn"])
  return np.maximum(y, 0.0) if relu else y


def stem(x, units):
  """conv1 7x7 stride 2 pad 3 + BN + ReLU, then nn.MaxPool2d(3, 2, 1, ceil_mode=True)."""
  return ref.max_pool(unit(x, units, ("conv1",), stride=2, padding=3), 2)


def bottleneck(x, units, stage, block, stride, dilation, stride_in_3x3):
  key = lambda u: (stage, block, u)
  s1, s3 = (1, stride) if stride_in_3x3 else (stride, 1)
  h = unit(x, units, key("reduce"), stride=s1)
  h = unit(h, units, key("conv3x3"), stride=s3, padding=dilation, dilation=dilation)
  h = unit(h, units, key("increase"), relu=False)
  shortcut = unit(x, units, key("shortcut"), stride=stride, relu=False) if key("shortcut") in units else x
  return np.maximum(h + shortcut, 0.0)


def aspp(x, units, dilations):
  return sum(conv(x, units[("aspp", i)]["weight"], padding=d, dilation=d) + units[("aspp", i)]["bias"]
             for i, d in enumerate(dilations))


def stage_geometry(output_stride):
  """(first block's stride, dilation) of stages 2..5: DeepLab v2 at output stride 8, or 16."""
  return {8: [(1, 1), (2, 1), (1, 2), (1, 4)], 16: [(1, 1), (2, 1), (2, 1), (1, 2)]}[output_stride]


def deeplab_v2(x, units, depths, output_stride=8, stride_in_3x3=False, dilations=(6, 12, 18, 24)):
  """Returns (ASPP scores, res5 features)."""
  x = stem(x, units)
  for stage, depth, (stride, dilation) in zip((2, 3, 4, 5), depths, stage_geometry(output_stride), strict=True):
    for block in range(1, depth + 1):
      x = bottleneck(x, units, stage, block, stride if block == 1 else 1, dilation, stride_in_3x3)
  return aspp(x, units, dilations), x


def random_units(depths, width, num_classes, seed=0, num_aspp=4):
  """Random units of a DeepLab v2 ResNet with stem width `width` (kernels ~ N(0, 1/fan_in), positive variances)."""
  rng = np.random.default_rng(seed)

  def conv_unit(cin, cout, k):
    return {"weight": rng.normal(size=(cout, cin, k, k)) / np.sqrt(cin * k * k),
            "bn": {"mean": rng.normal(size=cout) * 0.1, "var": rng.uniform(0.5, 2.0, cout),
                   "gamma": rng.uniform(0.5, 1.5, cout), "beta": rng.normal(size=cout) * 0.1}}

  units = {("conv1",): conv_unit(3, width, 7)}
  cin = width
  for i, (stage, depth) in enumerate(zip((2, 3, 4, 5), depths, strict=True)):
    mid, out = width * 2 ** i, width * 4 * 2 ** i
    for block in range(1, depth + 1):
      units[(stage, block, "reduce")] = conv_unit(cin, mid, 1)
      units[(stage, block, "conv3x3")] = conv_unit(mid, mid, 3)
      units[(stage, block, "increase")] = conv_unit(mid, out, 1)
      if block == 1:
        units[(stage, block, "shortcut")] = conv_unit(cin, out, 1)
      cin = out
  for i in range(num_aspp):
    units[("aspp", i)] = {"weight": rng.normal(size=(num_classes, cin, 3, 3)) * 0.01,
                          "bias": rng.normal(size=num_classes) * 0.1}
  return units


# Each layout's names, written from its own definition (torchvision's models/resnet.py, deeplab-pytorch's
# libs/models/resnet.py and deeplabv2.py, the authors' DeepLab v2 prototxt as the Caffe reader flattens it).

def torchvision_state(units):
  state = {}
  names = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3"),
           "shortcut": ("downsample.0", "downsample.1")}
  for key, u in units.items():
    if key[0] == "aspp":
      continue
    conv_name, bn_name = ("conv1", "bn1") if key == ("conv1",) else (
        f"layer{key[0] - 1}.{key[1] - 1}.{n}" for n in names[key[2]])
    state[f"{conv_name}.weight"] = u["weight"]
    state.update({f"{bn_name}.running_mean": u["bn"]["mean"], f"{bn_name}.running_var": u["bn"]["var"],
                  f"{bn_name}.weight": u["bn"]["gamma"], f"{bn_name}.bias": u["bn"]["beta"],
                  f"{bn_name}.num_batches_tracked": np.array(7)})
  state["fc.weight"], state["fc.bias"] = np.zeros((10, 8)), np.zeros(10)
  return state


def deeplab_pytorch_state(units, prefix="base."):
  state = {}
  for key, u in units.items():
    if key[0] == "aspp":
      state[f"{prefix}aspp.c{key[1]}.weight"], state[f"{prefix}aspp.c{key[1]}.bias"] = u["weight"], u["bias"]
      continue
    m = f"{prefix}layer1.conv1" if key == ("conv1",) else f"{prefix}layer{key[0]}.block{key[1]}.{key[2]}"
    state.update({f"{m}.conv.weight": u["weight"], f"{m}.bn.running_mean": u["bn"]["mean"],
                  f"{m}.bn.running_var": u["bn"]["var"], f"{m}.bn.weight": u["bn"]["gamma"],
                  f"{m}.bn.bias": u["bn"]["beta"], f"{m}.bn.num_batches_tracked": np.array(3)})
  return state


def caffe_state(units, numbered_stages=(), head="voc12", copies=("res075", "res05")):
  """As the Caffe reader names a DeepLab v2 caffemodel; blocks of `numbered_stages` are a, b1, b2, ...; every
  layer also appears with each multi-scale copy's suffix (random values: they must be skipped)."""
  rng = np.random.default_rng(99)
  branch = {"reduce": "branch2a", "conv3x3": "branch2b", "increase": "branch2c", "shortcut": "branch1"}
  state = {}
  for key, u in units.items():
    if key[0] == "aspp":
      state[f"fc1_{head}_c{key[1]}/weight"], state[f"fc1_{head}_c{key[1]}/bias"] = u["weight"], u["bias"]
      continue
    if key == ("conv1",):
      conv_name, bn_name, scale_name = "conv1", "bn_conv1", "scale_conv1"
    else:
      stage, block, name = key
      letter = "a" if block == 1 else (f"b{block - 1}" if stage in numbered_stages else "abcdefghijklmnop"[block - 1])
      suffix = f"{stage}{letter}_{branch[name]}"
      conv_name, bn_name, scale_name = f"res{suffix}", f"bn{suffix}", f"scale{suffix}"
    state.update({f"{conv_name}/weight": u["weight"], f"{bn_name}/mean": u["bn"]["mean"],
                  f"{bn_name}/variance": u["bn"]["var"], f"{scale_name}/gamma": u["bn"]["gamma"],
                  f"{scale_name}/beta": u["bn"]["beta"]})
  for name, value in list(state.items()):
    layer, field = name.split("/")
    for copy in copies:
      state[f"{layer}_{copy}/{field}"] = rng.normal(size=value.shape)
  return state
