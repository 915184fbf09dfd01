"""The serving artefact on the smoke model: written from a training workdir for cpu, cuda and tpu, it runs here for
any batch size and gives the evaluation path's outputs (upsampled in NumPy here); a disagreeing program is never
written; `python -m scaleattn.predict --exported` writes the pictures and fails when nothing could be predicted;
the loader runs with the package out of reach."""
import functools
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import shapes
from scaleattn import checkpointing, inference, visualize
from scaleattn.data.preprocessing import CAFFE_MEAN_RGB
from scaleattn.experiment import build_experiment
from scaleattn.inference import export, exported, serving
from scaleattn.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 81  # the smoke config's eval_size


def trained_like(abstract, seed=0):
  """Random parameters at the scale of trained ones (He-normal kernels, small biases): scores of order 1."""
  rng = np.random.default_rng(seed)
  def draw(s):
    std = np.sqrt(2 / np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
    return (std * rng.standard_normal(s.shape)).astype(s.dtype)
  return jax.tree.map(draw, abstract)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A smoke training workdir (checkpoint at step 3 and config.json) and its parameters."""
  config = shapes.get_config("smoke")
  workdir = str(tmp_path_factory.mktemp("run"))
  state = trained_like(build_experiment(config).abstract_state).replace(step=np.asarray(3, np.int32))
  ckpts = checkpointing.Checkpoints(f"{workdir}/checkpoints", config.train)
  ckpts.save(3, state, force=True)
  ckpts.wait_until_finished()
  ckpts.close()
  loop.write_config(config, workdir)
  return workdir, config, jax.device_get(state.params)


@pytest.fixture(scope="module")
def artefact(run, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("export") / "model.npz")
  export.main(["--workdir", run[0], "--out", path, "--platforms=cpu,cuda,tpu"])
  return path


def images_of(shapes_hw, seed=1):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes_hw]


def reference(config, params, images):
  """Per image, the evaluation path's outputs on the output grid for the image padded with the mean, upsampled in
  NumPy (align-corners bilinear) and cropped: scores [h, w, C], weights [h, w, S]."""
  padded = np.zeros((len(images), SIZE, SIZE, 3), np.float32)
  for i, image in enumerate(images):
    padded[i, :image.shape[0], :image.shape[1]] = image - np.asarray(CAFFE_MEAN_RGB, np.float32)
  predict = functools.partial(inference.predict_scores, exp=build_experiment(config), flip=False)
  out = jax.device_get(jax.jit(predict)(params, padded))
  return [(visualize.resize_weights(fused, (SIZE, SIZE))[:h, :w], visualize.resize_weights(weights, (SIZE, SIZE))[:h, :w])
          for fused, weights, (h, w, _) in zip(out.fused, out.weights, (i.shape for i in images), strict=True)]


def test_artefact_runs_any_batch_size_and_matches_the_evaluation_path(run, artefact):
  _, config, params = run
  model = serving.load(artefact)
  assert model.platforms == ("cpu", "cuda", "tpu") and model.image_size == (SIZE, SIZE)
  assert model.scales == (1.0, 0.5) and model.class_names[1] == "disk"
  assert str(model.program.in_avals[-2].shape) == f"(b, {SIZE}, {SIZE}, 3)"  # batch symbolic, H and W fixed
  # Portable: no custom call but the shape checks of the symbolic batch.
  assert set(re.findall(r"custom_call @(\w+)", model.program.mlir_module())) <= {"shape_assertion"}
  assert model.info["source"]["step"] == 3
  parity = model.info["parity"]
  assert parity["max_abs_diff_scores"] <= 1e-4 < 1 <= parity["max_abs_scores"], parity
  assert parity["label_agreement"] == 1.0

  images = images_of([(SIZE, SIZE), (40, 57), (81, 23)])
  one = model(*model.prepare(images[1:2]))
  batch, valid = model.prepare(images)
  assert valid.sum() == SIZE * SIZE + 40 * 57 + 81 * 23 and not batch[1, 40:].any() and not batch[2, :, 23:].any()
  three = model(batch, valid)
  assert three["scores"].shape == (3, SIZE, SIZE, 5) and three["labels"].dtype == np.int32
  np.testing.assert_allclose(one["scores"][0], three["scores"][1], atol=1e-5)
  for i, (image, (scores, weights)) in enumerate(zip(images, reference(config, params, images), strict=True)):
    h, w = image.shape[:2]
    np.testing.assert_allclose(three["scores"][i, :h, :w], scores, atol=1e-4)
    np.testing.assert_allclose(three["weights"][i, :h, :w], weights, atol=1e-5)
    np.testing.assert_allclose(three["weights"][i].sum(-1), 1, atol=1e-5)
    ties = np.sort(scores, -1)[..., -1] - np.sort(scores, -1)[..., -2] < 1e-4
    np.testing.assert_array_equal(three["labels"][i, :h, :w][~ties], scores.argmax(-1)[~ties])


def test_a_disagreeing_program_is_not_written(run, tmp_path, monkeypatch):
  _, config, params = run
  real = export._reference

  def shifted(*args):
    out = real(*args)
    return {**out, "scores": out["scores"] + 0.01}
  monkeypatch.setattr(export, "_reference", shifted)
  path = tmp_path / "model.npz"
  with pytest.raises(export.ParityError, match=r"differ from the evaluation path's by up to 0\.01 .* more than "
                                               r"--parity_tolerance=0\.001; nothing was written"):
    export.export_serving(str(path), params, config, ["cpu"])
  assert not os.listdir(tmp_path)
  summary = export.export_serving(str(path), params, config, ["cpu"], tolerance=0.02)
  assert 0.0099 < summary["parity"]["max_abs_diff_scores"] < 0.0101 and path.exists()


def test_export_names_unusable_targets(run, tmp_path):
  _, config, params = run
  with pytest.raises(ValueError, match="--platforms=cuda,tpu: .* including cpu"):
    export.export_serving(str(tmp_path / "m.npz"), params, config, ["cuda", "tpu"])
  with pytest.raises(ValueError, match="--platforms=cpu,gpu: expected some of cpu, cuda, rocm, tpu"):
    export.export_serving(str(tmp_path / "m.npz"), params, config, ["cpu", "gpu"])
  config = shapes.get_config("smoke")
  config.model.conv_impl = "cpu"
  with pytest.raises(ValueError, match="conv_impl='cpu' cannot be exported for --platforms=cpu,cuda"):
    export.export_serving(str(tmp_path / "m.npz"), params, config, ["cpu", "cuda"])
  assert not os.listdir(tmp_path)


def test_load_names_what_is_wrong(run, tmp_path):
  msgpack = tmp_path / "model.msgpack"
  export.export_model(str(msgpack), run[2], run[1])
  with pytest.raises(ValueError, match="model.msgpack: not a scaleattn serving artefact"):
    serving.load(str(msgpack))
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    serving.load(str(tmp_path / "missing.npz"))


def test_predict_exported_writes_pictures_and_fails_when_nothing_was_predicted(run, artefact, tmp_path, capsys):
  _, config, params = run
  image, too_large = images_of([(50, 60), (SIZE + 1, 30)])
  folder = tmp_path / "in"
  folder.mkdir()
  Image.fromarray(image).save(folder / "a.png")
  Image.fromarray(too_large).save(folder / "large.png")
  (folder / "broken.jpg").write_bytes(b"not an image")
  out = tmp_path / "out"
  assert exported.main([f"--exported={artefact}", f"--inputs={folder}", f"--out_dir={out}"]) == 0
  assert sorted(os.listdir(out)) == ["a_panel.png", "a_seg.png", "a_seg_color.png", "a_weights_s0.5.png",
                                     "a_weights_s1.png"]
  [(scores, _)] = reference(config, params, [image])
  label = np.asarray(Image.open(out / "a_seg.png"))
  ties = np.sort(scores, -1)[..., -1] - np.sort(scores, -1)[..., -2] < 1e-4
  np.testing.assert_array_equal(label[~ties], scores.argmax(-1)[~ties])
  assert "Wrote 5 files to" in capsys.readouterr().out

  status = exported.main([f"--exported={artefact}", f"--inputs={folder / 'broken.jpg'},{folder / 'large.png'}",
                                  f"--out_dir={tmp_path / 'none'}"])
  err = capsys.readouterr().err
  assert status == 1 and "no image gave an output" in err
  assert f"image 0 is {SIZE + 1}x30 pixels (HxW); this artefact handles images up to {SIZE}x{SIZE}" in err
  assert "broken.jpg: UnidentifiedImageError" in err and not (tmp_path / "none").exists()


def test_the_loader_runs_without_the_package(artefact, tmp_path):
  """serving.py loaded from its file in a fresh process where importing `scaleattn` fails: the artefact runs."""
  image = images_of([(33, 47)])[0]
  np.save(tmp_path / "image.npy", image)
  script = (
      "import importlib.util, sys\n"
      "sys.modules['scaleattn'] = None  # any import of the package now raises ImportError\n"
      f"spec = importlib.util.spec_from_file_location('serving', {os.path.join(REPO, 'scaleattn', 'inference', 'serving.py')!r})\n"
      "serving = sys.modules['serving'] = importlib.util.module_from_spec(spec)\n"
      "spec.loader.exec_module(serving)\n"
      "import numpy as np\n"
      f"out = serving.load({artefact!r}).predict(np.load({str(tmp_path / 'image.npy')!r}))\n"
      f"np.save({str(tmp_path / 'labels.npy')!r}, out['labels'])\n")
  subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
  np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), serving.load(artefact).predict(image)["labels"])
