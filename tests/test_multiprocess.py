"""Two processes on localhost (4 CPU devices each, gloo collectives) train the smoke config like one process with 4
devices: the batch of 4 is padded to the 8 devices, each process building its own rows of it; their checkpoint
restores in a single process."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from conftest import NUM_TEST_DEVICES

from configs import shapes
from scaleattn import checkpointing, input_pipeline, train
from scaleattn.state import build_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _config(data_dir):
  config = shapes.get_config("smoke")
  config.dataset.data_dir = data_dir
  config.train.num_steps = STEPS
  config.train.eval_every_steps = STEPS
  config.train.checkpoint_every_steps = STEPS
  config.eval.num_examples = 0
  return config


def _flags(data_dir, workdir):
  return [f"--config={os.path.join(REPO, 'configs', 'shapes.py')}:smoke", f"--workdir={workdir}",
          f"--config.dataset.data_dir={data_dir}", f"--config.train.num_steps={STEPS}",
          f"--config.train.eval_every_steps={STEPS}", f"--config.train.checkpoint_every_steps={STEPS}",
          "--config.eval.num_examples=0", f"--compilation_cache_dir={os.path.join(os.path.dirname(workdir), 'xla')}"]


def _params(workdir, config):
  params, step = checkpointing.restore_params(workdir, config.train, build_experiment(config).abstract_state)
  assert step == STEPS
  return jax.device_get(params)


def test_two_processes_match_one(tmp_path):
  data_dir = str(tmp_path / "tfds")
  config = _config(data_dir)
  input_pipeline.create_datasets(config)  # prepare the data once, before the workers read it
  single = tmp_path / "single"
  train.train_and_evaluate(config, str(single))

  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=REPO)
  multi = tmp_path / "multi"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "scaleattn.main", *_flags(data_dir, multi),
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=540)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-4000:]
  assert jax.device_count() == NUM_TEST_DEVICES
  a, b = _params(single, config), _params(multi, config)  # the 2-process checkpoint restores here
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
