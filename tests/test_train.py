"""End to end on the smoke config with 4 CPU devices: training writes checkpoints, metrics and event files;
sharding does not change the step; a restarted run ends where an uninterrupted one does."""
import json
import os
import signal

import jax
import numpy as np
import pytest
from conftest import NUM_TEST_DEVICES, logged_images, logged_scalars
from PIL import Image

from configs import shapes
from scaleattn import checkpointing, sharding
from scaleattn.data import input_pipeline
from scaleattn.evaluation import segmentation
from scaleattn.experiment import build_experiment
from scaleattn.models import resize
from scaleattn.training import loop, train_step


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def smoke_config(data_dir, **overrides):
  config = shapes.get_config("smoke")
  config.dataset.data_dir = data_dir
  for dotted, value in overrides.items():
    *path, key = dotted.split(".")
    section = config
    for name in path:
      section = section[name]
    section[key] = value
  return config


def _final_params(workdir, config):
  params, _ = checkpointing.restore_params(workdir, config.train, build_experiment(config).abstract_state,
                                           step=config.train.num_steps)
  return jax.device_get(params)


def test_a_short_run_learns_and_writes_everything(data_dir, tmp_path):
  """300 steps of a small model on the smoke data: the logged loss falls and the validation mIoU beats predicting
  background everywhere (computed here from the labels); checkpoints, event files, config and panels written."""
  config = smoke_config(data_dir, **{"train.num_steps": 300, "train.log_every_steps": 50,
                                     "train.eval_every_steps": 300, "train.checkpoint_every_steps": 100,
                                     "optim.warmup_steps": 10,
                                     "model.backbone.block_widths": (8, 16, 32, 32, 32),
                                     "model.backbone.fc_width": 32})
  assert jax.device_count() == NUM_TEST_DEVICES
  result = loop.train_and_evaluate(config, str(tmp_path))
  loss = logged_scalars(tmp_path, "loss")
  assert sorted(loss) == [50, 100, 150, 200, 250, 300]
  assert loss[300] < 0.9 * loss[50], loss
  background = np.zeros((5, 5))
  for batch in input_pipeline.create_datasets(config).eval_batches("validation"):
    counted = batch["mask"] & (batch["label"] != 255)
    for c in range(5):
      background[c, 0] += np.sum(counted & (batch["label"] == c))
  tp, union = np.diag(background), background.sum(0) + background.sum(1) - np.diag(background)
  background_miou = np.mean(tp[union > 0] / union[union > 0])
  assert result["miou"] > background_miou + 0.01, (result["miou"], background_miou)
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps[-1] == config.train.num_steps
  assert json.load(open(tmp_path / "config.json"))["model"]["fusion"]["name"] == "attention"
  panels = logged_images(tmp_path, "validation/example_000")  # config.eval.num_examples=1: one per evaluation
  assert sorted(panels) == [300] and len(panels[300]) == 1
  with Image.open(tmp_path / "examples" / "example_000_panel.png") as saved:  # the same model, image and drawing
    np.testing.assert_array_equal(panels[300][0], np.asarray(saved.convert("RGB")))


