"""Test session setup: several fake CPU devices so sharding is exercised, the thread reserve XLA's CPU client needs
for them, and quiet TensorFlow.

This must run before JAX initialises its backends, hence the environment variables at import time.
"""
import glob
import os
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()

NUM_TEST_DEVICES = 4

from scaleattn.training import distributed  # noqa: E402 - after XLA_FLAGS, before any JAX backend starts

distributed.reserve_cpu_client_threads()  # as scaleattn.main does: 4 devices on a small machine deadlock without


@pytest.fixture(autouse=True, scope="session")
def _session_tempdir(tmp_path_factory):
  """Keeps temporary files inside pytest's directory: TFDS leaves an empty one behind per unprepared builder."""
  path = str(tmp_path_factory.mktemp("tempfile"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tempfile, "tempdir", path)
    patch.setenv("TMPDIR", path)
    yield


@pytest.fixture(autouse=True, scope="session")
def _compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the session and the processes it starts: the smoke steps that many
  tests build compile once. A cached executable computes exactly what a fresh compilation does."""
  import jax  # noqa: PLC0415 - after the environment above is set
  path = str(tmp_path_factory.mktemp("xla_cache"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JAX_COMPILATION_CACHE_DIR", path)
    jax.config.update("jax_compilation_cache_dir", path)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


def _logged(workdir, tag: str):
  """(step, tensor as NumPy) of every summary named `tag` in the run's TensorBoard event files."""
  import tensorflow as tf  # noqa: PLC0415 - reads what clu's writer wrote
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          yield event.step, tf.make_ndarray(v.tensor)


def logged_scalars(workdir, tag: str) -> dict[int, float]:
  """step -> value of a scalar in the run's TensorBoard event files."""
  return {step: float(value) for step, value in _logged(workdir, tag)}


def logged_images(workdir, tag: str) -> dict[int, list]:
  """step -> the images (uint8 [H, W, C] arrays) of an image summary in the run's TensorBoard event files."""
  import io  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415
  # An image summary's tensor holds the width, the height, then one encoded PNG per image.
  return {step: [np.asarray(Image.open(io.BytesIO(png))) for png in value[2:]] for step, value in _logged(workdir, tag)}


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory):
  """A TFDS data_dir shared by the session's tests: the smoke split of scale_shapes is generated into it once, by the
  first test that reads it."""
  return str(tmp_path_factory.mktemp("smoke_tfds"))
