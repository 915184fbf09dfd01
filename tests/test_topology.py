"""Any global batch on any device count: four steps of the smoke config with a batch of 6 on 4 devices (padded with
ignored examples to 8 rows) give the one-device run's losses and parameters, and so does the batch in 2 microbatches
of 3 (padded to 4 rows) on 4 devices (dropout off: each microbatch draws its own masks); evaluation on 1 and 8
devices gives the same confusion matrix.

The steps run without warm-up: the smoke config's warm-up makes the first step's learning rate 0, and parameters
compared after it would be the initial ones whatever the layout did."""
import os
import subprocess
import sys

import numpy as np
import pytest

from scaleattn.data import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4  # the largest difference allowed, relative to the largest magnitude of each parameter tensor


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("topology")
  out = tmp / "probe.npz"
  subprocess.run([sys.executable, os.path.join(REPO, "tests", "topology_probe.py"), str(tmp / "tfds"), str(out)],
                 cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), check=True, capture_output=True, timeout=600)
  with np.load(out) as f:
    return dict(f)


def _params(probe, name, kind="params"):
  prefix = f"{name}/{kind}/"
  return {k[len(prefix):]: v for k, v in probe.items() if k.startswith(prefix)}


def _relative_differences(ours, want):
  """Per parameter tensor, max |ours - want| / max |want|."""
  assert ours.keys() == want.keys() and len(want) > 10
  return {path: float(np.max(np.abs(ours[path] - value)) / np.max(np.abs(value))) for path, value in want.items()}


@pytest.mark.parametrize("name, reference, rows", [("d4", "d1", (1, 8)), ("d4_k2", "d1_nodropout", (2, 4))])
def test_padded_and_accumulated_steps_equal_the_one_device_steps(probe, name, reference, rows):
  """Four steps at non-zero learning rates: the same losses, and parameters within RTOL of the one-device run's,
  where those four steps moved every parameter tensor by more than 100 x RTOL."""
  assert tuple(probe[f"{name}/rows"]) == rows and tuple(probe[f"{reference}/rows"]) == (1, 6)
  assert np.all(probe[f"{reference}/learning_rate"] > 1e-4) and len(probe[f"{reference}/loss"]) == 4
  np.testing.assert_allclose(probe[f"{name}/loss"], probe[f"{reference}/loss"], rtol=1e-5)
  want = _params(probe, reference)
  moved = _relative_differences(_params(probe, reference, "init"), want)
  assert min(moved.values()) > 100 * RTOL, min(moved.items(), key=lambda kv: kv[1])
  differences = _relative_differences(_params(probe, name), want)
  assert max(differences.values()) < RTOL, max(differences.items(), key=lambda kv: kv[1])


def test_dropout_differs_without_padding_tricks(probe):
  """The comparison above can fail: dropout on and off give different updates from the same batches."""
  assert not np.isclose(probe["d1/loss"][0], probe["d1_nodropout/loss"][0], rtol=1e-4)
  differences = _relative_differences(_params(probe, "d1"), _params(probe, "d1_nodropout"))
  assert max(differences.values()) > 100 * RTOL


def test_evaluation_on_one_and_eight_devices_is_identical(probe):
  """The trained parameters evaluated in 2 batches of 6 rows (4 of them padding) and in 1 batch of 8: the same
  confusion matrix, counting every labelled pixel of the split once, with more than one class predicted."""
  assert tuple(probe["eval_d1/rows"]) == (2, 6) and tuple(probe["eval_d8/rows"]) == (1, 8)
  confusion = probe["eval_d1/confusion"]
  np.testing.assert_array_equal(probe["eval_d8/confusion"], confusion)
  assert confusion.sum() == probe["eval_d1/valid_pixels"] > 0
  assert np.count_nonzero(confusion.sum(0)) > 1  # not one class everywhere, which any layout would agree on
  assert probe["eval_d1/miou"] == probe["eval_d8/miou"]
  assert probe["eval_d1/pixel_accuracy"] == probe["eval_d8/pixel_accuracy"]


def test_padding_is_reported_as_wasted_compute():
  layout = input_pipeline.batch_layout(30, 1, 16, 2)
  assert layout.rows == 32 and layout.padding_fraction == pytest.approx(2 / 32)


def test_padding_is_logged_with_its_share_of_the_compute(caplog):
  from scaleattn.training import loop  # noqa: PLC0415
  caplog.set_level("WARNING")
  loop.warn_if_padded(input_pipeline.batch_layout(4, 1, 16, 1), 16)
  assert "padded from 4 to 16 rows with ignored examples, 75% of the step's compute" in caplog.text
  caplog.clear()
  loop.warn_if_padded(input_pipeline.batch_layout(32, 2, 16, 1), 16)
  assert not caplog.text
