"""Fault injection on the smoke run: kill -9 at random moments, SIGTERM, a NaN batch, a broken or damaged
checkpoint, a full disk while saving, a corrupt record in the prepared dataset.

Each case asserts what was kept: the run always finishes with exactly the parameters of an uninterrupted run.
"""
import errno
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from conftest import logged_scalars
from etils import epath

from configs import shapes
from scaleattn import checkpointing
from scaleattn.data import input_pipeline
from scaleattn.experiment import build_experiment
from scaleattn.training import loop

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
  loop.train_and_evaluate(config, workdir)
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
  assert "Resumed from step" in result.stderr  # a run from scratch would end with the reference's parameters too
  _assert_same(_params(workdir, _config(data_dir)), reference)
  assert "Persistent compilation cache hit for 'jit_train_step'" in result.stderr


@pytest.fixture(scope="module")
def six_steps(data_dir, tmp_path_factory):
  """A finished 6-step run (checkpoints at 2, 4, 6) and its final parameters, read before anything is damaged."""
  config = _config(data_dir, **{"train.num_steps": 6})
  workdir = str(tmp_path_factory.mktemp("six_steps"))
  loop.train_and_evaluate(config, workdir)
  return workdir, _params(workdir, config, step=6)


def _copy(workdir, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  return copy


def test_broken_latest_checkpoint_falls_back(data_dir, reference, six_steps, tmp_path, caplog):
  workdir = _copy(six_steps[0], tmp_path)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "6")):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(max(0, os.path.getsize(fh.name) // 2))
  caplog.set_level("INFO", logger="absl")
  loop.train_and_evaluate(_config(data_dir), workdir)  # restores step 4, redoes 4..STEPS-1
  assert "Resumed from step 4 in" in caplog.text  # a run from scratch would end with the reference's parameters too
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
  with pytest.raises(loop.NonFiniteError, match=r"step 4: .*loss/fused"):
    loop.train_and_evaluate(config, workdir)
  assert _saved_steps(workdir)[-1] == 3
  monkeypatch.undo()


def test_nan_batch_skipped_when_configured(data_dir, monkeypatch, tmp_path):
  _inject_nan(monkeypatch, step=4)  # the 5th step (0-based 4) gets the NaN
  workdir = str(tmp_path / "run")
  config = _config(data_dir, **{"train.on_nonfinite": "skip", "train.num_steps": 5,
                                "train.checkpoint_every_steps": 1, "train.keep_checkpoints": 10})
  loop.train_and_evaluate(config, workdir)
  after_3, after_4, after_5 = (_params(workdir, config, step=s) for s in (3, 4, 5))
  _assert_same(after_4, after_5)  # the bad step changed nothing
  assert float(build_experiment(config).schedule(4)) > 0  # where a good step at that learning rate
  for x, y in zip(jax.tree.leaves(after_3), jax.tree.leaves(after_4), strict=True):  # changes every tensor
    assert not np.array_equal(x, y)
  assert logged_scalars(workdir, "skipped_steps")[5] == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after_5))


def _largest_file(step_dir):
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names
           if f != checkpointing.MANIFEST]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "bit_flip"])
