"""A step watchdog: a process whose training loop stops making progress (a collective that never completes, a
deadlocked save) logs every thread's stack and exits with `STALL_EXIT_CODE`, so that its scheduler restarts it.

JAX's heartbeats stop the other processes of a job only when one of them dies; processes that are alive but all
blocked (for example in a collective another process never enters) wait forever. The loop announces what it is
doing with `beat(phase, step)` or `with watchdog.phase(phase, step):`; a daemon thread exits the process once the
current phase has gone on for longer than its timeout. The first beats of each phase get a larger allowance: they
compile. In a multi-process job the exit of one process stops the others through JAX's heartbeats.
"""
from __future__ import annotations

import collections
import contextlib
import faulthandler
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import TypeVar

from absl import logging

# EX_TEMPFAIL of sysexits.h, "a temporary failure; the user is invited to retry": restart policies can tell it from
# success (0), an uncaught exception (1), a usage or config error (2), timeout(1)'s 124 and deaths by signal (128+N).
STALL_EXIT_CODE = 75
T = TypeVar("T")


class Watchdog:
  """Exits the process when a phase of the training loop stalls; a context manager that starts and stops it.

  `timeout_s`: the most a phase may take from its beat; 0 turns the watchdog off (beats are then no-ops).
  `first_timeout_s` (default `timeout_s`): the allowance for the first `first_beats` beats of each phase name (the
  first train step, the first evaluation batch, the first save: they compile or warm up). Between a `phase`
  context's exit and the next beat nothing is timed.
  """

  def __init__(self, timeout_s: float, first_timeout_s: float | None = None, first_beats: int = 2):
    first_timeout_s = timeout_s if first_timeout_s is None else first_timeout_s
    if not timeout_s >= 0:
      raise ValueError(f"watchdog timeout_s={timeout_s}: expected a number of seconds >= 0 (0: off)")
    if not first_timeout_s >= timeout_s:
      raise ValueError(f"watchdog first_timeout_s={first_timeout_s}: expected at least timeout_s={timeout_s}")
    if first_beats < 0:
      raise ValueError(f"watchdog first_beats={first_beats}: expected a count >= 0")
    self.timeout_s, self.first_timeout_s, self.first_beats = timeout_s, first_timeout_s, first_beats
    self._beats: collections.Counter[str] = collections.Counter()
    self._current: tuple[str, int, float, float] | None = None  # phase, step, start (monotonic), timeout
    self._wake = threading.Condition()
    self._stopped = False
    self._thread = threading.Thread(target=self._watch, name="step_watchdog", daemon=True)

  def __enter__(self) -> Watchdog:
    if self.timeout_s:
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    with self._wake:
      self._stopped = True
      self._wake.notify()
    if self._thread.is_alive():
      self._thread.join()

  def beat(self, phase: str, step: int) -> None:
    """`phase` of `step` starts now: its timeout counts from here."""
    if not self.timeout_s:
      return
    with self._wake:
      self._beats[phase] += 1
      timeout = self.first_timeout_s if self._beats[phase] <= self.first_beats else self.timeout_s
      self._current = (phase, step, time.monotonic(), timeout)
      self._wake.notify()

  def beats(self, items: Iterable[T], phase: str, step: int) -> Iterator[T]:
    """`items`, with a beat of `phase` of `step` before each (the batches of an evaluation)."""
    for item in items:
      self.beat(phase, step)
      yield item

  @contextlib.contextmanager
  def phase(self, name: str, step: int) -> Iterator[None]:
    """Times the block as phase `name` of `step` (beats inside it restart the clock); untimed after it."""
    self.beat(name, step)
    try:
      yield
    finally:
      with self._wake:
        self._current = None
        self._wake.notify()

  def _watch(self) -> None:
    with self._wake:
      while not self._stopped:
        if self._current is None:
          self._wake.wait()
          continue
        phase, step, start, timeout = self._current
        left = start + timeout - time.monotonic()
        if left > 0:
          self._wake.wait(left)
        else:
          self._fire(phase, step, time.monotonic() - start, timeout)

  def _fire(self, phase: str, step: int, stalled_s: float, timeout: float) -> None:
    """Logs what stalled and every thread's stack (absl log and stderr), then exits."""
    logging.error("Watchdog: phase %r of step %d has made no progress for %.1f s (timeout %.1f s); the stacks of "
                  "all threads follow. Exiting with status %d so that the job is restarted.", phase, step,
                  stalled_s, timeout, STALL_EXIT_CODE)
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
      logging.error("Watchdog: thread %s (%d):\n%s", names.get(ident, "?"), ident,
                    "".join(traceback.format_stack(frame)))
    logging.flush()
    sys.stderr.flush()
    faulthandler.dump_traceback(file=2, all_threads=True)  # the descriptor: sys.stderr may be a notebook's stream
    os._exit(STALL_EXIT_CODE)  # not sys.exit: a stalled process cannot unwind, its exit handlers would wait too
