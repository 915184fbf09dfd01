"""`python -m scaleattn.main` with a stall injected, for tests: process STALL_PROCESS blocks forever inside the
checkpoint save of step STALL_STEP (environment variables), as a process stuck in a collective or a save would.

  python tests/stall_probe.py [the flags of python -m scaleattn.main]
"""
import os
import runpy
import sys
import time

import jax

from scaleattn import checkpointing

STEP, PROCESS = int(os.environ["STALL_STEP"]), int(os.environ["STALL_PROCESS"])
_save = checkpointing.Checkpoints.save


def stalled_in_save(self, step, state, **kwargs):
  if step == STEP and jax.process_index() == PROCESS:
    time.sleep(10 ** 6)
  return _save(self, step, state, **kwargs)


checkpointing.Checkpoints.save = stalled_in_save
sys.argv[0] = "scaleattn.main"
runpy.run_module("scaleattn.main", run_name="__main__", alter_sys=True)
