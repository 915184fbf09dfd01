"""Run by test_topology.py in a process of its own with 16 fake CPU devices: one train step of a global batch of 30
on data axes of 1, 4, 8 and 16 devices and in microbatches, and an evaluation on 1 and 8 devices. Writes the
losses, the updated parameters and the confusion matrices to an .npz file."""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from configs import shapes  # noqa: E402
from scaleattn import evaluate, input_pipeline, sharding, steps  # noqa: E402
from scaleattn.state import build_experiment  # noqa: E402

# name: (data axis, microbatches, dropout)
TRAIN_CASES = {"d1": (1, 1, True), "d4": (4, 1, True), "d16": (16, 1, True), "d1_nodropout": (1, 1, False),
               "d8_k5": (8, 5, False)}


def config(data_dir: str, devices: int, microbatches: int = 1, dropout: bool = True):
  c = shapes.get_config("smoke")
  c.dataset.data_dir = data_dir
  c.mesh.data = devices
  c.train.batch_size, c.train.microbatches, c.eval.batch_size = 30, microbatches, 8
  c.input.crop_size, c.input.eval_size = 33, 81
  c.model.conv_impl = "xla"  # compiles faster than the CPU kernels; the batch layout is the same
  if not dropout:
    c.model.backbone.dropout_rate = c.model.fusion.dropout_rate = 0.0
  return c


def main(data_dir: str, out: str) -> None:
  results = {}
  for name, (devices, k, dropout) in TRAIN_CASES.items():
    c = config(data_dir, devices, k, dropout)
    exp = build_experiment(c)
    data = input_pipeline.create_datasets(c, data_devices=devices)
    batch = sharding.global_batch(exp.mesh, next(data.train_batches(0)), batch_axis=1)
    state, m = steps.jit_train_step(exp)(exp.init_state(jax.random.key(0)), batch, jax.random.key(1))
    results[f"{name}/loss"] = np.asarray(m.compute()["loss"])
    results[f"{name}/rows"] = np.asarray(batch["image"].shape[:2])
    for path, value in traverse_util.flatten_dict(jax.device_get(state.params), sep="/").items():
      results[f"{name}/params/{path}"] = np.asarray(value)
  for devices in (1, 8):
    c = config(data_dir, devices)
    exp = build_experiment(c)
    data = input_pipeline.create_datasets(c, data_devices=devices)
    params = exp.init_state(jax.random.key(0)).params
    result = evaluate.evaluate_split(steps.jit_eval_step(exp), params, exp, data.eval_batches("validation"),
                                     data.num_eval_batches("validation"), data.class_names)
    results[f"eval_d{devices}/miou"] = np.asarray(result["miou"])
    results[f"eval_d{devices}/pixel_accuracy"] = np.asarray(result["pixel_accuracy"])
  np.savez(out, **results)


if __name__ == "__main__":
  main(*sys.argv[1:])
