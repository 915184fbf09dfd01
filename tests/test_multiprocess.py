"""Two processes on localhost (4 CPU devices each, gloo collectives) train the smoke config like one process with 4
devices: the batch of 4 is padded to the 8 devices, each process building its own rows of it. Their checkpoint
restores and trains on in a single process; one of them killed stops the other within the heartbeat timeout, and
both restarted finish with exactly the parameters of an uninterrupted 2-process run.

The 2-process runs compile their steps afresh (no persistent compilation cache): only process 0 reads that cache, and
a process still compiling while the other has loaded its steps can reach the first collective later than gloo's 30 s
rendezvous allows on a loaded machine."""
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import NUM_TEST_DEVICES

from configs import shapes
from scaleattn import checkpointing
from scaleattn.data import input_pipeline
from scaleattn.experiment import build_experiment
from scaleattn.training import loop, watchdog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CHECKPOINT_EVERY = 12, 4
HEARTBEAT_S = 4  # config.distributed.heartbeat_timeout_seconds in these runs (default 100)
STOP_WITHIN_S = 3 * HEARTBEAT_S + 10  # what the survivor of a kill may take to stop
STEP_TIMEOUT_S, FIRST_STEPS_TIMEOUT_S = 60, 300  # the watchdog's allowances in these runs (compiles take the second)
RUN_LIMIT_S = 1200  # a run that has neither finished nor been ended by its watchdog by then hangs silently: a failure


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _config(data_dir):
  config = shapes.get_config("smoke")
  config.dataset.data_dir = data_dir
  config.train.num_steps = STEPS
  config.train.eval_every_steps = STEPS
  config.train.checkpoint_every_steps = CHECKPOINT_EVERY
  config.train.keep_checkpoints = 3
  config.eval.num_examples = 0
  return config


def _flags(data_dir, workdir):
  return [f"--config={os.path.join(REPO, 'configs', 'shapes.py')}:smoke", f"--workdir={workdir}",
          f"--config.dataset.data_dir={data_dir}", f"--config.train.num_steps={STEPS}",
          f"--config.train.eval_every_steps={STEPS}", f"--config.train.checkpoint_every_steps={CHECKPOINT_EVERY}",
          "--config.train.keep_checkpoints=3", "--config.eval.num_examples=0", "--compilation_cache_dir=",
          f"--config.distributed.heartbeat_timeout_seconds={HEARTBEAT_S}",
          f"--config.distributed.shutdown_timeout_seconds={STOP_WITHIN_S}",
          f"--config.train.step_timeout_seconds={STEP_TIMEOUT_S}",
          f"--config.train.first_steps_timeout_seconds={FIRST_STEPS_TIMEOUT_S}"]


