"""Fault injection on the smoke run: kill -9 at random moments, SIGTERM, a NaN batch, a broken checkpoint.

Each case asserts what was kept: the run always finishes with exactly the parameters of an uninterrupted run.
"""
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import logged_scalars

from configs import shapes
from scaleattn import checkpointing, input_pipeline, train
from scaleattn.state import build_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24  # long enough that four interruptions all land before the run finishes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, **overrides):
  config = shapes.get_config("smoke")
  config.dataset.data_dir = data_dir
  config.train.num_steps = STEPS
  config.train.checkpoint_every_steps = 2
  config.train.eval_every_steps = 100
  config.train.keep_checkpoints = 3
  config.eval.num_examples = 0
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    config[section][key] = value
  return config


def _command(data_dir, workdir):
  return [sys.executable, "-m", "scaleattn.main", f"--config={os.path.join(REPO, 'configs', 'shapes.py')}:smoke",
          f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}", f"--config.train.num_steps={STEPS}",
          "--config.train.checkpoint_every_steps=2", "--config.train.eval_every_steps=100",
          "--config.train.keep_checkpoints=3", "--config.eval.num_examples=0",
          f"--compilation_cache_dir={_cache_dir(workdir)}"]


def _cache_dir(workdir):
  return os.path.join(os.path.dirname(workdir), "xla")


def _env():
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=REPO)


def _params(workdir, config, step=STEPS):
  params, _ = checkpointing.restore_params(workdir, config.train, build_experiment(config).abstract_state, step)
  return jax.device_get(params)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _saved_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """The uninterrupted run's final parameters."""
  config = _config(data_dir)
  input_pipeline.create_datasets(config)  # prepare the data before subprocesses read it
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.train_and_evaluate(config, workdir)
  return _params(workdir, config)


def test_kill9_and_sigterm_lose_nothing(data_dir, reference, tmp_path):
  """Three kill -9 at random moments, then a SIGTERM, then a clean finish: identical final parameters, the restarts
  running the train step compiled by the first attempt (from the persistent compilation cache)."""
  rng = random.Random(0)
  workdir = str(tmp_path / "run")
  kills = 0
  for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGKILL, signal.SIGTERM):
    before = _saved_steps(workdir)
    proc = subprocess.Popen(_command(data_dir, workdir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    # Wait until this attempt has made progress (a new checkpoint), then strike at a random moment within the
    # next few steps (a smoke step takes about 0.1 s; checkpoints land every 2 steps).
    deadline = time.time() + 240
    while _saved_steps(workdir) == before and proc.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    if proc.poll() is None:
      proc.send_signal(sig)
      kills += 1
    _, err = proc.communicate(timeout=240)
    if sig == signal.SIGTERM and kills == 4:
      assert proc.returncode == 0, err[-3000:]
      assert "SIGTERM received" in err
  assert kills >= 3
  result = subprocess.run(_command(data_dir, workdir), cwd=REPO, env=dict(_env(), JAX_LOG_COMPILES="1"),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_same(_params(workdir, _config(data_dir)), reference)
  assert "Persistent compilation cache hit for 'jit_train_step'" in result.stderr


def test_broken_latest_checkpoint_falls_back(data_dir, reference, tmp_path):
  config = _config(data_dir, **{"train.num_steps": 6})
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "6")):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(max(0, os.path.getsize(fh.name) // 2))
  train.train_and_evaluate(_config(data_dir), workdir)  # restores step 4, redoes 5..STEPS
  _assert_same(_params(workdir, _config(data_dir)), reference)


class _NaNAt:
  """Wraps a Datasets object so that the training batch of one step carries a NaN."""

  def __init__(self, data, step):
    self._data, self._step = data, step

  def __getattr__(self, name):
    return getattr(self._data, name)

  def train_batches(self, start_step):
    for step, batch in enumerate(self._data.train_batches(start_step), start_step):
      if step == self._step:
        batch = dict(batch, image=np.where(np.arange(batch["image"].size).reshape(batch["image"].shape) == 7,
                                           np.nan, batch["image"]).astype(np.float32))
      yield batch


def _inject_nan(monkeypatch, step):
  create = input_pipeline.create_datasets
  monkeypatch.setattr(input_pipeline, "create_datasets", lambda *a, **k: _NaNAt(create(*a, **k), step))


def test_nan_batch_raises_naming_step_and_keeps_checkpoint(data_dir, monkeypatch, tmp_path):
  """The NaN comes at step 4 (0-based), between checkpoints and log steps: the host sees it at the next
  checkpoint step (6), before saving, and names step 4; the checkpoint of step 3 is the last."""
  _inject_nan(monkeypatch, step=4)
  workdir = str(tmp_path / "run")
  config = _config(data_dir, **{"train.checkpoint_every_steps": 3, "train.log_every_steps": 100})
  with pytest.raises(train.NonFiniteError, match=r"step 4: .*loss/fused"):
    train.train_and_evaluate(config, workdir)
  assert _saved_steps(workdir)[-1] == 3
  monkeypatch.undo()


def test_nan_batch_skipped_when_configured(data_dir, monkeypatch, tmp_path):
  _inject_nan(monkeypatch, step=4)  # the 5th step (0-based 4) gets the NaN
  workdir = str(tmp_path / "run")
  config = _config(data_dir, **{"train.on_nonfinite": "skip", "train.num_steps": 5,
                                "train.checkpoint_every_steps": 1, "train.keep_checkpoints": 10})
  train.train_and_evaluate(config, workdir)
  after_4, after_5 = _params(workdir, config, step=4), _params(workdir, config, step=5)
  _assert_same(after_4, after_5)  # the bad step changed nothing
  assert logged_scalars(workdir, "skipped_steps")[5] == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after_5))
