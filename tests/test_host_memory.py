"""host_memory.retain_freed_memory: later calls of a jitted function reuse resident pages for their temporaries."""
import json
import os
import platform
import resource
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the policy is glibc's mallopt")

# Runs in a fresh process: the policy must precede JAX's runtime, and the fault counter is per process. The median
# call counts: the heap grows for the first few calls, and now and then a call still lands on fresh pages
# (64-byte-aligned requests do not always fit the hole the last call left).
_PROBE = textwrap.dedent("""
  import json, resource, sys
  from scaleattn.perf import host_memory
  retained = sys.argv[1] == "retain" and host_memory.retain_freed_memory()
  import jax, jax.numpy as jnp
  step = jax.jit(lambda x: jnp.cumsum(x * 2.0, axis=0).sum())
  x = jnp.ones((4096, 4096))
  temp_bytes = step.lower(x).compile().memory_analysis().temp_size_in_bytes
  faults = []
  for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  faults = sorted(faults[10:])  # after the heap has grown to its working size
  print(json.dumps({"retained": retained, "temp_bytes": temp_bytes, "faults_per_call": faults[len(faults) // 2]}))
""")


def _probe(mode: str) -> dict:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, cwd=REPO,
                       timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_heap_serves_most_calls_temporaries_without_page_faults():
  default, retained = _probe("default"), _probe("retain")
  temp_pages = default["temp_bytes"] / resource.getpagesize()
  assert temp_pages >= 16384, default  # the probe needs temporaries far above glibc's 32 MiB mmap threshold
  if default["faults_per_call"] < temp_pages / 2:
    pytest.skip(f"this machine's default allocation does not fault the temporaries in ({default})")
  assert not default["retained"] and retained["retained"]
  assert retained["faults_per_call"] < temp_pages / 100, (default, retained)