def test_restart_resumes_exactly(data_dir, tmp_path, caplog):
  """3 steps, then a second invocation that resumes from their checkpoint and runs steps 3..5 (learning rates of the
  warm-up, none 0): exactly the parameters of 6 uninterrupted steps. The resumed steps moved every parameter tensor,
  and the second invocation did resume (a run from scratch would end with the same parameters)."""
  config = smoke_config(data_dir, **{"train.eval_every_steps": 100, "eval.num_examples": 0})
  straight = tmp_path / "straight"
  loop.train_and_evaluate(config, str(straight))
  interrupted = tmp_path / "interrupted"
  first_half = smoke_config(data_dir, **{"train.num_steps": 3, "eval.num_examples": 0})
  loop.train_and_evaluate(first_half, str(interrupted))
  caplog.set_level("INFO", logger="absl")
  loop.train_and_evaluate(config, str(interrupted))
  assert f"Resumed from step 3 in {interrupted / 'checkpoints'}" in caplog.text
  a, b = _final_params(straight, config), _final_params(interrupted, config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  schedule = build_experiment(config).schedule
  assert min(float(schedule(step)) for step in range(3, 6)) > 0
  at_3 = jax.tree.leaves(checkpointing.restore_params(str(interrupted), config.train,
                                                      build_experiment(config).abstract_state, step=3)[0])
  assert all(np.max(np.abs(x - y)) > 1e-3 * np.max(np.abs(x)) for x, y in zip(jax.tree.leaves(a), at_3, strict=True))


def test_sigterm_checkpoints_then_raises_preempted(data_dir, tmp_path, monkeypatch):
  """SIGTERM during step 2: a checkpoint at step 2, then `Preempted` (never a normal return); a rerun finishes."""
  config = smoke_config(data_dir, **{"train.eval_every_steps": 100, "train.checkpoint_every_steps": 100,
                                     "eval.num_examples": 0})
  jit_train_step = train_step.jit_train_step

  def sigterm_during_step_2(exp):
    train_fn = jit_train_step(exp)

    def step(state, batch, rng):
      if int(state.step) == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      return train_fn(state, batch, rng)
    return step

  monkeypatch.setattr(train_step, "jit_train_step", sigterm_during_step_2)
  with pytest.raises(loop.Preempted) as stopped:
    loop.train_and_evaluate(config, str(tmp_path))
  assert stopped.value.step == 2
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2]
  monkeypatch.undo()
  assert 0.0 <= loop.train_and_evaluate(config, str(tmp_path))["miou"] <= 1.0


def test_init_from_loads_the_backbone_and_a_resume_wins_over_it(data_dir, tmp_path):
  """A converted backbone file (here: random arrays shaped like the smoke backbone, fc8 left out, as the converter
  leaves it) replaces those layers of a fresh run's parameters; fc8 and the attention head keep their
  initialisation; a workdir with a checkpoint resumes from it and ignores the file."""
  from scaleattn import convert  # noqa: PLC0415
  config = smoke_config(data_dir)
  exp = build_experiment(config)
  fresh = jax.device_get(exp.init_state(jax.random.key(config.seed)).params)
  rng = np.random.default_rng(0)
  pretrained = {layer: {k: rng.normal(size=v.shape).astype(np.float32) for k, v in leaves.items()}
                for layer, leaves in fresh["backbone"].items() if layer != "fc8"}
  path = str(tmp_path / "backbone.npz")
  convert.save_pretrained(path, pretrained)
  config.init_from = path
  exp = build_experiment(config)
  ckpts = checkpointing.Checkpoints(str(tmp_path / "run" / "checkpoints"), config.train)
  params = jax.device_get(loop.start_state(exp, ckpts).params)
  for layer, leaves in pretrained.items():
    for k, v in leaves.items():
      np.testing.assert_array_equal(params["backbone"][layer][k], v)
  for a, b in zip(jax.tree.leaves((params["backbone"]["fc8"], params["fusion"])),
                  jax.tree.leaves((fresh["backbone"]["fc8"], fresh["fusion"])), strict=True):
    np.testing.assert_array_equal(a, b)
  state = loop.start_state(exp, ckpts).replace(step=jax.numpy.asarray(5, jax.numpy.int32))
  ckpts.save(5, state, force=True)
  ckpts.wait_until_finished()
  config.init_from = str(tmp_path / "missing.npz")  # never read: the checkpoint wins
  resumed = loop.start_state(build_experiment(config), ckpts)
  ckpts.close()
  assert int(resumed.step) == 5


def test_fusion_override_changes_parameter_tree(data_dir):
  trees = {}
  for fusion in ("attention", "max", "average"):
    trees[fusion] = build_experiment(smoke_config(data_dir, **{"model.fusion.name": fusion})).abstract_state.params
  assert "fusion" in trees["attention"] and "fusion" not in trees["max"]
  assert jax.tree.structure(trees["max"]) == jax.tree.structure(trees["average"])