def test_damaged_checkpoint_is_detected_and_the_previous_one_used(data_dir, six_steps, damage, tmp_path, caplog):
  """The largest file of the newest checkpoint, cut in half or with one bit flipped after the save completed: the
  restore names step 6 as unusable (its SHA256SUMS), sets it aside, resumes from step 4 and saves step 6 anew,
  with the parameters of the undamaged run."""
  workdir, want = six_steps
  workdir = _copy(workdir, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "6")
  path = _largest_file(step_dir)
  with open(path, "r+b") as f:
    size = os.path.getsize(path)
    if damage == "truncate":
      f.truncate(size // 2)
    else:
      f.seek(size // 2)
      byte = f.read(1)[0]
      f.seek(size // 2)
      f.write(bytes([byte ^ 0x10]))
  caplog.set_level("WARNING")
  caplog.set_level("INFO", logger="absl")
  config = _config(data_dir, **{"train.num_steps": 6})
  loop.train_and_evaluate(config, workdir)
  assert "Resumed from step 4 in" in caplog.text  # a run from scratch would end with the undamaged run's parameters
  name = os.path.relpath(path, step_dir)
  assert (f"Checkpoint at step 6 in {os.path.dirname(step_dir)} is unusable: file {name} does not match its sha256"
          in caplog.text)
  assert os.path.isdir(step_dir + checkpointing.SET_ASIDE_SUFFIX)
  assert os.path.exists(os.path.join(step_dir, checkpointing.MANIFEST))
  assert checkpointing.manifest_problem(step_dir) is None
  _assert_same(_params(workdir, config, step=6), want)


def test_full_disk_while_saving_stops_and_loses_nothing(data_dir, reference, tmp_path, monkeypatch, caplog):
  """Every write into the checkpoint of step 8 fails with ENOSPC (as a full disk makes it): the run stops with an
  error naming the directory, the free space and the last complete checkpoint (6), which stays readable; run
  again once there is space, it resumes from step 6 and ends with the uninterrupted run's parameters."""
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  write_text = epath.Path.write_text

  def full_disk(path, *args, **kwargs):
    """ENOSPC for files of step 8's checkpoint (Orbax writes it under a temporary name, '8.<suffix>')."""
    if os.path.relpath(str(path), ckpt_dir).split(os.sep)[0].split(".")[0] == "8":
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write_text(path, *args, **kwargs)

  monkeypatch.setattr(type(epath.Path(ckpt_dir)), "write_text", full_disk)
  with pytest.raises(checkpointing.CheckpointWriteError) as stopped:
    loop.train_and_evaluate(_config(data_dir), workdir)
  monkeypatch.undo()
  message = str(stopped.value)
  assert f"The checkpoint of step 8 could not be written to {ckpt_dir}: no space left on device (" in message
  assert "Checkpoints up to step 6 are complete" in message
  amount, unit = re.search(r"\(([\d.]+) (GiB|MiB) free of", message).groups()
  free = shutil.disk_usage(ckpt_dir).free
  assert abs(float(amount) * 2 ** (30 if unit == "GiB" else 20) - free) < 0.01 * free + 2**26
  assert _saved_steps(workdir)[-1] == 6
  _params(workdir, _config(data_dir), step=6)  # readable
  caplog.set_level("INFO", logger="absl")
  loop.train_and_evaluate(_config(data_dir), workdir)
  assert "Resumed from step 6 in" in caplog.text  # a run from scratch would end with the reference's parameters too
  _assert_same(_params(workdir, _config(data_dir)), reference)


BAD_STEP, BAD_ROW = 5, 1  # the corrupt record is read for this row of this step (batch 4, 32 training records)


def _record_at(step, row, config, n=32):
  """The training record at a step's row, by the documented order: a permutation of the split per epoch, seeded
  by (seed, epoch)."""
  epoch, offset = divmod(step * config.train.batch_size + row, n)
  return int(np.random.default_rng([config.seed, epoch]).permutation(n)[offset])


@pytest.fixture(scope="module")
def damaged_data_dir(data_dir, tmp_path_factory):
  """A copy of the prepared data whose training record read at (BAD_STEP, BAD_ROW) holds half of its PNG."""
  input_pipeline.create_datasets(_config(data_dir))
  copy = str(tmp_path_factory.mktemp("damaged") / "tfds")
  shutil.copytree(data_dir, copy)
  path, = glob.glob(os.path.join(copy, "scale_shapes", "smoke", "*", "scale_shapes-train.array_record-*"))
  reader = ArrayRecordReader(path)
  records = reader.read_all()
  reader.close()
  assert len(records) == 32
  example = tf.train.Example.FromString(records[_record_at(BAD_STEP, BAD_ROW, _config(data_dir))])
  png = example.features.feature["image"].bytes_list.value
  png[0] = png[0][:len(png[0]) // 2]
  records[_record_at(BAD_STEP, BAD_ROW, _config(data_dir))] = example.SerializeToString()
  writer = ArrayRecordWriter(path, "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  return copy


def test_bad_record_stops_at_its_step_and_skip_resumes_deterministically(damaged_data_dir, data_dir, tmp_path):
  """'raise': the run stops at step 5 naming the split, the record and the problem, the checkpoint of step 4 intact.
  'skip', resumed from that checkpoint, ends with exactly the parameters of a 'skip' run from scratch (the same
  record skipped), and both log one skipped record from step 5 on."""
  record = _record_at(BAD_STEP, BAD_ROW, _config(data_dir))
  workdir, straight = str(tmp_path / "run"), str(tmp_path / "straight")
  with pytest.raises(input_pipeline.BadRecordError,
                     match=rf"split 'train', record {record} \(training step {BAD_STEP}\): does not decode "
                           r"\(OSError: image file is truncated\)"):
    loop.train_and_evaluate(_config(damaged_data_dir, **{"train.num_steps": 8}), workdir)
  assert _saved_steps(workdir)[-1] == 4
  _params(workdir, _config(damaged_data_dir), step=4)  # readable
  skip = _config(damaged_data_dir, **{"train.num_steps": 8, "input.on_bad_record": "skip"})
  loop.train_and_evaluate(skip, workdir)
  loop.train_and_evaluate(skip, straight)
  _assert_same(_params(workdir, skip, step=8), _params(straight, skip, step=8))
  assert logged_scalars(straight, "skipped_records") == {2: 0, 4: 0, 6: 1, 8: 1}
  assert logged_scalars(workdir, "skipped_records") == {6: 1, 8: 1}


def test_skipped_record_becomes_an_ignored_example(damaged_data_dir, data_dir):
  """With 'skip' the bad record's row of the batch is the mean image with every label 255 (counted nowhere); the
  other rows are those of the intact data."""
  config = _config(damaged_data_dir, **{"input.on_bad_record": "skip"})
  data = input_pipeline.create_datasets(config, data_devices=4)
  batch = next(data.train_batches(BAD_STEP))
  clean = next(input_pipeline.create_datasets(_config(data_dir), data_devices=4).train_batches(BAD_STEP))
  assert data.skipped_records == 1
  assert (batch["label"][0, BAD_ROW] == 255).all() and (batch["image"][0, BAD_ROW] == 0).all()
  assert not (clean["label"][0, BAD_ROW] == 255).all()
  others = [r for r in range(4) if r != BAD_ROW]
  np.testing.assert_array_equal(batch["label"][0, others], clean["label"][0, others])
  np.testing.assert_array_equal(batch["image"][0, others], clean["image"][0, others])


@pytest.mark.parametrize("label, problem", [
    (np.full((5, 6), 9, np.uint8), r"label values \[9\] outside 0..4 \(and 255 = void\)"),
    (np.zeros((4, 6), np.uint8), r"label is 4x6 but image .* is 5x6"),
])
def test_bad_labels_are_named(data_dir, monkeypatch, label, problem):
  data = input_pipeline.create_datasets(_config(data_dir))
  monkeypatch.setattr(data, "source", lambda split: [{"image": np.zeros((5, 6, 3), np.uint8), "label": label}])
  with pytest.raises(input_pipeline.BadRecordError, match=rf"split 'train', record 0 \(step 3\): .*{problem}"):
    data.read("train", 0, "step 3")
