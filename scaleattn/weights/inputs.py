"""What a source's first convolution expects as input, rewritten for this project's input: RGB in 0..255 minus
`mean_rgb` (config.input.mean_rgb). Each source's input is a per-channel affine map of the same pixels, so the
first layer absorbs the difference exactly (except at the zero-padded border, where zero means a different colour).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Caffe models (VGG-16, DeepLab) take BGR 0..255 minus this mean (BGR order).
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)
# torchvision/timm ImageNet models take RGB in [0, 1] minus this mean, divided by this std.
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


def _check_mean(mean_rgb: Sequence[float]) -> np.ndarray:
  if len(mean_rgb) != 3:
    raise ValueError(f"mean_rgb={tuple(mean_rgb)}: expected 3 values (R, G, B)")
  return np.asarray(mean_rgb, np.float64)


def _affine(kernel: np.ndarray, bias: np.ndarray, scale: np.ndarray, shift: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
  """A conv (HWIO) whose input x_src = scale * x + shift per channel, rewritten to take x."""
  kernel = kernel.astype(np.float64)
  new_bias = bias.astype(np.float64) + np.einsum("hwio,i->o", kernel, shift)
  return (kernel * scale[:, None]).astype(np.float32), new_bias.astype(np.float32)


def from_torchvision(kernel: np.ndarray, bias: np.ndarray, mean_rgb: Sequence[float]
                     ) -> tuple[np.ndarray, np.ndarray]:
  """torchvision's x_tv = (img / 255 - m) / s = a x + t for x = img - mean_rgb: a = 1 / (255 s),
  t = (mean_rgb - 255 m) a."""
  scale = 1.0 / (255.0 * np.asarray(TORCHVISION_STD, np.float64))
  return _affine(kernel, bias, scale, (_check_mean(mean_rgb) - 255.0 * np.asarray(TORCHVISION_MEAN)) * scale)


def from_caffe_bgr(kernel_bgr: np.ndarray, bias: np.ndarray, mean_rgb: Sequence[float]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """A Caffe first layer (HWIO, input channels B, G, R) for RGB input: the input channels reversed, and
  x_caffe = x + (mean_rgb - Caffe's mean) folded into the bias (nothing when the pipeline uses Caffe's mean)."""
  if kernel_bgr.shape[2] != 3:
    raise ValueError(f"first layer with {kernel_bgr.shape[2]} input channels, expected 3 (B, G, R)")
  shift = _check_mean(mean_rgb) - np.asarray(CAFFE_MEAN_BGR[::-1], np.float64)
  return _affine(kernel_bgr[:, :, ::-1], bias, np.ones(3), shift)