def _start(data_dir, workdir, program=("-m", "scaleattn.main"), **env_vars) -> list[subprocess.Popen]:
  """Both processes of a run; each writes its output to WORKDIR.process_N.log (pipes could fill and stall one)."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=REPO, **env_vars)
  return [subprocess.Popen(
      [sys.executable, *program, *_flags(data_dir, workdir),
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=open(f"{workdir}.process_{i}.log", "w"), stderr=subprocess.STDOUT)
      for i in range(2)]


def _log(workdir, i) -> str:
  with open(f"{workdir}.process_{i}.log") as f:
    return f.read()


def _wait(procs, timeout_s: float) -> bool:
  """Waits for the processes; kills those still running after `timeout_s` (a hung run). True if none hung."""
  deadline = time.time() + timeout_s
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 0))
  except subprocess.TimeoutExpired:
    pass
  finally:
    hung = [p for p in procs if p.poll() is None]
    for p in hung:
      p.kill()
      p.wait()
  return not hung


def _finish(procs, workdir) -> None:
  """Waits for a 2-process run to end cleanly: a stall, whether its watchdog ended it (`STALL_EXIT_CODE`) or it
  hung silently past RUN_LIMIT_S, fails."""
  assert _wait(procs, RUN_LIMIT_S), "the run hung without its watchdog ending it:\n" + _log(workdir, 0)[-4000:]
  for i, p in enumerate(procs):
    stalled = " (its watchdog found it stalled)" if p.returncode == watchdog.STALL_EXIT_CODE else ""
    assert p.returncode == 0, f"process {i} exited with {p.returncode}{stalled}:\n" + _log(workdir, i)[-4000:]


def _params(workdir, config, step=STEPS):
  params, restored = checkpointing.restore_params(workdir, config.train, build_experiment(config).abstract_state, step)
  assert restored == step
  return jax.device_get(params)


def _saved_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.create_datasets(_config(path))  # prepare the data once, before the workers read it
  return path


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
  """An uninterrupted run in this process (4 devices): its final parameters."""
  workdir = str(tmp_path_factory.mktemp("single"))
  loop.train_and_evaluate(_config(data_dir), workdir)
  return _params(workdir, _config(data_dir))


@pytest.fixture(scope="module")
def two_processes(data_dir, tmp_path_factory):
  """The workdir of an uninterrupted 2-process run (checkpoints at 4, 8 and 12)."""
  workdir = str(tmp_path_factory.mktemp("two_processes") / "run")
  _finish(_start(data_dir, workdir), workdir)
  return workdir


def test_two_processes_match_one(data_dir, single, two_processes):
  assert jax.device_count() == NUM_TEST_DEVICES
  multi = _params(two_processes, _config(data_dir))  # the 2-process checkpoint restores here
  for x, y in zip(jax.tree.leaves(single), jax.tree.leaves(multi), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_two_process_checkpoint_trains_on_in_one_process(data_dir, single, two_processes, tmp_path):
  """The 2-process run's checkpoint of step 8, finished in this one process (8 devices -> 4), ends within a relative
  1e-5 of the uninterrupted one-process run (not bitwise: the reductions run over another number of devices)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(two_processes, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  messages = []
  handler = logging.Handler(logging.INFO)
  handler.emit = lambda record: messages.append(record.getMessage())
  absl_logger = logging.getLogger("absl")  # whatever verbosity or propagation earlier tests left it with
  level = absl_logger.level
  absl_logger.addHandler(handler)
  absl_logger.setLevel(logging.INFO)
  try:
    loop.train_and_evaluate(_config(data_dir), workdir)
  finally:
    absl_logger.removeHandler(handler)
    absl_logger.setLevel(level)
  assert any("Resumed from step 8" in m for m in messages), messages[:20]
  resumed = _params(workdir, _config(data_dir))
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(single), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_killed_process_stops_the_other_and_both_resume_exactly(data_dir, two_processes, tmp_path):
  """kill -9 of process 1 once the checkpoint of step 4 exists: process 0, blocked in a collective, is stopped by
  JAX's coordination service when process 1's heartbeats stop, within STOP_WITHIN_S. Restarted, both resume from
  the last complete checkpoint and end with the uninterrupted 2-process run's parameters, bit for bit."""
  workdir = str(tmp_path / "run")
  procs = _start(data_dir, workdir)
  deadline = time.time() + RUN_LIMIT_S
  while (CHECKPOINT_EVERY not in _saved_steps(workdir) and all(p.poll() is None for p in procs)
         and time.time() < deadline):
    time.sleep(0.02)
  if not all(p.poll() is None for p in procs):
    _wait(procs, 0)
    pytest.fail(f"a process ended before the kill:\n{_log(workdir, 0)[-3000:]}")
  procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  _wait(procs, STOP_WITHIN_S + 60)
  stopped_after = time.time() - killed
  survivor = _log(workdir, 0)
  print(f"process 0 stopped {stopped_after:.1f} s after process 1 was killed (heartbeat timeout {HEARTBEAT_S} s)")
  assert procs[0].returncode != 0
  assert "another task died" in survivor, survivor[-3000:]
  assert stopped_after < STOP_WITHIN_S
  assert _saved_steps(workdir)[-1] < STEPS
  restart = _start(data_dir, workdir)
  _finish(restart, workdir)
  assert "Resumed from step" in _log(workdir, 0)
  resumed, want = _params(workdir, _config(data_dir)), _params(two_processes, _config(data_dir))
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_stalled_process_is_ended_by_its_watchdog_and_the_rerun_resumes_exactly(data_dir, two_processes, tmp_path):
  """Process 1 blocks forever inside the last checkpoint save (tests/stall_probe.py; the first saves have the
  compile allowance), alive and heartbeating: its watchdog ends it with STALL_EXIT_CODE within its timeout plus a
  margin, naming the phase and step, with the stacks in the log; process 0 does not finish. The rerun resumes from
  the checkpoint before and ends with the uninterrupted run's parameters, bit for bit."""
  workdir = str(tmp_path / "run")
  procs = _start(data_dir, workdir, program=(os.path.join(REPO, "tests", "stall_probe.py"),),
                 STALL_STEP=str(STEPS), STALL_PROCESS="1")
  assert _wait(procs, RUN_LIMIT_S), "the stalled run was not ended"
  stalled = _log(workdir, 1)
  assert procs[1].returncode == watchdog.STALL_EXIT_CODE, stalled[-3000:]
  fired = re.search(rf"phase 'checkpoint_save' of step {STEPS} has made no progress for ([\d.]+) s", stalled)
  assert fired and float(fired.group(1)) < STEP_TIMEOUT_S + 15, stalled[-3000:]
  assert "stalled_in_save" in stalled  # the stack of the blocked thread
  assert procs[0].returncode != 0
  assert _saved_steps(workdir)[-1:] != [STEPS]
  _finish(_start(data_dir, workdir), workdir)
  resumed, want = _params(workdir, _config(data_dir)), _params(two_processes, _config(data_dir))
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(x, y)

