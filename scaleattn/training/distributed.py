"""Start-up of JAX's multi-process runtime: one process per host (TPU VM worker, GPU node or SLURM task)."""
from __future__ import annotations

import os
import re

import jax
import ml_collections
from absl import logging


def forced_cpu_devices() -> int:
  """CPU devices per process that XLA_FLAGS (--xla_force_host_platform_device_count) or jax_num_cpu_devices ask
  for; 1 when neither does."""
  found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  count = int(found[-1]) if found else 1
  return jax.config.jax_num_cpu_devices if jax.config.jax_num_cpu_devices > 0 else count


def reserve_cpu_client_threads() -> None:
  """Gives XLA's CPU client threads to spare when a process has several CPU devices. Call before the backend starts.

  The client runs each device's part of a program on one pool of max(cores, local CPU devices) threads, and a
  collective completes only when every local device's part runs at once. A launch that finds its device's queue of
  unfinished programs full blocks a pool thread until one finishes, so with 4 devices on 2 cores a loop that
  dispatches far ahead deadlocks: pool threads wait in the launch (Semaphore::ScopedAcquire) and in the all-reduce
  (gloo::allreduce) for parts that no thread is left to run, the Python thread waits in Execute, with no timeout.
  Twice the local devices leaves a thread for every launch the one dispatching thread can have blocked. The client
  reads the size from PJRT_NPROC (else NPROC, else the cores this process may use), and sizes its intra-op pool
  with it too. A PJRT_NPROC already set is kept; a larger NPROC is kept; one device, or GPU/TPU devices, need
  nothing.
  """
  devices = forced_cpu_devices()
  if devices > 1 and "PJRT_NPROC" not in os.environ:
    available = int(os.environ.get("NPROC") or 0) or len(os.sched_getaffinity(0))
    os.environ["PJRT_NPROC"] = str(max(available, 2 * devices))


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               timeouts: ml_collections.ConfigDict | None = None) -> None:
  """Calls jax.distributed.initialize when this is a multi-process run.

  Explicit arguments serve GPU clusters and tests; on TPU VMs, under SLURM, or with JAX's own
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables JAX detects everything itself.
  A single process on one machine needs nothing. Several CPU devices per process get their thread reserve first
  (`reserve_cpu_client_threads`). `timeouts` (config.distributed; None: JAX's defaults) bound the
  start-up, the detection of a dead process (heartbeats: every other process is then stopped by JAX's
  coordination service) and the wait for the others at exit.
  """
  reserve_cpu_client_threads()
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
