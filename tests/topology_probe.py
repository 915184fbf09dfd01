"""Run by test_topology.py in a process of its own with 8 fake CPU devices: STEPS train steps of the smoke config
(warm-up 0, so every step's learning rate is non-zero) with a global batch of 6 on data axes of 1 and 4 devices and
in microbatches, and an evaluation on 1 and 8 devices. Writes the initial and updated parameters, the losses and
the confusion matrices to an .npz file."""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from configs import shapes  # noqa: E402
from scaleattn import sharding  # noqa: E402
from scaleattn.data import input_pipeline  # noqa: E402
from scaleattn.evaluation import segmentation  # noqa: E402
from scaleattn.experiment import build_experiment  # noqa: E402
from scaleattn.training import train_step  # noqa: E402

STEPS = 4
BATCH = 6
# name: (data axis, microbatches, dropout)
TRAIN_CASES = {"d1": (1, 1, True), "d4": (4, 1, True), "d1_nodropout": (1, 1, False), "d4_k2": (4, 2, False)}


def config(data_dir: str, devices: int, microbatches: int = 1, dropout: bool = True):
  c = shapes.get_config("smoke")
  c.dataset.data_dir = data_dir
  c.mesh.data = devices
  c.train.batch_size, c.train.microbatches, c.eval.batch_size = BATCH, microbatches, BATCH
  c.train.num_steps = STEPS
  c.optim.warmup_steps = 0  # the smoke config's warm-up makes step 0's learning rate 0: nothing would move
  c.input.crop_size, c.input.eval_size = 33, 81
  c.model.conv_impl = "xla"  # compiles faster than the CPU kernels; the batch layout is the same
  if not dropout:
    c.model.backbone.dropout_rate = c.model.fusion.dropout_rate = 0.0
  return c


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()


def main(data_dir: str, out: str) -> None:
  results = {}
  for name, (devices, k, dropout) in TRAIN_CASES.items():
    c = config(data_dir, devices, k, dropout)
    exp = build_experiment(c)
    data = input_pipeline.create_datasets(c, data_devices=devices)
    step_fn = train_step.jit_train_step(exp)
    state = exp.init_state(jax.random.key(0))
    for path, value in _flat(state.params):
      results[f"{name}/init/{path}"] = np.asarray(value)
    batches, losses, rates = data.train_batches(0), [], []
    for _ in range(STEPS):
      batch = sharding.global_batch(exp.mesh, next(batches), batch_axis=1)
      state, m = step_fn(state, batch, jax.random.key(1))
      computed = m.compute()
      losses.append(np.asarray(computed["loss"]))
      rates.append(np.asarray(computed["learning_rate"]))
    results[f"{name}/loss"] = np.stack(losses)
    results[f"{name}/learning_rate"] = np.stack(rates)
    results[f"{name}/rows"] = np.asarray(batch["image"].shape[:2])
    for path, value in _flat(state.params):
      results[f"{name}/params/{path}"] = np.asarray(value)
    if name == "d1":
      trained = jax.device_get(state.params)
  for devices in (1, 8):  # the parameters trained above: their predictions are not one class everywhere
    c = config(data_dir, devices)
    exp = build_experiment(c)
    data = input_pipeline.create_datasets(c, data_devices=devices)
    confusion = 0
    eval_fn = segmentation.jit_eval_step(exp)

    def recording_eval_fn(params, batch, eval_fn=eval_fn):
      nonlocal confusion
      stats = eval_fn(params, batch)
      confusion = confusion + np.asarray(jax.device_get(stats["confusion"]), np.int64)
      return stats

    batches = list(data.eval_batches("validation"))
    src = data.source("validation")
    valid_pixels = sum(int(np.sum(np.asarray(src[i]["label"]) != 255)) for i in range(len(src)))
    result = segmentation.evaluate_split(recording_eval_fn, trained, exp, iter(batches),
                                         data.num_eval_batches("validation"), data.class_names)
    results[f"eval_d{devices}/miou"] = np.asarray(result["miou"])
    results[f"eval_d{devices}/pixel_accuracy"] = np.asarray(result["pixel_accuracy"])
    results[f"eval_d{devices}/confusion"] = confusion
    results[f"eval_d{devices}/valid_pixels"] = np.asarray(valid_pixels)
    results[f"eval_d{devices}/rows"] = np.asarray([len(batches), batches[0]["image"].shape[0]])
  np.savez(out, **results)


if __name__ == "__main__":
  main(*sys.argv[1:])
