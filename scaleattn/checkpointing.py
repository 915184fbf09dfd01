"""Orbax checkpoints of the training state: async saves every N steps and at the end (and on preemption),
keeping the latest K plus the best by validation mIoU, restored onto whatever mesh the run uses.

The data position needs no saving of its own: the input pipeline is indexed by step, so the restored step is
the data position.

Integrity: once a save has completed, process 0 writes `SHA256SUMS` (`sha256sum -c` format) into the step's
directory; a restore checks it first, so a checkpoint damaged after it was written (truncated, bit-flipped) is
skipped like one Orbax cannot read. A full disk while saving stops the run with an error naming the directory
and the free space; the checkpoints before it stay complete.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

from scaleattn.experiment import Experiment, initial_state
from scaleattn.weights.named import sha256

BEST_METRIC = "miou"
MANIFEST = "SHA256SUMS"
SET_ASIDE_SUFFIX = ".unusable"  # a checkpoint found damaged on resume is renamed STEP.unusable, never deleted
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written because its storage is full; the checkpoints before it are intact."""


def _disk_full(error: BaseException | None) -> bool:
  """Whether `error` or one it was raised from is a full disk or quota (Orbax wraps TensorStore's, which give
  only the message)."""
  messages = tuple(os.strerror(code) for code in _DISK_FULL)
  while error is not None:
    if (isinstance(error, OSError) and error.errno in _DISK_FULL) or any(m in str(error) for m in messages):
      return True
    error = error.__cause__ or error.__context__
  return False


