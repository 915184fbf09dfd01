"""Exported models: the file gives back the same parameters, config and predictions; wrong inputs are named."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes
from scaleattn import checkpointing
from scaleattn.config import defaults as base
from scaleattn.config import serialization as config_json
from scaleattn.data.preprocessing import CAFFE_MEAN_RGB
from scaleattn.experiment import build_experiment
from scaleattn.inference import export
from scaleattn.models import build_model
from scaleattn.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_like(abstract, seed=0):
  """Random arrays shaped like `abstract` (cheaper than compiling an initialiser)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)


def smoke_model():
  config = shapes.get_config("smoke")
  model = build_model(config.model)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False))
  return config, model, random_like(abstract["params"])


@functools.partial(jax.jit, static_argnums=0)  # equal modules share one compilation
def predict(model, params, images):
  return model.apply({"params": params}, images, train=False)


def test_export_then_load_gives_identical_predictions(tmp_path):
  config, model, params = smoke_model()
  path = str(tmp_path / "model.msgpack")
  export.export_model(path, params, config)
  loaded_params, loaded_config = export.load_exported(path)

  assert loaded_config.to_json(sort_keys=True) == config.to_json(sort_keys=True)
  assert loaded_config.model.scales == (1.0, 0.5) and loaded_config.input.mean_rgb == CAFFE_MEAN_RGB
  assert jax.tree.structure(loaded_params) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded_params), jax.tree.leaves(params), strict=True):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)

  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 33, 41, 3)).astype(np.float32) * 50)
  before = predict(model, params, images)
  after = predict(build_model(loaded_config.model), loaded_params, images)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_tuples_survive_json():
  config = base.get_config()
  loaded = config_json.config_from_json(config_json.config_to_json(config))
  assert loaded.optim.lr_multipliers == base.PAPER_LR_MULTIPLIERS
  assert loaded.model.backbone.block_widths == (64, 128, 256, 512, 512) and loaded.dataset.data_dir is None


def test_export_rejects_params_of_another_model(tmp_path):
  config, _, params = smoke_model()
  config.model.backbone.fc_width = 32
  path = tmp_path / "model.msgpack"
  with pytest.raises(ValueError, match="model.msgpack: parameters do not match config.model") as e:
    export.export_model(str(path), params, config)
  k = config.model.backbone.fc6_kernel
  assert f"backbone/fc6/kernel: config expects ({k}, {k}, 8, 32), got ({k}, {k}, 8, 16)" in str(e.value)
  assert not path.exists()


def test_load_rejects_other_files(tmp_path):
  path = tmp_path / "vgg16_largefov.npz"
  np.savez(path, x=np.zeros(3))
  with pytest.raises(ValueError, match="vgg16_largefov.npz: not an exported scaleattn model"):
    export.load_exported(str(path))
  with pytest.raises(FileNotFoundError, match="missing.msgpack"):
    export.load_exported(str(tmp_path / "missing.msgpack"))


def test_version_1_files_are_read_into_todays_config_layout(tmp_path):
  """A version-1 file: the config as runs wrote it before the model had backbone and fusion sub-configs (the Table-1
  grid's config as recorded then, kept in tests/fixtures/config_v1.json), with that model's parameters."""
  import json  # noqa: PLC0415

  from flax import serialization  # noqa: PLC0415
  old = json.load(open(os.path.join(REPO, "tests", "fixtures", "config_v1.json")))
  assert old["model"]["fusion"] == "attention" and "block_widths" in old["model"]
  config = config_json.upgrade_config(json.loads(json.dumps(old)))
  params = random_like(jax.eval_shape(lambda: build_model(config_json.config_from_json(json.dumps(config)).model).init(
      jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False))["params"])
  path = tmp_path / "v1.msgpack"
  path.write_bytes(serialization.msgpack_serialize(
      {"format": export.FORMAT, "version": 1, "config_json": json.dumps(old), "params": params}))
  loaded_params, loaded = export.load_exported(str(path))
  assert loaded.model.backbone.block_widths == (16, 32, 64, 64, 64) and loaded.model.backbone.fc_width == 128
  assert (loaded.model.fusion.name, loaded.model.fusion.hidden, loaded.model.fusion.dropout_rate) == ("attention", 64,
                                                                                                        0.1)
  assert loaded.train.microbatches == 1 and "ignore_label" not in loaded.loss and not loaded.eval.crf.enabled
  export.check_params(loaded_params, loaded.model, "v1.msgpack")  # the parameter tree did not change
  build_experiment(loaded)  # and the upgraded config validates


def test_export_a_training_workdir(tmp_path):
  config = shapes.get_config("smoke")
  workdir = str(tmp_path / "run")
  trained = random_like(build_experiment(config).abstract_state, seed=1).replace(step=np.asarray(3, np.int32))
  ckpts = checkpointing.Checkpoints(f"{workdir}/checkpoints", config.train)
  ckpts.save(3, trained, force=True)
  ckpts.wait_until_finished()
  ckpts.close()
  loop.write_config(config, workdir)  # what every training run writes

  out = str(tmp_path / "model.msgpack")
  assert export.export_workdir(workdir, out) == 3
  params, loaded_config = export.load_exported(out)
  assert loaded_config.to_json(sort_keys=True) == config.to_json(sort_keys=True)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(trained.params)), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match="config.json"):
    export.export_workdir(str(tmp_path / "elsewhere"), out)
