"""Run by test_reliability.py in a process of its own with N fake CPU devices (argv: N, data_dir, workdirs...):
trains the smoke run of `config` in each workdir in turn, resuming whatever checkpoint it holds."""
import os
import sys

from configs import shapes

STEPS = 12


def config(data_dir: str, num_steps: int = STEPS):
  """The smoke run checkpointed every 4 steps, with XLA's convolutions (they compile faster than the CPU kernels).
  num_steps does not change the steps' learning rates here: all of them lie in the 50-step warm-up."""
  c = shapes.get_config("smoke")
  c.dataset.data_dir = data_dir
  c.train.num_steps = num_steps
  c.train.checkpoint_every_steps = 4
  c.train.eval_every_steps = 100
  c.eval.num_examples = 0
  c.model.conv_impl = "xla"
  return c


def main(devices: str, data_dir: str, *workdirs: str) -> None:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  from absl import logging  # noqa: PLC0415

  from scaleattn.training import loop  # noqa: PLC0415 - JAX reads XLA_FLAGS when its backend starts
  logging.set_verbosity(logging.INFO)  # "Resumed from step N" goes to stderr
  for workdir in workdirs:
    loop.train_and_evaluate(config(data_dir), workdir)


if __name__ == "__main__":
  main(*sys.argv[1:])
