"""The launchers parse, the Colab notebook installs a wheel built from this checkout and runs top to bottom on CPU
with smoke = True, and the ablation grid runs, resumes and reports on the smoke data."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import nbformat
import numpy_reference as ref
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm_gpu.sbatch"])
def test_shell_scripts_parse(script):
  path = os.path.join(LAUNCH, script)
  subprocess.run(["bash", "-n", path], check=True)
  if shutil.which("shellcheck"):
    subprocess.run(["shellcheck", "-S", "warning", path], check=True)


def test_tpu_vm_ships_this_checkout_unless_a_repo_is_given(tmp_path):
  """With a stand-in gcloud that records its calls: without REPO the workers get this checkout's HEAD (git archive,
  copied to every worker), with REPO they clone it; every worker installs and runs the same command."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "gcloud.log"
  for tool in ("gcloud", "gsutil"):
    (bin_dir / tool).write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "{tool} $*" >> {log}\n')
    (bin_dir / tool).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", ZONE="zone-a", LOCAL_RESULTS=str(tmp_path / "out"))
  run = [os.path.join(LAUNCH, "tpu_vm.sh"), "configs/voc.py", "gs://bucket/run"]
  subprocess.run(run, env=env, check=True, capture_output=True, cwd=tmp_path)
  calls = log.read_text()
  assert "scp --worker=all" in calls and "scaleattn_src.tar.gz" in calls and "git clone" not in calls
  assert "tar xzf scaleattn_src.tar.gz" in calls and "--accelerator-type=v4-8" not in calls  # describe succeeded
  assert "python -m scaleattn.main --config=configs/voc.py --workdir=gs://bucket/run" in calls
  assert "gsutil -m cp -r gs://bucket/run" in calls
  log.unlink()
  subprocess.run(run, env=dict(env, REPO="https://example.org/me/scaleattn.git"), check=True, capture_output=True,
                 cwd=tmp_path)
  calls = log.read_text()
  assert "git clone https://example.org/me/scaleattn.git scaleattn_src" in calls and "scp --worker=all" not in calls
  relative = subprocess.run([*run[:2], "runs/voc"], env=env, capture_output=True, text=True, cwd=tmp_path)
  assert relative.returncode == 2 and "expected a gs:// or absolute path" in relative.stderr


def _install_cell(nb) -> str:
  (cell,) = [c for c in nb.cells if c.cell_type == "code" and "pip', 'install" in c.source]
  return cell.source


def test_colab_install_cell_says_what_to_set_when_nothing_is_installed(monkeypatch):
  nb = nbformat.read(os.path.join(LAUNCH, "colab_tpu.ipynb"), as_version=4)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(RuntimeError, match="set `package` in the parameters cell to a pip spec"):
    exec(_install_cell(nb), {"package": ""})  # noqa: S102 - the notebook's own cell


def test_colab_notebook_installs_a_wheel_and_runs(tmp_path, monkeypatch):
  """The install cell pip-installs a wheel built from this checkout (into a target folder, leaving this environment
  alone); the rest runs on CPU with smoke = True."""
  wheels = tmp_path / "wheels"
  isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(wheels), REPO],
                 check=True, capture_output=True, cwd=tmp_path)
  (wheel,) = wheels.glob("scaleattn-*.whl")
  target = tmp_path / "site"
  monkeypatch.setenv("PIP_TARGET", str(target))
  monkeypatch.setenv("PIP_NO_DEPS", "1")
  nb = nbformat.read(os.path.join(LAUNCH, "colab_tpu.ipynb"), as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and "smoke = False" in params[0].source and "package = ''" in params[0].source
  # papermill's convention: a cell after the parameters cell overrides them.
  index = nb.cells.index(params[0])
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
      f"smoke = True\nworkdir = {str(tmp_path / 'run')!r}\npackage = {str(wheel)!r}\n"
      f"config_overrides = {{'dataset.data_dir': {str(tmp_path / 'tfds')!r}}}"))
  env_cell = nbformat.v4.new_code_cell(
      "import os\nos.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'\n"
      "os.environ['CUDA_VISIBLE_DEVICES'] = ''")
  nb.cells.insert(0, env_cell)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert "miou" in outputs and "(2, 32, 32, 3) (2, 32, 32, 2)" in outputs
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for c in nb.cells for o in c.get("outputs", []))
  assert (target / "scaleattn" / "models" / "fusion.py").is_file() and (target / "configs" / "shapes.py").is_file()


