"""Reliability beyond the smoke-run fault suite (test_faults.py).

Resuming on another topology: the smoke run checkpointed at step 8 on 4 devices, finished on 2 and on 8 devices,
ends within a relative 1e-5 of an uninterrupted run on 2 and on 8 devices. Not bitwise: the data-parallel sums of
the gradients and loss normalisers are reduced in a different order on another number of devices.

Checkpoint damage Orbax does not see, and a full disk as TensorStore reports it.
"""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import resume_probe
from conftest import NUM_TEST_DEVICES

from configs import shapes
from scaleattn import checkpointing
from scaleattn.config import validation
from scaleattn.data import input_pipeline
from scaleattn.experiment import build_experiment
from scaleattn.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = 8  # the step of the 4-device checkpoint
RTOL, ATOL = 1e-5, 1e-7


def _params(workdir, config, step):
  params, _ = checkpointing.restore_params(workdir, config.train, build_experiment(config).abstract_state, step)
  return jax.device_get(params)


def _max_relative_difference(a, b) -> float:
  """The largest |a - b| / max|b| over the parameter tensors."""
  return max(float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{devices: (resumed workdir, uninterrupted workdir, the probe's log)} for 2 and 8 devices."""
  tmp = tmp_path_factory.mktemp("topology_resume")
  data_dir = str(tmp / "tfds")
  input_pipeline.create_datasets(resume_probe.config(data_dir))
  assert jax.device_count() == NUM_TEST_DEVICES == 4
  saved = str(tmp / "four_devices")
  loop.train_and_evaluate(resume_probe.config(data_dir, num_steps=SAVED), saved)
  workdirs = {devices: (str(tmp / f"resumed_on_{devices}"), str(tmp / f"straight_on_{devices}")) for devices in (2, 8)}
  probes = {}
  for devices, (resumed, straight) in workdirs.items():  # both probes at once: each compiles for its own mesh
    shutil.copytree(saved, resumed)
    probes[devices] = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "resume_probe.py"), str(devices), data_dir, resumed, straight],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  result = {}
  for devices, probe in probes.items():
    log = probe.communicate(timeout=600)[1]
    assert probe.returncode == 0, log[-4000:]
    result[devices] = (*workdirs[devices], log)
  return result


@pytest.mark.parametrize("devices", [2, 8])
def test_resume_on_another_device_count(runs, devices):
  resumed, straight, log = runs[devices]
  assert f"Resumed from step {SAVED}" in log
  config = resume_probe.config("")
  a, b = _params(resumed, config, resume_probe.STEPS), _params(straight, config, resume_probe.STEPS)
  print(f"4 -> {devices} devices: max relative difference {_max_relative_difference(a, b):.2e}")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)
  before = _params(resumed, config, SAVED)
  assert _max_relative_difference(before, b) > 100 * RTOL  # training moved the parameters well beyond the tolerance


def _checkpoints(directory):
  return checkpointing.Checkpoints(directory, ml_collections.ConfigDict(
      {"checkpoint_every_steps": 1, "keep_checkpoints": 5, "keep_best": 0}))


def _array_state(step: int) -> dict[str, jax.Array]:
  return {"w": jnp.arange(2**20, dtype=jnp.float32) + step}


def test_a_bit_flip_orbax_restores_silently_is_caught_by_the_manifest(tmp_path, caplog):
  """A large array is stored outside TensorStore's checksummed b-tree nodes: one flipped bit in its data restores
  without an error and with a wrong value. SHA256SUMS catches it: the restore warns, names the step and falls back."""
  ckpts = _checkpoints(tmp_path)
  for step in (1, 2):
    ckpts.save(step, _array_state(step))
  ckpts.wait_until_finished()
  step_dir = tmp_path / "2"
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names if f != checkpointing.MANIFEST]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x04]))
  target = jax.eval_shape(lambda: _array_state(0))
  silently = ocp.CheckpointManager(tmp_path).restore(2, args=ocp.args.StandardRestore(target))
  assert np.sum(np.asarray(silently["w"]) != np.asarray(_array_state(2)["w"])) >= 1  # no error, wrong values
  caplog.set_level("WARNING")
  restored = _checkpoints(tmp_path).restore(target)
  np.testing.assert_array_equal(restored["w"], _array_state(1)["w"])
  assert f"Checkpoint at step 2 in {tmp_path} is unusable: file {os.path.relpath(path, step_dir)} does not match" \
         in caplog.text


TENSORSTORE_FULL_DISK = ('RESOURCE_EXHAUSTED: Error writing "params.w/0.0" in OCDBT database at local file '
                         '"ckpt/4.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/ocdbt.process_0/": Failed to write '
                         "10520 bytes to file 6: No space left on device [os_error_code='28']")  # as seen on a full tmpfs


@pytest.mark.parametrize("error, stops", [(ValueError(TENSORSTORE_FULL_DISK), True), (ValueError("other"), False)])
def test_full_disk_as_tensorstore_reports_it(tmp_path, monkeypatch, error, stops):
  ckpts = _checkpoints(tmp_path)
  ckpts.save(2, _array_state(2))
  ckpts.wait_until_finished()

  def fail(*args, **kwargs):
    raise error

  monkeypatch.setattr(ocp.CheckpointManager, "save", fail)
  expected = checkpointing.CheckpointWriteError if stops else ValueError
  with pytest.raises(expected) as raised:
    ckpts.save(4, _array_state(4), force=True)
  assert ("step 4 could not be written" in str(raised.value)) == stops
  assert ("Checkpoints up to step 2 are complete" in str(raised.value)) == stops


def test_on_bad_record_choices_are_validated():
  config = shapes.get_config("smoke")
  config.input.on_bad_record = "ignore"
  with pytest.raises(validation.ConfigError, match=r"config.input.on_bad_record='ignore': expected one of "
                                                           r"\('raise', 'skip'\)"):
    validation.validate(config, num_data_devices=1)