def _size(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _files(step_dir: epath.Path) -> Iterator[tuple[str, epath.Path]]:
  """(path relative to `step_dir`, path) of every file of a checkpoint but its manifest, in a fixed order."""
  paths = [folder / name for folder, _, names in step_dir.walk() for name in names if not name.startswith(MANIFEST)]
  for path in sorted(paths):
    yield path.relative_to(step_dir).as_posix(), path


def write_manifest(step_dir: epath.PathLike) -> None:
  """Writes the sha256 of every file of a completed checkpoint into its SHA256SUMS (atomically: a crash leaves
  no manifest, and a checkpoint without one is restored on Orbax's own checks)."""
  step_dir = epath.Path(step_dir)
  lines = "".join(f"{sha256(path)}  {name}\n" for name, path in _files(step_dir))
  tmp = step_dir / f"{MANIFEST}.tmp"
  tmp.write_text(lines)
  tmp.rename(step_dir / MANIFEST)


def manifest_problem(step_dir: epath.PathLike) -> str | None:
  """What differs between a checkpoint's files and its SHA256SUMS, or None (also when it has none)."""
  step_dir = epath.Path(step_dir)
  manifest = step_dir / MANIFEST
  if not manifest.exists():
    return None
  lines = manifest.read_text().splitlines()
  if not lines or any(len(line.split("  ", 1)[0]) != 64 or "  " not in line for line in lines):
    return f"its {MANIFEST} is empty or malformed"
  for line in lines:
    digest, name = line.split("  ", 1)
    path = step_dir / name
    if not path.exists():
      return f"file {name} listed in {MANIFEST} is missing"
    if sha256(path) != digest:
      return f"file {name} does not match its sha256 in {MANIFEST} (changed or truncated after the save)"
  return None


def _saved(state: Any) -> Any:
  """The tree saved for `state`: its own checkpoint layout where it defines one (`TrainState.to_checkpoint`)."""
  return state.to_checkpoint() if hasattr(state, "to_checkpoint") else state


def _restored(abstract_state: Any, tree: Any) -> Any:
  return type(abstract_state).from_checkpoint(tree) if hasattr(abstract_state, "from_checkpoint") else tree


class Checkpoints:
  """The run's `CheckpointManager`; the one place that knows Orbax's API."""

  def __init__(self, directory: str, cfg: ml_collections.ConfigDict):
    preserve = [pp.LatestN(n=cfg.keep_checkpoints)]
    if cfg.keep_best:
      preserve.append(pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=cfg.keep_best,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=sdp.AnySavePolicy([
            sdp.FixedIntervalPolicy(cfg.checkpoint_every_steps),
            sdp.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=pp.AnyPreservationPolicy(preserve),
        cleanup_tmp_directories=True,
        # Orbax's barriers between processes are device collectives (a psum over every device) unless it is told
        # which processes take part; then they are the coordination service's, which time out with the barrier's
        # name instead of hanging, and put no collective of their own between the training step's. The
        # checkpoint directory is then ours to create.
        create=jax.process_count() == 1,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            active_processes=set(range(jax.process_count())) if jax.process_count() > 1 else None),
    )
    self.directory = os.fspath(directory)
    if "://" not in self.directory:  # Orbax's async saves need absolute local paths
      self.directory = os.path.abspath(self.directory)
    if jax.process_count() > 1:
      epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._in_flight: int | None = None  # the step whose asynchronous save may still be running
    self._write_error: CheckpointWriteError | None = None  # a full disk, once reported

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def save(self, step: int, state: Any, *, metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Asynchronous save when the policies (or `force`) say so; returns whether a save started.

    Raises CheckpointWriteError when the storage is full (for this save, or the previous one still in flight).
    """
    if not (force or self._manager.should_save(step)):
      return False
    self.wait_until_finished()
    with self._disk_errors(step):
      started = self._manager.save(step, args=ocp.args.StandardSave(_saved(state)), metrics=metrics, force=force)
    if started:
      self._in_flight = step
    return started

  def _seal(self, step: int) -> None:
    """After `step` completed: its manifest (process 0 writes it; the files are the same for every process)."""
    if jax.process_index() == 0 and step in self.all_steps():
      write_manifest(self.step_dir(step))

  @contextlib.contextmanager
  def _disk_errors(self, step: int | None) -> Iterator[None]:
    """Turns a full disk or quota while saving `step` into a CheckpointWriteError saying what is kept (the same
    error again if a later wait reports the same failed save)."""
    try:
      yield
    except Exception as e:
      if not _disk_full(e):
        raise
      if self._write_error is None:
        self._write_error = self._write_error_for(step)
      raise self._write_error from e

  def _write_error_for(self, step: int | None) -> CheckpointWriteError:
    """What a full disk while saving `step` leaves: the complete checkpoints, their size, the free space."""
    kept = [s for s in self.all_steps() if self.step_dir(s).exists()]  # a failed save left only a tmp folder
    if kept:
      last = max(kept)
      size = sum(p.stat().length for _, p in _files(self.step_dir(last)))
      kept_msg = (f"Checkpoints up to step {last} are complete (one takes {_size(size)}); free some space and run "
                  f"again to resume from step {last}.")
    else:
      kept_msg = "No earlier checkpoint exists; free some space and run again to start over."
    try:
      usage = shutil.disk_usage(self.directory)
      free = f"{_size(usage.free)} free of {_size(usage.total)}"
    except OSError:  # remote storage (gs://...): no local figure
      free = "free space unknown"
    return CheckpointWriteError(errno.ENOSPC, f"The checkpoint of step {step} could not be written to "
                                f"{self.directory}: no space left on device ({free}). {kept_msg}")

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def restore(self, abstract_state: Any, step: int | None = None, *, resume: bool = False) -> Any:
    """Restores `step` (default: latest) into the shapes, dtypes and shardings of `abstract_state`.

    A checkpoint that fails its SHA256SUMS or cannot be read (e.g. cut short by a crash) is skipped with a warning
    naming its step, falling back to the previous one; None when there is nothing to restore. `resume`: training
    continues from the result, so the skipped checkpoints are renamed STEP.unusable, to be saved anew.
    """
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    skipped, state = [], None
    for s in steps:
      problem = manifest_problem(self.step_dir(s))
      if problem is None:
        try:
          state = _restored(abstract_state, self._manager.restore(s, args=ocp.args.StandardRestore(
              _saved(abstract_state))))
          break
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one.
          problem = f"cannot be read ({type(e).__name__}: {e})"
      logging.warning("Checkpoint at step %d in %s is unusable: %s; trying an older one.", s, self.directory,
                      problem)
      skipped.append(s)
    if resume and skipped:
      self._set_aside(skipped)
    return state

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged checkpoints (process 0; the others wait) so that Orbax saves their steps again."""
    if jax.process_index() == 0:
      for s in steps:
        target = epath.Path(self.directory) / f"{s}{SET_ASIDE_SUFFIX}"
        n = 1
        while target.exists():
          target, n = epath.Path(self.directory) / f"{s}{SET_ASIDE_SUFFIX}{n}", n + 1
        self.step_dir(s).rename(target)
        logging.warning("Renamed the unusable checkpoint at step %d to %s.", s, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("scaleattn: unusable checkpoints set aside")
    self._manager.reload()

  def wait_until_finished(self) -> None:
    """Waits for the save in flight, then writes its manifest; CheckpointWriteError when the storage is full."""
    step, self._in_flight = self._in_flight, None
    with self._disk_errors(step):
      self._manager.wait_until_finished()
      if step is not None:
        self._seal(step)

  def close(self) -> None:
    with self._disk_errors(None):  # closing waits too
      self._manager.close()


def restore_params(workdir: str, train_cfg: ml_collections.ConfigDict, abstract_state: Any,
                   step: int | None = None) -> tuple[Any, int]:
  """(weights, step) of a training workdir's checkpoint (latest readable, or `step`), restored into the shapes
  and shardings of `abstract_state`: the parameters, as variables with the model's non-parameter state when it has
  some (`TrainState.weights`); FileNotFoundError when there is none."""
  directory = os.path.join(workdir, "checkpoints")
  ckpts = Checkpoints(directory, train_cfg)
  try:
    state = ckpts.restore(abstract_state, step)
  finally:
    ckpts.close()
  if state is None:
    which = "readable checkpoint" if step is None else f"readable checkpoint at step {step}"
    raise FileNotFoundError(f"no {which} in {directory}; train first")
  return state.weights, int(state.step)


def restore_weights(exp: Experiment, workdir: str, step: int | None = None) -> tuple[Any, int | None]:
  """(weights, step) for evaluation or prediction: the workdir's checkpoint (`restore_params`) or, when it has none
  and config.init_from names weights, those (step None): evaluating a released model is one command."""
  try:
    return restore_params(workdir, exp.config.train, exp.abstract_state, step)
  except FileNotFoundError:
    if not exp.config.init_from or step is not None:
      raise
  logging.info("No checkpoint in %s: running the weights of config.init_from=%s.", workdir, exp.config.init_from)
  return initial_state(exp).weights, None
