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
      "scores_input": {"model.fusion_input": "scores"},
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


def _run(miou: float, entropy: float) -> dict:
  """A fabricated finished run: every bin 10 pixels, weights 0.5 / 0.3 / 0.2, the given entropy everywhere."""
  test = {"miou": miou}
  for b in ("background", "size_0-16", "size_16-32", "size_32-64", "size_64+"):
    test.update({f"pixels/{b}": 10.0, f"weights/{b}/entropy": entropy, f"weights/{b}/max_above_0.8": 0.1})
    test.update({f"attention/{b}/scale_{s}": w for s, w in (("1", 0.5), ("0.75", 0.3), ("0.5", 0.2))})
    test.update({f"accuracy/{b}/{s}": 0.5 for s in ("scale_1", "scale_0.75", "scale_0.5", "fused")})
  return {"train_seconds": 60.0, "test": test}


def test_a_change_is_compared_with_the_reference_on_its_own_seeds():
  reference = {0: _run(0.60, 0.8), 1: _run(0.70, 0.9)}
  summary = sharp.summarize(["scores_input", "longer"], {"scores_input": {0: _run(0.62, 0.5)}}, reference)
  assert set(summary) == {sharp.REFERENCE, "scores_input"}  # 'longer' has no finished run
  np.testing.assert_allclose(summary[sharp.REFERENCE]["object_entropy"], 0.85)
  change = summary["scores_input"]
  np.testing.assert_allclose([change["object_entropy"], change["reference_same_seeds"]["object_entropy"]], [0.5, 0.8])
  assert change["vs_reference"]["n"] == 1 and change["vs_reference"]["seeds"] == [0]
  np.testing.assert_allclose(change["vs_reference"]["mean"], 0.02)
  assert (change["weight_scale_1_0-16"], change["weight_scale_0.5_64+"]) == (0.5, 0.2)
  table = sharp.markdown(summary, {"machine": "m", "commit": "c", "runs_finished": 1, "runs_total": 6, "missing": []})
  assert "| scores_input | " in table and "| 62.0 (60.0) | +2.00 (1/1 above) | 0.50 (0.80) |" in table
