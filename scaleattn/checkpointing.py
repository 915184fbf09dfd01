"""Orbax checkpoints of the training state: async saves every N steps and at the end (and on preemption),
keeping the latest K plus the best by validation mIoU, restored onto whatever mesh the run uses.

The data position needs no saving of its own: the input pipeline is indexed by step, so the restored step is
the data position.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

BEST_METRIC = "miou"


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
    )
    self.directory = os.fspath(directory)
    if "://" not in self.directory:  # Orbax's async saves need absolute local paths
      self.directory = os.path.abspath(self.directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Asynchronous save when the policies (or `force`) say so; returns whether a save started."""
    return self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=force)

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default: latest) into the shapes, dtypes and shardings of `abstract_state`.

    A checkpoint that cannot be read (e.g. cut short by a crash) is skipped with a warning, falling back to
    the previous one; None when there is nothing to restore.
    """
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    for s in steps:
      try:
        return self._manager.restore(s, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one.
        logging.warning("Checkpoint %d in %s is unreadable (%s: %s); trying an older one.",
                        s, self.directory, type(e).__name__, e)
    return None

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def restore_params(workdir: str, train_cfg: ml_collections.ConfigDict, abstract_state: Any,
                   step: int | None = None) -> tuple[Any, int]:
  """(parameters, step) of a training workdir's checkpoint (latest readable, or `step`), restored into the shapes
  and shardings of `abstract_state`; FileNotFoundError when there is none."""
  directory = os.path.join(workdir, "checkpoints")
  ckpts = Checkpoints(directory, train_cfg)
  try:
    state = ckpts.restore(abstract_state, step)
  finally:
    ckpts.close()
  if state is None:
    which = "readable checkpoint" if step is None else f"readable checkpoint at step {step}"
    raise FileNotFoundError(f"no {which} in {directory}; train first")
  return state.params, int(state.step)