def test_ablation_grid_runs_resumes_and_reports(tmp_path):
  """Two cells of the reduced grid on the smoke data: results, tables and figures written; a second invocation
  reuses the finished runs instead of training again."""
  command = [sys.executable, os.path.join(LAUNCH, "ablation.py"), "--config=configs/shapes.py:smoke",
             f"--config.dataset.data_dir={tmp_path / 'tfds'}", "--reduced", "--cells=baseline,s2-attention-esupv",
             "--workers=1", f"--workdir={tmp_path / 'runs'}", f"--results={tmp_path / 'results'}", "--examples=2"]
  env = dict(os.environ, PYTHONPATH=REPO)
  subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
  result_file = tmp_path / "runs" / "s2-attention-esupv" / "seed_0" / "result.json"
  first = result_file.stat().st_mtime_ns
  summary = json.loads((tmp_path / "results" / "ablation.json").read_text())
  assert set(summary["cells"]) == {"baseline", "s2-attention-esupv"}
  cell = summary["cells"]["s2-attention-esupv"]
  assert cell["seeds"] == 1 and 0.0 <= cell["test_miou_mean"] <= 1.0 and cell["test_miou_std"] == 0.0
  assert abs(sum(cell["by_size"][f"attention/background/scale_{s}"] for s in ("1", "0.5")) - 1.0) < 1e-4
  table = (tmp_path / "results" / "ablation.md").read_text()
  assert "| s2-attention-esupv | 1-0.5 | attention | yes |" in table and "55.85" in table  # beside the paper's
  for figure in ("attention_vs_size.png", "attention_examples.png"):
    assert (tmp_path / "results" / figure).stat().st_size > 10_000
  subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
  assert result_file.stat().st_mtime_ns == first


def test_pipeline_throughput_measures_grain_and_tfdata_on_the_same_records(tmp_path):
  """Both pipelines deliver batches; the TFRecord copy tf.data reads holds every record of the array_record data."""
  out = tmp_path / "throughput.json"
  subprocess.run([sys.executable, os.path.join(LAUNCH, "pipeline_throughput.py"), "--config=configs/shapes.py:smoke",
                  f"--config.dataset.data_dir={tmp_path / 'tfds'}", f"--tfrecord_dir={tmp_path / 'tfrecord'}",
                  "--batches=3", "--warmup=1", f"--out={out}"],
                 cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), check=True, capture_output=True)
  rates = json.loads(out.read_text())["images_per_s"]
  assert set(rates) == {"grain", "grain_workers", "tfdata"} and min(rates.values()) > 0
  import tensorflow as tf  # noqa: PLC0415
  copied = sorted((tmp_path / "tfrecord").rglob("*train.tfrecord-*"))
  assert len(copied) == 1 and sum(1 for _ in tf.data.TFRecordDataset(str(copied[0]))) == 32  # smoke: 32 train


