"""Host allocator policy for the command-line entry points (training, benchmark), on CPU runs only.

XLA:CPU allocates an executable's temporaries afresh at every call, from one of its worker threads; glibc serves
blocks that large with mmap and gives them back with munmap, so every step faults all its temporaries in again,
one page at a time. Keeping freed memory in one heap lets most steps reuse earlier steps' pages; the price is that
the process's resident memory stays at its high-water mark. Measured on CPU only (README, performance section), so
a process that will run on a GPU or TPU keeps glibc's defaults.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

from absl import flags

FLAG = "retain_host_memory"


def define_flag() -> None:
  """Defines --retain_host_memory for an entry point (once per process, whichever entry point comes first)."""
  if FLAG not in flags.FLAGS:
    flags.DEFINE_bool(FLAG, True, "CPU runs on Linux/glibc: keep freed host memory for reuse (one malloc arena, no "
                      "mmap-served blocks, no trimming), so XLA:CPU's per-step temporaries do not fault in fresh "
                      "pages every step.")

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_POLICY = ((_M_ARENA_MAX, 1),  # every thread allocates from the main heap (per-thread arenas fall back to mmap)
           (_M_MMAP_MAX, 0),  # never serve a large block with its own mmap
           (_M_TRIM_THRESHOLD, -1))  # never give the top of the heap back to the OS


def retain_freed_memory() -> bool:
  """Apply the policy above to this process; True if it took effect (glibc only). Call it before the first JAX
  computation: threads pick their malloc arena at their first allocation, and JAX's start their runtime's."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  return all([libc.mallopt(option, value) == 1 for option, value in _POLICY])


def cpu_process() -> bool:
  """Whether JAX will run this process on the CPU, told before its runtime starts (as the policy must be):
  JAX_PLATFORMS names cpu first, or neither it nor an installed GPU/TPU plugin names anything else."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not importlib.metadata.entry_points(group="jax_plugins") and importlib.util.find_spec("libtpu") is None


def retain_on_cpu(enabled: bool) -> bool:
  """`retain_freed_memory()` if `enabled` and this is a CPU process; True if the policy took effect."""
  return enabled and cpu_process() and retain_freed_memory()
