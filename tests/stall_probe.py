"""`python -m scaleattn.main` with a stall injected, for tests: process STALL_PROCESS blocks inside the checkpoint
save of step STALL_STEP (environment variables), forever as a process stuck in a collective or a save would, or for
STALL_SECONDS; with STALL_WHERE=after_save it blocks once that save has started (its asynchronous part running).

  python tests/stall_probe.py [the flags of python -m scaleattn.main]
"""
import os
import runpy
import sys
import time

import jax

from scaleattn import checkpointing

STEP, PROCESS = int(os.environ["STALL_STEP"]), int(os.environ["STALL_PROCESS"])
SECONDS = float(os.environ.get("STALL_SECONDS", 10 ** 6))
AFTER_SAVE = os.environ.get("STALL_WHERE", "in_save") == "after_save"
_save = checkpointing.Checkpoints.save


def stalled_in_save(self, step, state, **kwargs):
  here = step == STEP and jax.process_index() == PROCESS
  if here and not AFTER_SAVE:
    time.sleep(SECONDS)
  started = _save(self, step, state, **kwargs)
  if here and AFTER_SAVE:
    time.sleep(SECONDS)
  return started


checkpointing.Checkpoints.save = stalled_in_save
sys.argv[0] = "scaleattn.main"
runpy.run_module("scaleattn.main", run_name="__main__", alter_sys=True)
