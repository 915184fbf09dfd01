"""The step watchdog, run in child processes (it ends its process): it fires within its timeout plus a margin on a
stall, with its exit status, a message naming the phase and step and every thread's stack; it stays quiet while
beats come in time and outside phases; the first beats of each phase get their larger allowance."""
import json
import subprocess
import sys
import time

import pytest

from scaleattn.training import watchdog

MARGIN_S = 2.0  # how late a firing may be on a loaded machine (the watchdog itself wakes at the deadline)

# Loads the module from its file (its path is argv[2]): the package's own imports (Flax) would take longer than the
# timeouts under test on a loaded machine.
CHILD = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("watchdog", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
Watchdog = module.Watchdog

def stalled_in_collective():
  time.sleep(60)

kwargs, ops = json.loads(sys.argv[1])
with Watchdog(**kwargs) as dog:
  for op, *args in ops:
    if op == "beat":
      dog.beat(*args)
    elif op == "phase":
      name, step, seconds = args
      with dog.phase(name, step):
        time.sleep(seconds)
    elif op == "batches":
      name, step, seconds, count = args
      for _ in dog.beats(range(count), name, step):
        time.sleep(seconds)
    elif op == "sleep":
      time.sleep(*args)
    else:
      print("stall from", time.time(), flush=True)
      stalled_in_collective()
print("finished", flush=True)
"""


def _run(tmp_path, kwargs: dict, ops: list) -> tuple[subprocess.CompletedProcess, float | None]:
  """The child's result and, if it stalled, how long after the stall began it ended."""
  child = tmp_path / "child.py"
  child.write_text(CHILD)
  proc = subprocess.run([sys.executable, str(child), json.dumps([kwargs, ops]), watchdog.__file__],
                        capture_output=True, text=True, timeout=60)
  ended = time.time()
  starts = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("stall from")]
  return proc, (ended - starts[0] if starts else None)


def test_fires_on_a_stall_with_phase_step_and_stacks(tmp_path):
  proc, stalled_s = _run(tmp_path, {"timeout_s": 1.0, "first_beats": 0}, [["beat", "checkpoint_save", 7], ["stall"]])
  assert proc.returncode == watchdog.STALL_EXIT_CODE == 75, proc.stderr
  assert 1.0 - 0.1 <= stalled_s <= 1.0 + MARGIN_S
  assert "phase 'checkpoint_save' of step 7 has made no progress" in proc.stderr
  assert "finished" not in proc.stdout
  log, _, dump = proc.stderr.partition("Current thread")  # absl's stacks, then faulthandler's
  assert "stalled_in_collective" in log and "time.sleep(60)" in log  # the blocked function and its line
  assert "in stalled_in_collective" in dump
  assert "step_watchdog" in log  # every thread, the watchdog's own among them


def test_quiet_while_beats_come_in_time_and_outside_phases(tmp_path):
  # 3.2 s of steps under a 1.5 s timeout (a beat every 0.2 s leaves a loaded machine 1.3 s of slack per beat)
  ops = [op for s in range(16) for op in (["beat", "train_step", s], ["sleep", 0.2])]
  ops += [["batches", "evaluation", 16, 0.2, 10], ["phase", "checkpoint_save", 16, 0.2]]
  ops += [["sleep", 2.0]]  # after a phase nothing is timed
  proc, _ = _run(tmp_path, {"timeout_s": 1.5, "first_beats": 0}, ops)
  assert proc.returncode == 0, proc.stderr
  assert "finished" in proc.stdout and "Watchdog" not in proc.stderr


def test_first_beats_of_each_phase_get_the_allowance(tmp_path):
  """1 s for the first train step and the first evaluation (allowance 3 s), then 0.5 s for the next step."""
  ops = [["phase", "train_step", 0, 1.0], ["phase", "evaluation", 0, 1.0], ["beat", "train_step", 1], ["stall"]]
  proc, stalled_s = _run(tmp_path, {"timeout_s": 0.5, "first_timeout_s": 3.0, "first_beats": 1}, ops)
  assert proc.returncode == watchdog.STALL_EXIT_CODE, proc.stderr
  assert "phase 'train_step' of step 1 has made no progress" in proc.stderr
  assert 0.5 - 0.1 <= stalled_s <= 0.5 + MARGIN_S


def test_off_with_timeout_zero(tmp_path):
  proc, _ = _run(tmp_path, {"timeout_s": 0}, [["beat", "train_step", 0], ["sleep", 0.5]])
  assert proc.returncode == 0, proc.stderr
  assert "finished" in proc.stdout and "Watchdog" not in proc.stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout_s": -1}, "timeout_s=-1: expected a number of seconds >= 0"),
    ({"timeout_s": 2, "first_timeout_s": 1}, "first_timeout_s=1: expected at least timeout_s=2"),
    ({"timeout_s": 1, "first_beats": -1}, "first_beats=-1: expected a count >= 0"),
])
def test_rejects_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    watchdog.Watchdog(**kwargs)
