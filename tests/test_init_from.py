"""`--mode=predict` and `--mode=eval` run the weights of config.init_from when the workdir has no checkpoint, so a
released model is evaluated in one command; a recipe that expects pretrained weights warns when it has none."""
import jax
import numpy as np
import pytest
from absl import logging
from PIL import Image

from configs import shapes, voc
from scaleattn import checkpointing
from scaleattn.experiment import build_experiment, initial_state
from scaleattn.inference import predict
from scaleattn.weights import tree


def _moved(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, 0.05, np.shape(a)).astype(np.float32), params)


def test_predict_without_a_checkpoint_runs_the_init_from_weights(tmp_path):
  config = shapes.get_config("smoke")
  exp = build_experiment(config)
  saved = _moved(jax.device_get(exp.init_state(jax.random.key(0)).params), seed=1)
  path = str(tmp_path / "released.npz")
  tree.save(path, saved)
  config.init_from = path
  image = np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / "image.png")
  empty = tmp_path / "workdir"
  with pytest.raises(FileNotFoundError):  # without init_from there is nothing to run
    checkpointing.restore_weights(build_experiment(shapes.get_config("smoke")), str(empty))
  out = predict.predict_files(config, str(empty), [str(tmp_path / "image.png")], str(tmp_path / "out"))
  assert out["written"] and not out["failed"]
  written = np.asarray(Image.open(tmp_path / "out" / "image_seg.png"))
  want, _ = predict.Predictor(build_experiment(config), saved).image(image)
  np.testing.assert_array_equal(written, want)
  fresh, _ = predict.Predictor(exp, jax.device_get(exp.init_state(jax.random.key(0)).params)).image(image)
  assert (fresh != want).any()  # the saved weights, not the initialisation, made the labels


def test_training_from_scratch_warns_where_the_recipe_expects_pretrained_weights(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  config = voc.get_config()
  config.init_from = ""
  config.model.backbone.update(block_widths=(4, 4, 4, 4, 4), fc_width=8)
  config.model.fusion.hidden = 4
  config.input.crop_size = 33
  config.train.batch_size = 4
  initial_state(build_experiment(config))
  assert any("training from scratch" in w and "ImageNet" in w for w in warnings), warnings
  warnings.clear()
  quiet = shapes.get_config("smoke")
  initial_state(build_experiment(quiet))
  assert not any("from scratch" in w for w in warnings)
