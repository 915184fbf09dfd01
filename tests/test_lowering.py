"""The paper's train and eval steps (full VGG-16 widths, scales 1, 0.75, 0.5, batch 30 padded for the mesh), and
DeepLab v2's (ResNet-101 + ASPP, the same scales, batch 10), lowered on this CPU host for GPU and TPU, with abstract
inputs and an abstract mesh of 1 or 8 devices, nothing compiled.

What it shows: the program a GPU or TPU would compile is plain StableHLO (no custom calls, in particular no
CPU-only ones), partitioned for the mesh, and built from `lax` convolutions only: 'auto' kernels resolve from the
target platform, not from this host. What it does not show: that XLA:GPU or XLA:TPU compiles it, its speed or its
memory; those need the device (README, "TPU and GPU")."""
import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType

from configs import deeplab_v2, voc
from scaleattn.data import input_pipeline
from scaleattn.evaluation import segmentation
from scaleattn.experiment import Experiment, build_experiment
from scaleattn.training import train_step

SCALES = 3
LAYERS = 16  # conv1_1 .. conv5_3, fc6, fc7, fc8
HEAD = 2  # the attention head's 3x3 conv (on the scale-1 grid; the others project per tap) and its 1x1
# Forward, input gradient and weight gradient of every layer at every scale, but no input gradient of conv1_1.
TRAIN_CONVOLUTIONS = 3 * (SCALES * LAYERS + HEAD) - SCALES
EVAL_CONVOLUTIONS = SCALES * LAYERS + HEAD

# ResNet-101 (He et al. 2016, table 1): bottlenecks per stage conv2_x .. conv5_x, three convolutions each, a 1x1
# projection on each stage's first block, the 7x7 stem; DeepLab v2's ASPP adds four 3x3 branches. Max fusion has no
# convolutions, and BatchNorm is frozen (no convolution of its own).
RESNET101_BLOCKS = (3, 4, 23, 3)
RESNET_LAYERS = 1 + 3 * sum(RESNET101_BLOCKS) + len(RESNET101_BLOCKS) + 4  # 108
RESNET_TRAIN_CONVOLUTIONS = 3 * SCALES * RESNET_LAYERS - SCALES  # no input gradient of the stem
RESNET_EVAL_CONVOLUTIONS = SCALES * RESNET_LAYERS
CONFIGS = {"voc": voc, "deeplab_v2": deeplab_v2}


@functools.cache
def _experiment(name: str, platform: str, dtype: str, devices: int, conv_impl: str, microbatches: int, remat: str
                ) -> Experiment:
  """One experiment per setting, shared by the train and eval cases (building ResNet-101's traces its init)."""
  config = CONFIGS[name].get_config()
  config.model.dtype, config.model.conv_impl, config.model.remat = dtype, conv_impl, remat
  config.train.microbatches = microbatches
  mesh = AbstractMesh((devices,), ("data",), axis_types=(AxisType.Auto,))
  return build_experiment(config, mesh, platform=platform)


def _lower(platform: str, dtype: str, devices: int, train: bool = True, conv_impl: str = "auto",
           microbatches: int = 1, remat: str = "none", config: str = "voc") -> str:
  exp = _experiment(config, platform, dtype, devices, conv_impl, microbatches, remat)
  key = jax.eval_shape(lambda: jax.random.key(0))
  if train:
    rows = input_pipeline.batch_layout(exp.config.train.batch_size, microbatches, devices, 1).rows
    batch = {"image": jax.ShapeDtypeStruct((microbatches, rows, 321, 321, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((microbatches, rows, 321, 321), jnp.int32)}
    traced = train_step.jit_train_step(exp).trace(exp.abstract_state, batch, key)
  else:
    size = exp.config.input.eval_size
    batch = {"image": jax.ShapeDtypeStruct((devices, size, size, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((devices, size, size), jnp.int32),
             "mask": jax.ShapeDtypeStruct((devices, size, size), jnp.bool_)}
    traced = segmentation.jit_eval_step(exp).trace(exp.abstract_state.weights, batch)
  return traced.lower(lowering_platforms=(platform,)).as_text()


def _check(text: str, devices: int, convolutions: int, dtype: str) -> None:
  assert re.findall(r"custom_call @(\w+)", text) == []
  assert f"mhlo.num_partitions = {devices} " in text
  assert text.count("stablehlo.convolution") == convolutions
  assert ("xbf16>" in text) == (dtype == "bfloat16")


# Every platform with each precision and each mesh size (pairwise: the axes do not interact in the lowering).
@pytest.mark.parametrize("platform, dtype, devices", [("cuda", "float32", 1), ("cuda", "bfloat16", 8),
                                                      ("tpu", "float32", 8), ("tpu", "bfloat16", 1)])
def test_train_step_lowers_for_gpu_and_tpu(platform, dtype, devices):
  _check(_lower(platform, dtype, devices), devices, TRAIN_CONVOLUTIONS, dtype)


@pytest.mark.parametrize("platform, dtype, devices", [("cuda", "float32", 1), ("tpu", "bfloat16", 8)])
def test_eval_step_lowers_for_gpu_and_tpu(platform, dtype, devices):
  _check(_lower(platform, dtype, devices, train=False), devices, EVAL_CONVOLUTIONS, dtype)


def test_accumulated_rematerialised_step_lowers_with_its_scan_and_barriers():
  """3 microbatches (a loop over slices of the batch) and per-block rematerialisation: the TPU program keeps the
  loop and the optimisation barriers that stop the compiler from undoing the recomputation."""
  text = _lower("tpu", "bfloat16", 8, microbatches=3, remat="per_block")
  assert re.findall(r"custom_call @(\w+)", text) == []
  assert "stablehlo.while" in text and "stablehlo.optimization_barrier" in text
  assert "stablehlo.optimization_barrier" not in _lower("tpu", "bfloat16", 8, microbatches=3)


def test_the_check_sees_cpu_kernels():
  """Forcing the CPU kernels into a GPU program is visible: Winograd and per-tap matmuls replace convolutions."""
  text = _lower("cuda", "float32", 1, train=False, conv_impl="cpu")
  assert text.count("stablehlo.convolution") < EVAL_CONVOLUTIONS // 2


# Both platforms, both precisions, both mesh sizes; the eval cases reuse the train cases' experiments.
@pytest.mark.parametrize("platform, dtype, devices", [("cuda", "float32", 1), ("tpu", "bfloat16", 8)])
def test_deeplab_v2_train_step_lowers_for_gpu_and_tpu(platform, dtype, devices):
  """ResNet-101 + ASPP at every scale, frozen BatchNorm: every convolution of the network, forward and backward."""
  assert RESNET_LAYERS == 108
  _check(_lower(platform, dtype, devices, config="deeplab_v2"), devices, RESNET_TRAIN_CONVOLUTIONS, dtype)


@pytest.mark.parametrize("platform, dtype, devices", [("cuda", "float32", 1), ("tpu", "bfloat16", 8)])
def test_deeplab_v2_eval_step_lowers_for_gpu_and_tpu(platform, dtype, devices):
  _check(_lower(platform, dtype, devices, train=False, config="deeplab_v2"), devices, RESNET_EVAL_CONVOLUTIONS, dtype)
