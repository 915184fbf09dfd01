"""End to end on the smoke config with 4 CPU devices: training writes checkpoints, metrics and event files;
sharding does not change the step; a restarted run ends where an uninterrupted one does."""
import glob
import json
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest
from conftest import NUM_TEST_DEVICES

from configs import shapes
from scaleattn import checkpointing, input_pipeline, sharding, train
from scaleattn.state import build


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def smoke_config(data_dir, **overrides):
  config = shapes.get_config("smoke")
  config.dataset.data_dir = data_dir
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    config[section][key] = value
  return config


def _final_params(workdir, config):
  setup = build(config)
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), config.train)
  state = ckpts.restore(setup.abstract_state, step=config.train.num_steps)
  return jax.device_get(state.params)


def test_smoke_run_writes_everything(data_dir, tmp_path):
  config = smoke_config(data_dir)
  assert jax.device_count() == NUM_TEST_DEVICES
  result = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= result["miou"] <= 1.0 and np.isfinite(result["pixel_accuracy"])
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps[-1] == config.train.num_steps
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert json.load(open(tmp_path / "config.json"))["model"]["fusion"] == "attention"
  assert glob.glob(str(tmp_path / "examples" / "example_000_panel.png"))


def test_sharded_step_equals_single_device_step(data_dir):
  config = smoke_config(data_dir)
  data = input_pipeline.create_datasets(config)
  local = next(data.train_batches(0))
  outs = []
  for n in (1, NUM_TEST_DEVICES):
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": n}))
    setup = build(config, mesh)
    p_train, _ = train.jit_steps(setup)
    state = setup.init_state(jax.random.key(0))
    state, m = p_train(state, sharding.global_batch(mesh, local), jax.random.key(1))
    outs.append((jax.device_get(state.params), float(m.compute()["loss"])))
  np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_restart_resumes_exactly(data_dir, tmp_path):
  config = smoke_config(data_dir, **{"train.eval_every_steps": 100, "eval.num_examples": 0})
  straight = tmp_path / "straight"
  train.train_and_evaluate(config, str(straight))
  interrupted = tmp_path / "interrupted"
  first_half = smoke_config(data_dir, **{"train.num_steps": 3, "eval.num_examples": 0})
  train.train_and_evaluate(first_half, str(interrupted))
  train.train_and_evaluate(config, str(interrupted))
  a, b = _final_params(straight, config), _final_params(interrupted, config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_sigterm_checkpoints_then_raises_preempted(data_dir, tmp_path, monkeypatch):
  """SIGTERM during step 2: a checkpoint at step 2, then `Preempted` (never a normal return); a rerun finishes."""
  config = smoke_config(data_dir, **{"train.eval_every_steps": 100, "train.checkpoint_every_steps": 100,
                                     "eval.num_examples": 0})
  jit_steps = train.jit_steps

  def sigterm_during_step_2(setup):
    p_train, p_eval = jit_steps(setup)

    def step(state, batch, rng):
      if int(state.step) == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      return p_train(state, batch, rng)
    return step, p_eval

  monkeypatch.setattr(train, "jit_steps", sigterm_during_step_2)
  with pytest.raises(train.Preempted) as stopped:
    train.train_and_evaluate(config, str(tmp_path))
  assert stopped.value.step == 2
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2]
  monkeypatch.undo()
  assert 0.0 <= train.train_and_evaluate(config, str(tmp_path))["miou"] <= 1.0


def test_fusion_override_changes_parameter_tree(data_dir):
  trees = {}
  for fusion in ("attention", "max", "average"):
    setup = build(smoke_config(data_dir, **{"model.fusion": fusion}))
    trees[fusion] = setup.abstract_state.params
  assert "fusion" in trees["attention"] and "fusion" not in trees["max"]
  assert jax.tree.structure(trees["max"]) == jax.tree.structure(trees["average"])


@pytest.mark.parametrize("fusion", ["attention", "max", "average"])
def test_predict_writes_files(data_dir, tmp_path, fusion):
  from PIL import Image

  from scaleattn import predict
  config = smoke_config(data_dir, **{"model.fusion": fusion})
  setup = build(config)
  params = jax.device_get(setup.init_state(jax.random.key(0)).params)
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8)).save(images / "a.png")
  Image.fromarray(rng.integers(0, 255, (120, 90, 3), np.uint8)).save(images / "b.jpg")  # larger than eval_size
  (images / "broken.png").write_bytes(b"not an image")
  out = predict.predict_files(config, str(tmp_path), [str(images)], str(tmp_path / "out"), params=params)
  assert out["failed"] == [str(images / "broken.png")]
  names = sorted(os.listdir(tmp_path / "out"))
  for stem in ("a", "b"):
    assert f"{stem}_seg.png" in names and f"{stem}_panel.png" in names
    assert f"{stem}_weights_s1.png" in names and f"{stem}_weights_s0.5.png" in names
  seg = np.asarray(Image.open(tmp_path / "out" / "a_seg.png"))
  assert seg.shape == (50, 70) and seg.max() < config.model.num_classes


def test_eval_step_size_statistics_against_numpy(data_dir):
  """Per size bin: fusion weights and correct pixels of the fused and per-scale predictions, recomputed in NumPy
  from the model's raw outputs (align-corners upsampling, argmax, binning by hand); padding and 255 not counted."""
  import numpy_reference as ref
  config = smoke_config(data_dir)
  config.eval.size_bins = (8, 24)
  setup = build(config)
  params = setup.init_state(jax.random.key(3)).params
  rng = np.random.default_rng(0)
  b, size, c = 4, config.input.eval_size, config.model.num_classes
  batch = {"image": rng.normal(0, 60, (b, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, c, (b, size, size)).astype(np.int32),
           "mask": np.ones((b, size, size), bool),
           "instance_size": rng.choice([0.0, 5.0, 8.0, 20.0, 40.0], (b, size, size)).astype(np.float32)}
  batch["mask"][:, -7:] = False
  batch["label"][:, :3] = 255
  _, p_eval = train.jit_steps(setup)
  stats = jax.device_get(p_eval(params, sharding.global_batch(setup.mesh, batch)))
  out = setup.model.apply({"params": params}, batch["image"], train=False)
  up = lambda x: ref.bilinear(np.asarray(x, np.float64), (size, size))
  weights, fused, per_scale = up(out.weights), up(out.fused).argmax(-1), up(out.per_scale).argmax(-1)
  correct = np.concatenate([fused[..., None], per_scale], -1) == batch["label"][..., None]
  want_w, want_c, want_n = np.zeros((4, 2)), np.zeros((4, 3)), np.zeros(4)
  for idx in zip(*np.nonzero(batch["mask"] & (batch["label"] != 255)), strict=True):
    s = batch["instance_size"][idx]
    k = 0 if s == 0 else 1 + int(s >= 8) + int(s >= 24)
    want_w[k] += weights[idx]
    want_c[k] += correct[idx]
    want_n[k] += 1
  np.testing.assert_array_equal(stats["pixel_count"], want_n)
  np.testing.assert_allclose(stats["weight_sum"], want_w, rtol=1e-4)
  assert np.all(np.abs(stats["correct_sum"] - want_c) <= 0.002 * want_n[:, None])  # argmax ties flip by rounding
