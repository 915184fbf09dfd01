"""The command line shows a config problem as its message alone (exit status 2); --verbosity=1 adds the
traceback."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*flags):
  return subprocess.run([sys.executable, "-m", "scaleattn.main", "--config=configs/shapes.py:smoke", "--workdir=unused",
                         "--config.model.remat=all", "--config.train.microbatches=3", "--config.eval.scales=(1.5, 1.0)",
                         *flags], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)


def test_config_error_is_a_message_without_traceback():
  out = _main()
  assert out.returncode == 2, out.stderr[-2000:]
  assert "error: Invalid config:" in out.stderr and "Traceback" not in out.stderr
  assert "config.model.remat='all': expected one of ('none', 'per_scale', 'per_block')" in out.stderr
  assert "config.train.microbatches=3: expected a divisor of config.train.batch_size=4, one of (1, 2, 4)" in out.stderr
  assert ("config.eval.scales=(1.5, 1.0): a model trained on config.model.scales=(1.0, 0.5) with fusion 'attention' "
          "runs only on those scales; fusions that run on another set: ('shared_attention', 'hierarchical', "
          "'average', 'max')") in out.stderr
  verbose = _main("--verbosity=1")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "ConfigError" in verbose.stderr


def test_predict_fails_when_no_input_could_be_read(tmp_path):
  """--mode=predict on inputs none of which is an image: status 2 and a message naming them, nothing written (a run
  that produced nothing never exits 0)."""
  import jax  # noqa: PLC0415

  from configs import shapes  # noqa: PLC0415
  from scaleattn.experiment import build_experiment  # noqa: PLC0415
  from scaleattn.inference import export  # noqa: PLC0415
  config = shapes.get_config("smoke")
  model = str(tmp_path / "model.msgpack")
  export.export_model(model, build_experiment(config).init_state(jax.random.key(0)).params, config)
  images = tmp_path / "images"
  images.mkdir()
  (images / "a.png").write_bytes(b"not an image")
  (images / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  out_dir = tmp_path / "out"
  out = subprocess.run([sys.executable, "-m", "scaleattn.main", "--mode=predict", f"--exported={model}",
                        f"--workdir={tmp_path / 'run'}", f"--inputs={images}", f"--output_dir={out_dir}"],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "error: no input image could be read (2 tried)" in out.stderr and "Traceback" not in out.stderr
  assert f"{images / 'a.png'}: UnidentifiedImageError" in out.stderr and str(images / "b.jpg") in out.stderr
  assert not out_dir.exists() or not os.listdir(out_dir)
