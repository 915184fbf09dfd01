"""Any global batch on any device count: the paper's batch of 30 on 1, 4 and 16 devices (padded with ignored
examples to 30, 32 and 32 rows) gives the one-device step's loss and update, and so does the batch in 5 microbatches
of 6 (padded to 8 rows) on 8 devices (dropout off: each microbatch draws its own masks); evaluation on 1 and 8
devices gives the same mIoU."""
import os
import subprocess
import sys

import numpy as np
import pytest

from scaleattn import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("topology")
  out = tmp / "probe.npz"
  subprocess.run([sys.executable, os.path.join(REPO, "tests", "topology_probe.py"), str(tmp / "tfds"), str(out)],
                 cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), check=True, capture_output=True, timeout=600)
  with np.load(out) as f:
    return dict(f)


def _params(probe, name):
  prefix = f"{name}/params/"
  return {k[len(prefix):]: v for k, v in probe.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name, reference, rows", [("d4", "d1", (1, 32)), ("d16", "d1", (1, 32)),
                                                   ("d8_k5", "d1_nodropout", (5, 8))])
def test_padded_and_accumulated_steps_equal_the_one_device_step(probe, name, reference, rows):
  assert tuple(probe[f"{name}/rows"]) == rows and tuple(probe[f"{reference}/rows"]) == (1, 30)
  np.testing.assert_allclose(probe[f"{name}/loss"], probe[f"{reference}/loss"], rtol=2e-6)
  ours, want = _params(probe, name), _params(probe, reference)
  assert ours.keys() == want.keys() and len(ours) > 10
  for path, value in want.items():
    np.testing.assert_allclose(ours[path], value, rtol=1e-5, atol=1e-6, err_msg=path)


def test_dropout_differs_without_padding_tricks(probe):
  """The comparison above can fail: dropout on and off give different updates from the same batch."""
  assert not np.isclose(probe["d1/loss"], probe["d1_nodropout/loss"], rtol=1e-4)


def test_evaluation_on_one_and_eight_devices_is_identical(probe):
  assert probe["eval_d1/miou"] == probe["eval_d8/miou"]
  assert probe["eval_d1/pixel_accuracy"] == probe["eval_d8/pixel_accuracy"]


def test_padding_is_reported_as_wasted_compute():
  layout = input_pipeline.batch_layout(30, 1, 16, 2)
  assert layout.rows == 32 and layout.padding_fraction == pytest.approx(2 / 32)


def test_padding_is_logged_with_its_share_of_the_compute(caplog):
  from scaleattn import train  # noqa: PLC0415
  caplog.set_level("WARNING")
  train.warn_if_padded(input_pipeline.batch_layout(4, 1, 16, 1), 16)
  assert "padded from 4 to 16 rows with ignored examples, 75% of the step's compute" in caplog.text
  caplog.clear()
  train.warn_if_padded(input_pipeline.batch_layout(32, 2, 16, 1), 16)
  assert not caplog.text
