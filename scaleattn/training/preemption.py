"""Preemption: SIGTERM (a scheduler's notice) turned into a flag the training loop polls, so that it checkpoints the
current step and stops; `Preempted` says so to the caller, so a stopped run is never taken for a finished one."""
from __future__ import annotations

import signal

from absl import logging


class SigtermFlag:
  """Turns SIGTERM into a flag the loop polls, so the current step can be checkpointed before exiting."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread (e.g. a notebook worker): rely on Orbax's policy only.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Preempted(Exception):
  """SIGTERM (or the cluster's preemption notice) stopped training after checkpointing `step`; rerun to resume."""

  def __init__(self, step: int):
    super().__init__(f"preempted: checkpoint at step {step} written; run again to resume")
    self.step = step
