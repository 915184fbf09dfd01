"""Start-up of JAX's multi-process runtime: one process per host (TPU VM worker, GPU node or SLURM task)."""
from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               timeouts: ml_collections.ConfigDict | None = None) -> None:
  """Calls jax.distributed.initialize when this is a multi-process run.

  Explicit arguments serve GPU clusters and tests; on TPU VMs, under SLURM, or with JAX's own
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables JAX detects everything itself.
  A single process on one machine needs nothing. `timeouts` (config.distributed; None: JAX's defaults) bound the
  start-up, the detection of a dead process (heartbeats: every other process is then stopped by JAX's
  coordination service) and the wait for the others at exit.
  """
  kwargs = {} if timeouts is None else {
      "initialization_timeout": timeouts.initialization_timeout_seconds,
      "heartbeat_timeout_seconds": timeouts.heartbeat_timeout_seconds,
      "shutdown_timeout_seconds": timeouts.shutdown_timeout_seconds}
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)
  elif any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                     "MEGASCALE_COORDINATOR_ADDRESS")):
    jax.distributed.initialize(**kwargs)
  logging.info("Process %d of %d; %d local / %d global devices: %s", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices())
