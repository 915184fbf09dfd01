"""launch/paper_protocol.py without training: the claims' statistics against hand-computed values, the run list and
its configs, the report from fabricated results, and the pretraining data beside unchanged evaluation data."""
import hashlib
import json
import os

import numpy as np
import pytest

from launch import paper_protocol as pp
from scaleattn.config import validation
from scaleattn.data import scale_shapes

T_975_2, T_975_3 = 4.302653, 3.182446  # Student t quantiles (0.975; 2 and 3 degrees of freedom), from tables


def test_paired_differences_by_hand():
  """Differences 0.1, -0.02, 0.1: mean 0.06, sample sd sqrt(0.0096 / 2), interval 0.06 -+ t * sd / sqrt(3)."""
  a, b = {0: 0.5, 1: 0.6, 2: 0.55, 7: 0.9}, {0: 0.4, 1: 0.62, 2: 0.45}  # seed 7 has no pair: left out
  out = pp.paired(a, b)
  half = T_975_2 * np.sqrt(0.0096 / 2) / np.sqrt(3)
  assert out["seeds"] == [0, 1, 2] and out["n"] == 3 and out["positive"] == 2
  np.testing.assert_allclose(out["differences"], [0.1, -0.02, 0.1], atol=1e-12)
  np.testing.assert_allclose(out["mean"], 0.06, atol=1e-12)
  np.testing.assert_allclose(out["interval"], [0.06 - half, 0.06 + half], rtol=1e-5)
  assert out["verdict"] == "unresolved"


def test_paired_verdicts_need_the_interval_to_exclude_zero():
  """Differences 1.0, 1.1, 0.9, 1.0: sd sqrt(0.02 / 3), half-width t(3) * sd / 2 = 0.1299; above 0 either way."""
  a = {s: 2.0 + d for s, d in enumerate([1.0, 1.1, 0.9, 1.0])}
  b = {s: 2.0 for s in range(4)}
  half = T_975_3 * np.sqrt(0.02 / 3) / 2
  up = pp.paired(a, b)
  np.testing.assert_allclose(up["interval"], [1.0 - half, 1.0 + half], rtol=1e-5)
  assert (up["verdict"], up["positive"]) == ("supported", 4)
  down = pp.paired(b, a)
  assert (down["verdict"], down["positive"]) == ("contradicted", 0)
  assert pp.paired({0: 1.0}, {0: 0.5})["verdict"] == "too few seeds"


def test_a_small_effect_needs_five_seeds():
  """+0.8 points in each of 3 seeds excludes 0 but is under 1.5 points: not a verdict until 5 seeds agree."""
  b = {s: 0.5 for s in range(5)}
  a = {s: 0.508 + 0.001 * (s % 2) for s in range(5)}
  few = pp.paired({s: a[s] for s in range(3)}, b)
  assert few["interval"][0] > 0 and few["verdict"] == "too few seeds"
  assert pp.paired(a, b)["verdict"] == "supported"
  big = {s: 0.52 for s in range(3)}  # +2 points in 3 seeds: large enough to call
  assert pp.paired(big, {s: 0.5 + 0.001 * s for s in range(3)})["verdict"] == "supported"


def test_claims_cover_the_three_questions_on_existing_cells():
  names = [c.name for c in pp.cells()]
  claims = pp.claims()
  assert len(claims) == 12 + 2 * 2 * 2 + 2 * 3
  assert all(a in names and b in names for _, a, b in claims)
  assert ("s3-esupv: attention > max", "s3-attention-esupv", "s3-max-esupv") in claims
  assert ("s2-average: E-Supv > none", "s2-average-esupv", "s2-average") in claims


def test_cells_claims_first_and_every_config_validates(tmp_path):
  cells = pp.cells()
  assert len(cells) == 13 and len({c.name for c in cells}) == 13
  assert [c.fusion for c in cells[:9]].count("max") == 0 and {c.fusion for c in cells[9:]} == {"max"}
  jobs = pp.jobs(cells, range(2), str(tmp_path))
  assert len(jobs) == 2 * 14
  assert (jobs[0].name, jobs[0].seed) == ("pretrain", 0) and (jobs[10].name, jobs[10].seed) == ("pretrain", 1)
  assert all(j.name.startswith("s") and "max" in j.name for j in jobs[-8:])
  for job in jobs:
    config = job.args[0]
    validation.validate(config, num_data_devices=1)
    assert config.seed == job.seed
    if job.name != "pretrain":
      assert job.after.name == "pretrain" and job.after.seed == job.seed
      assert config.init_from == os.path.join(job.after.args[1], pp.BACKBONE_FILE)
      assert (config.optim.name, config.optim.momentum, config.loss.per_scale_grid) == ("sgd", 0.9, "authors")
      assert config.model.num_classes == 5
    else:
      assert config.model.scales == (1.0,) and config.model.num_classes == 6