def test_trained_on_two_scales_evaluated_on_an_unseen_set(data_dir, tmp_path):
  """A hierarchical-attention run trained on (1, 0.5) evaluates on (1.5, 1, 0.75, 0.5) from its checkpoint: one
  weight statistic per inference scale, and the weights of every size bin sum to one."""
  from scaleattn.evaluation import segmentation
  config = smoke_config(data_dir, **{"model.fusion.name": "hierarchical", "train.num_steps": 4,
                                     "train.eval_every_steps": 4, "train.checkpoint_every_steps": 4,
                                     "eval.num_examples": 0})
  loop.train_and_evaluate(config, str(tmp_path))
  config.eval.scales = (1.5, 1.0, 0.75, 0.5)
  result = segmentation.evaluate(config, str(tmp_path))["validation"]
  names = ("scale_1.5", "scale_1", "scale_0.75", "scale_0.5")
  for size in ("size_0-16", "size_16-32", "size_32-64", "size_64+"):
    if result[f"pixels/{size}"]:
      total = sum(result[f"attention/{size}/{name}"] for name in names)
      assert abs(total - 1.0) < 1e-4, (size, total)
  assert 0.0 <= result["miou"] <= 1.0


@pytest.mark.parametrize("fusion", ["attention", "max", "average"])
def test_predict_writes_files(data_dir, tmp_path, fusion):
  from PIL import Image

  from scaleattn.inference import predict
  config = smoke_config(data_dir, **{"model.fusion.name": fusion})
  params = jax.device_get(build_experiment(config).init_state(jax.random.key(0)).params)
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
  assert np.asarray(Image.open(tmp_path / "out" / "b_seg.png")).shape == (120, 90)  # tiled, never shrunk


def test_tiled_evaluation_equals_whole_image_evaluation(data_dir):
  """The validation split evaluated whole and tiled (overlap covering the receptive field): the same statistics."""
  from scaleattn.data import input_pipeline
  from scaleattn.inference import tiling
  config = smoke_config(data_dir, **{"input.eval_size": 161})  # several 129-pixel tiles per side at scale 1
  exp = build_experiment(config)
  params = exp.init_state(jax.random.key(5)).params
  data = input_pipeline.create_datasets(config, data_devices=exp.mesh.size)
  batch = sharding.global_batch(exp.mesh, next(iter(data.eval_batches("validation"))))
  whole = jax.device_get(segmentation.jit_eval_step(exp)(params, batch))
  config.eval.tile_size = 129
  config.eval.tile_overlap = tiling.exact_overlap(build_experiment(config).eval_model)
  assert len(tiling.plan_axis(161, 129, config.eval.tile_overlap, 8, resize.output_size).starts) > 1
  tiled = jax.device_get(segmentation.jit_eval_step(build_experiment(config))(params, batch))
  assert set(tiled) == set(whole)
  assert np.count_nonzero(whole["confusion"].sum(0)) > 1  # more than one class predicted: tiles could disagree
  np.testing.assert_array_equal(tiled["confusion"], whole["confusion"])
  np.testing.assert_allclose(tiled["weight_sum"], whole["weight_sum"], rtol=1e-4)


