"""Test session setup: several fake CPU devices so sharding is exercised, and quiet TensorFlow.

This must run before JAX initialises its backends, hence the environment variables at import time.
"""
import os
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()

NUM_TEST_DEVICES = 4


@pytest.fixture(autouse=True, scope="session")
def _session_tempdir(tmp_path_factory):
  """Keeps temporary files inside pytest's directory: TFDS leaves an empty one behind per unprepared builder."""
  saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
  tempfile.tempdir = os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tempfile"))
  yield
  tempfile.tempdir = saved_tempdir
  if saved_env is None:
    del os.environ["TMPDIR"]
  else:
    os.environ["TMPDIR"] = saved_env
