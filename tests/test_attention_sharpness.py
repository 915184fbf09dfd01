"""launch/attention_sharpness.py without training: each change alters exactly what it names, the head's multipliers
reach the head's parameters, and the object-pixel averages against hand-computed values."""
import numpy as np

from launch import attention_sharpness as sharp
from launch import paper_protocol as pp
from scaleattn.config import validation
from scaleattn.training import optimizers


def _flat(config, prefix=""):
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def test_each_change_alters_only_what_it_names_from_the_reference_cell():
  reference = _flat(pp.finetune_config(sharp.reference_cell(), 3, "pretrain/seed_3/backbone.npz"))
  assert (reference["model.scales"], reference["model.fusion.name"], reference["loss.extra_supervision"]) == (
      (1.0, 0.75, 0.5), "attention", True)
  expected = {
      "longer": {"train.num_steps": 2400, "optim.decay_every_steps": 800, "train.eval_every_steps": 2400},
      "scores_input": {"model.fusion.head_input": "scores"},
      "head_lr_x10": {"optim.lr_multipliers": ((r"backbone/fc8/kernel", 10.0), (r"backbone/fc8/bias", 20.0),
                                               (r"fusion/.*/kernel", 100.0), (r"fusion/.*/bias", 200.0),
                                               (r".*/bias", 2.0))},
  }
  assert set(expected) == set(sharp.CHANGES)
  for change, fields in expected.items():
    config = sharp.change_config(change, 3, "pretrain/seed_3/backbone.npz")
    validation.validate(config, num_data_devices=1)
    changed = {k: v for k, v in _flat(config).items() if reference.get(k) != v}
    assert changed == fields, change


def test_ten_times_the_head_rate_reaches_the_head_alone():
  config = sharp.change_config("head_lr_x10", 0, "backbone.npz")
  params = {"fusion": {"hidden": {"kernel": 0, "bias": 0}, "logits": {"kernel": 0, "bias": 0}},
            "backbone": {"fc8": {"kernel": 0, "bias": 0}, "fc7": {"kernel": 0, "bias": 0}}}
  tree = optimizers.lr_multiplier_tree(params, config.optim.lr_multipliers)
  assert tree == {"fusion": {"hidden": {"kernel": 100.0, "bias": 200.0}, "logits": {"kernel": 100.0, "bias": 200.0}},
                  "backbone": {"fc8": {"kernel": 10.0, "bias": 20.0}, "fc7": {"kernel": 1.0, "bias": 2.0}}}


def test_jobs_wait_for_the_reference_run_of_their_seed(tmp_path):
  jobs = sharp.jobs(["scores_input", "longer"], range(2), str(tmp_path))
  assert [(j.name, j.seed) for j in jobs] == [("scores_input", 0), ("longer", 0), ("scores_input", 1), ("longer", 1)]
  for job in jobs:
    assert job.after.name == sharp.REFERENCE and job.after.seed == job.seed
    assert job.args[0].init_from == str(tmp_path / "pretrain" / f"seed_{job.seed}" / pp.BACKBONE_FILE)
    assert job.args[1] == str(tmp_path / "sharpness" / job.name / f"seed_{job.seed}")
    assert not job.after.finished()


def test_object_pixel_averages_leave_the_background_out():
  """Bins of 10, 30, 0 (no pixels: NaN) and 60 object pixels: entropy (0.9 * 10 + 0.6 * 30 + 0.3 * 60) / 100."""
  by_size = {"pixels/background": 1000.0, "weights/background/entropy": 1.0}
  for b, pixels, entropy in (("0-16", 10.0, 0.9), ("16-32", 30.0, 0.6), ("32-64", 0.0, float("nan")),
                             ("64+", 60.0, 0.3)):
    by_size.update({f"pixels/size_{b}": pixels, f"weights/size_{b}/entropy": entropy})
  np.testing.assert_allclose(sharp._object_mean(by_size, "entropy"), (9 + 18 + 18) / 100)