def test_eval_step_size_statistics_against_numpy(data_dir):
  """Per size bin: fusion weights and correct pixels of the fused and per-scale predictions, recomputed in NumPy
  from the model's raw outputs (align-corners upsampling, argmax, binning by hand); padding and 255 not counted."""
  import numpy_reference as ref
  config = smoke_config(data_dir)
  config.eval.size_bins = (8, 24)
  exp = build_experiment(config)
  params = exp.init_state(jax.random.key(3)).params
  rng = np.random.default_rng(0)
  b, size, c = 4, config.input.eval_size, config.model.num_classes
  batch = {"image": rng.normal(0, 60, (b, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, c, (b, size, size)).astype(np.int32),
           "mask": np.ones((b, size, size), bool),
           "instance_size": rng.choice([0.0, 5.0, 8.0, 20.0, 40.0], (b, size, size)).astype(np.float32)}
  batch["mask"][:, -7:] = False
  batch["label"][:, :3] = 255
  stats = jax.device_get(segmentation.jit_eval_step(exp)(params, sharding.global_batch(exp.mesh, batch)))
  out = exp.model.apply({"params": params}, batch["image"], train=False)
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


def test_flip_evaluation_is_the_mirror_average_of_the_scores(data_dir):
  """With eval.flip the prediction is the argmax of (scores(x) + mirror(scores(mirror(x)))) / 2, upsampled; here the
  two passes come from the model itself and the average, upsampling, argmax and confusion matrix from NumPy."""
  import numpy_reference as ref  # noqa: PLC0415
  config = smoke_config(data_dir, **{"eval.flip": True})
  exp = build_experiment(config)
  rng = np.random.default_rng(1)
  b, size, c = 4, config.input.eval_size, config.model.num_classes
  params = ref.random_variables(exp.model, np.zeros((1, size, size, 3), np.float32), train=False)["params"]
  batch = {"image": rng.normal(0, 60, (b, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, c, (b, size, size)).astype(np.int32), "mask": np.ones((b, size, size), bool)}
  batch["mask"][:, :, -9:] = False
  stats = jax.device_get(segmentation.jit_eval_step(exp)(params, sharding.global_batch(exp.mesh, batch)))
  plain = exp.model.apply({"params": params}, batch["image"], train=False).fused
  mirrored = exp.model.apply({"params": params}, batch["image"][:, :, ::-1], train=False).fused
  average = (np.asarray(plain, np.float64) + np.asarray(mirrored, np.float64)[:, :, ::-1]) / 2
  pred = ref.bilinear(average, (size, size)).argmax(-1)
  want = np.zeros((c, c), np.int64)
  np.add.at(want, (batch["label"][batch["mask"]], pred[batch["mask"]]), 1)
  assert np.abs(stats["confusion"] - want).sum() <= 0.002 * batch["mask"].sum()  # argmax ties flip by rounding
  unflipped = np.zeros((c, c), np.int64)
  plain_pred = ref.bilinear(np.asarray(plain, np.float64), (size, size)).argmax(-1)
  np.add.at(unflipped, (batch["label"][batch["mask"]], plain_pred[batch["mask"]]), 1)
  assert np.abs(unflipped - want).sum() > 0.05 * batch["mask"].sum()  # flipping changes the predictions


def test_crf_in_evaluation_refines_the_upsampled_fused_scores(data_dir):
  """With eval.crf.enabled the eval step's prediction is the argmax of the CRF's marginals on the upsampled fused
  scores and the image with the mean added back, padding excluded; the CRF itself is tested against a NumPy
  mean-field in test_crf.py."""
  import numpy_reference as ref  # noqa: PLC0415

  from scaleattn import crf  # noqa: PLC0415
  config = smoke_config(data_dir, **{"eval.crf.enabled": True, "eval.crf.bilateral_xy_std": 20.0,
                                     "eval.crf.bilateral_rgb_std": 30.0})  # a small grid: a fast test
  exp = build_experiment(config)
  size, c = config.input.eval_size, config.model.num_classes
  params = ref.random_variables(exp.model, np.zeros((1, size, size, 3), np.float32), train=False)["params"]
  rng = np.random.default_rng(2)
  batch = {"image": rng.normal(0, 60, (4, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, c, (4, size, size)).astype(np.int32), "mask": np.ones((4, size, size), bool)}
  batch["mask"][:, -20:] = False
  stats = jax.device_get(segmentation.jit_eval_step(exp)(params, sharding.global_batch(exp.mesh, batch)))
  fused = exp.model.apply({"params": params}, batch["image"], train=False).fused
  scores = ref.bilinear(np.asarray(fused, np.float64), (size, size)).astype(np.float32)
  rgb = batch["image"] + np.asarray(config.input.mean_rgb, np.float32)
  settings = {k: v for k, v in config.eval.crf.items() if k != "enabled"}
  pred = np.asarray(crf.dense_crf(scores, rgb, batch["mask"], **settings)).argmax(-1)
  want = np.zeros((c, c), np.int64)
  np.add.at(want, (batch["label"][batch["mask"]], pred[batch["mask"]]), 1)
  assert np.abs(stats["confusion"] - want).sum() <= 0.002 * batch["mask"].sum()
  plain = np.zeros((c, c), np.int64)
  np.add.at(plain, (batch["label"][batch["mask"]], scores.argmax(-1)[batch["mask"]]), 1)
  assert np.abs(plain - want).sum() > 0.01 * batch["mask"].sum()  # the CRF changed the labelling
