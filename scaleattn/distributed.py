"""Start-up of JAX's multi-process runtime: one process per host (TPU VM worker, GPU node or SLURM task)."""
from __future__ import annotations

import os

import jax
from absl import logging


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Calls jax.distributed.initialize when this is a multi-process run.

  Explicit arguments serve GPU clusters and tests; on TPU VMs, under SLURM, or with JAX's own
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables JAX detects everything itself.
  A single process on one machine needs nothing.
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                     "MEGASCALE_COORDINATOR_ADDRESS")):
    jax.distributed.initialize()
  logging.info("Process %d of %d; %d local / %d global devices: %s", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices())
