"""NumPy (float64) references for the model tests, written from the paper's and Caffe's definitions, plus helpers
that keep the tests fast (NumPy-drawn parameters, cheap dropout keys)."""
import itertools

import jax
import numpy as np


def conv(x, kernel, bias, dilation=1):
  """'SAME' 2-D convolution of NHWC x with an HWIO kernel, summed tap by tap."""
  kh, kw = kernel.shape[:2]
  ph, pw = dilation * (kh // 2), dilation * (kw // 2)
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[3],))
  for i, j in itertools.product(range(kh), range(kw)):
    out += xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w] @ kernel[i, j]
  return out + bias


def max_pool(x, stride):
  """Caffe's 3x3 max-pool with pad 1 and ceil-mode output size ceil((n + 2 - 3) / stride) + 1, window by window
  (the padding never wins: windows are clipped to the image)."""
  h, w = x.shape[1:3]
  oh, ow = -(-(h - 1) // stride) + 1, -(-(w - 1) // stride) + 1
  out = np.empty((x.shape[0], oh, ow, x.shape[3]), x.dtype)
  for i, j in itertools.product(range(oh), range(ow)):
    r0, c0 = i * stride - 1, j * stride - 1
    out[:, i, j] = x[:, max(r0, 0):r0 + 3, max(c0, 0):c0 + 3].max(axis=(1, 2))
  return out


def bilinear(x, size):
  """Align-corners bilinear resize of [B, H, W, ...]: output pixel i samples input position i * (H-1) / (h-1)."""
  h_in, w_in = x.shape[1:3]
  h, w = size
  out = np.empty((x.shape[0], h, w) + x.shape[3:])
  for i, j in itertools.product(range(h), range(w)):
    r = i * (h_in - 1) / (h - 1) if h > 1 else 0.0
    c = j * (w_in - 1) / (w - 1) if w > 1 else 0.0
    r0, c0 = min(int(r), max(h_in - 2, 0)), min(int(c), max(w_in - 2, 0))
    r1, c1 = min(r0 + 1, h_in - 1), min(c0 + 1, w_in - 1)
    fr, fc = r - r0, c - c0
    out[:, i, j] = ((1 - fr) * (1 - fc) * x[:, r0, c0] + (1 - fr) * fc * x[:, r0, c1]
                    + fr * (1 - fc) * x[:, r1, c0] + fr * fc * x[:, r1, c1])
  return out


def largefov(params, x, depths, fc6_dilation, *, conv5_dilation, stride1_pools):
  """DeepLab-LargeFOV in eval mode: conv blocks (conv5 dilated) each followed by a 3x3 pad-1 max-pool
  (stride 2, 2, 2, 1, 1; without the stride-1 ones if not stride1_pools), fc6 dilated (its kernel's size from
  its parameters), fc7 and fc8 1x1, ReLU after every layer but fc8. Returns (scores, fc7)."""
  relu = lambda v: np.maximum(v, 0.0)
  layer = lambda name, v, dilation=1: conv(v, params[name]["kernel"], params[name]["bias"], dilation)
  for block, (depth, stride) in enumerate(zip(depths, (2, 2, 2, 1, 1), strict=True), start=1):
    for i in range(1, depth + 1):
      x = relu(layer(f"conv{block}_{i}", x, conv5_dilation if block == 5 else 1))
    if stride == 2 or stride1_pools:
      x = max_pool(x, stride)
  fc7 = relu(layer("fc7", relu(layer("fc6", x, fc6_dilation))))
  return layer("fc8", fc7), fc7


def vgg16_largefov_layers(size: int) -> dict:
  """(height, width, cin, cout, kernel, dilation): count for DeepLab-LargeFOV (21 classes) on a size x size image,
  written out from the architecture: VGG-16's 3x3 convs, Caffe ceil-mode pools (n -> n // 2 + 1) of stride 2, 2, 2,
  1, 1, conv5 dilated by 2, fc6 3x3 dilated by 12, fc7 and fc8 1x1."""
  half, quarter = size // 2 + 1, (size // 2 + 1) // 2 + 1
  out = quarter // 2 + 1  # three stride-2 pools, then stride 1
  return {(size, size, 3, 64, 3, 1): 1, (size, size, 64, 64, 3, 1): 1, (half, half, 64, 128, 3, 1): 1,
          (half, half, 128, 128, 3, 1): 1, (quarter, quarter, 128, 256, 3, 1): 1,
          (quarter, quarter, 256, 256, 3, 1): 2, (out, out, 256, 512, 3, 1): 1, (out, out, 512, 512, 3, 1): 2,
          (out, out, 512, 512, 3, 2): 3, (out, out, 512, 1024, 3, 12): 1, (out, out, 1024, 1024, 1, 1): 1,
          (out, out, 1024, 21, 1, 1): 1}


def random_variables(module, *args, seed=0, **kwargs):
  """Variables of `module`'s structure drawn with NumPy (kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.01)): no
  compiled initialiser, so tests stay fast, and activations stay O(1) through a network."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)
  scale = lambda shape: 1 / np.sqrt(np.prod(shape[:-1])) if len(shape) > 1 else 0.1
  return jax.tree.map(lambda v: (rng.normal(size=v.shape) * scale(v.shape)).astype(np.float32), abstract)


def dropout_key(seed):
  """A dropout key of the 'rbg' kind: its bits compile several times faster than threefry's on CPU."""
  return jax.random.key(seed, impl="rbg")