def test_conv_layers_reads_the_backbone_off_the_model_and_times_every_pass(tmp_path):
  """The layer table read off the model is DeepLab-LargeFOV's on a 321 crop (written out by hand from the
  architecture), and a smoke run records every pass of every layer with totals that add up."""
  env = dict(os.environ, PYTHONPATH=REPO)
  listing = subprocess.run(
      [sys.executable, "-c", "import json; from configs import voc; from launch import conv_layers; "
       "print(json.dumps([[*k, n] for k, n in conv_layers.backbone_layers(voc.get_config()).items()]))"],
      cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
  assert {tuple(row[:-1]): row[-1] for row in json.loads(listing)} == ref.vgg16_largefov_layers(321)
  out = tmp_path / "layers.json"
  subprocess.run([sys.executable, os.path.join(LAUNCH, "conv_layers.py"), "--config=configs/shapes.py:smoke",
                  "--frameworks=jax", "--repeats=2", f"--out={out}"], cwd=REPO, env=env, check=True,
                 capture_output=True)
  record = json.loads(out.read_text())
  passes = ("forward", "input_grad", "weight_grad")
  for row in record["layers"]:
    timed = [p for p in passes if f"jax_{p}_ms" in row]
    assert timed == (["forward", "weight_grad"] if row["cin"] == 3 else list(passes)), row
    assert all(row[f"jax_{p}_ms"] > 0 for p in timed)
  totals = record["seconds_per_scale1_pass"]["jax"]
  for p in passes:
    expected = sum(row["count"] * row.get(f"jax_{p}_ms", 0.0) for row in record["layers"]) / 1e3
    assert totals[p] == pytest.approx(expected, abs=1e-4)


def test_scale_sets_summary_pairs_seeds_and_marks_sets_a_method_cannot_run():
  """launch/scale_sets.py's table from hand-made results: mIoU mean and std over seeds, the change from the training
  set paired by seed, '-' where the paper's attention cannot run, GFLOPs growing with the scales."""
  code = """
import json
from configs import shapes
from launch import scale_sets
sets = {"1-0.5": (1.0, 0.5), "1.5-1-0.5": (1.5, 1.0, 0.5)}
size = {"pixels/size_0-16": 10.0, "attention/size_0-16/scale_1": 0.5, "accuracy/size_0-16/fused": 0.3}
runs = {("attention", 0): {"1-0.5": {"miou": 0.60, **size}}, ("attention", 1): {"1-0.5": {"miou": 0.62, **size}},
        ("hierarchical", 0): {"1-0.5": {"miou": 0.60, **size}, "1.5-1-0.5": {"miou": 0.63, **size}},
        ("hierarchical", 1): {"1-0.5": {"miou": 0.64, **size}, "1.5-1-0.5": {"miou": 0.65, **size}}}
configs = {m: scale_sets.run_config(shapes.get_config("smoke"), m, (1.0, 0.5), 0) for m in ("attention", "hierarchical")}
summary = scale_sets.aggregate(runs, configs, sets, "1-0.5")
info = dict(train_scales="1-0.5", train_key="1-0.5", eval_sets=list(sets), steps=6, seeds=2, machine="m", commit="c",
            wall_minutes=1.0, workers=1)
print(json.dumps({"summary": summary, "table": scale_sets.markdown(summary, info),
                  "evaluable": [scale_sets.evaluable("attention", "1-0.5", "1.5-1-0.5"),
                                scale_sets.evaluable("hierarchical", "1-0.5", "1.5-1-0.5")]}))
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                       check=True, capture_output=True, text=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  h = result["summary"]["hierarchical"]["1.5-1-0.5"]
  assert abs(h["test_miou_mean"] - 0.64) < 1e-9 and abs(h["test_miou_std"] - 0.0141421356) < 1e-6
  assert abs(h["change_from_training_set_mean"] - 0.02) < 1e-9  # (0.03 + 0.01) / 2
  assert abs(h["change_from_training_set_std"] - 0.0141421356) < 1e-6
  assert "1.5-1-0.5" not in result["summary"]["attention"] and result["evaluable"] == [False, True]
  assert h["gflops_per_image"] > result["summary"]["hierarchical"]["1-0.5"]["gflops_per_image"] > 0
  assert "| attention | 61.0 ± 1.4 | - |" in result["table"]
  assert "| hierarchical | 62.0 ± 2.8 | 64.0 ± 1.4 (+2.0 ± 1.4) |" in result["table"]
