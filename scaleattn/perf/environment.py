"""Where a measurement comes from: device, host, versions, commit and XLA flags, recorded beside every result."""
from __future__ import annotations

import os
import platform
import subprocess

import jax


def environment() -> dict:
  """Where the numbers come from: device, host, versions, commit, XLA flags."""
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except OSError:
    commit = ""
  return {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
          "device_count": jax.device_count(), "machine": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "commit": commit,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}
