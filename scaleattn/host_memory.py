"""Host allocator policy for the command-line entry points (training, benchmark).

XLA:CPU allocates an executable's temporaries afresh at every call, from one of its worker threads: 1.1 GB per
3-scale train step at batch 1. glibc serves blocks that large with mmap and gives them back with munmap, so every
step faults all its temporaries in again, one 4 KiB page at a time (about 280k faults per 3-scale step, 2.6 us
each on a 2-core x86 VM). Keeping freed memory in one heap lets most steps reuse earlier steps' pages (a step
whose aligned request fits no hole the others left still grows the heap); the price is that the process's resident
memory stays at its high-water mark.
"""
from __future__ import annotations

import ctypes
import platform

from absl import flags

flags.DEFINE_bool("retain_host_memory", True, "Linux/glibc: keep freed host memory for reuse (one malloc arena, no "
                  "mmap-served blocks, no trimming), so XLA:CPU's per-step temporaries do not fault in fresh pages "
                  "every step. Must take effect before JAX starts its runtime.")

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


def retain_if_flagged() -> bool:
  """`retain_freed_memory()` unless `--retain_host_memory=false`; True if the policy took effect."""
  return flags.FLAGS.retain_host_memory and retain_freed_memory()