def _fake_result(miou: float, scales: tuple[str, ...]) -> dict:
  test = {"miou": miou, "pixels/background": 10.0, "pixels/size_0-16": 5.0}
  for b in ("background", "size_0-16"):
    test.update({f"accuracy/{b}/{s}": 0.5 for s in ("fused",) + scales})
    test.update({f"attention/{b}/{s}": 1 / len(scales) for s in scales})
  return {"train_seconds": 60.0, "test": test}


def test_report_from_fabricated_runs(tmp_path):
  """Two seeds of pretraining, baseline and s2-attention: the cells, the claim between them and the size table;
  the rest listed as missing."""
  cells = [c for c in pp.cells() if c.name in ("baseline", "s2-attention")]
  jobs = pp.jobs(cells, range(2), str(tmp_path / "runs"))
  for job in jobs:
    run_dir = job.args[1]
    os.makedirs(run_dir)
    scales = ("scale_1", "scale_0.5") if job.name == "s2-attention" else ("scale_1",)
    miou = {"pretrain": 0.7, "baseline": 0.5, "s2-attention": 0.6}[job.name] + 0.01 * job.seed
    for path in job.outputs:
      payload = _fake_result(miou, scales) if path.endswith("result.json") else {}
      if path.endswith(pp.WEIGHT_STATS_FILE):
        payload = {"weights/background/entropy": 0.9, f"weights/background/max_above_{pp.SHARP:g}": 0.1}
      if job.seed == 1 and job.name == "s2-attention":
        continue  # unfinished
      with open(path, "w") as f:
        json.dump(payload, f)
  pp.write_results(jobs, pp.cells(), str(tmp_path), 0.0, 2, [])
  report = json.load(open(tmp_path / "paper_protocol.json"))
  assert report["runs_finished"] == 5 and report["missing"] == ["s2-attention seed 1"]
  assert report["cells"]["baseline"]["test_miou_per_seed"] == {"0": 0.5, "1": 0.51}
  (claim,) = report["claims"]["paper_protocol"].values()
  assert claim["claim"] == "s2-attention > baseline" and claim["n"] == 1
  md = (tmp_path / "paper_protocol.md").read_text()
  assert "| s2-attention > baseline | +10.00 - | 1/1 | too few seeds |" in md
  assert "| background | 10 | 50.0 | 50.0 | 50.0 | 0.50 | 0.50 | 0.90 | 10.0 |" in md
  assert (tmp_path / pp.FIGURE).stat().st_size > 0


# sha256 (first 16 hex) of examples 0-2 of every split, as generated before the 'pretrain' config existed.
UNCHANGED = {"default": "b5c3c579e03e26db", "small": "f2451183743ba371", "smoke": "fb05133585da5e8e"}


def _digest(cfg: scale_shapes.ShapesConfig) -> str:
  h = hashlib.sha256()
  for seed in scale_shapes.SPLIT_SEEDS.values():
    for i in range(3):
      example = scale_shapes.generate(cfg, i, seed + cfg.seed_offset)
      for key in ("image", "label", "instance_size"):
        h.update(example[key].tobytes())
  return h.hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(UNCHANGED))
def test_evaluation_data_is_unchanged(name):
  (cfg,) = [c for c in scale_shapes.CONFIGS if c.name == name]
  assert _digest(cfg) == UNCHANGED[name]


def test_pretraining_data_has_its_own_outlines_and_images():
  (cfg,) = [c for c in scale_shapes.CONFIGS if c.name == "pretrain"]
  (small,) = [c for c in scale_shapes.CONFIGS if c.name == "small"]
  assert not set(cfg.shapes) & set(small.shapes)
  examples = [scale_shapes.generate(cfg, i, cfg.seed_offset) for i in range(30)]
  labels = set(np.unique(np.concatenate([e["label"].ravel() for e in examples])))
  assert labels == set(range(len(scale_shapes.PRETRAIN_CLASS_NAMES)))
  assert not np.array_equal(examples[0]["image"][:20, :20], scale_shapes.generate(small, 0, 0)["image"][:20, :20])
