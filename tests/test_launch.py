"""The launchers parse, and the Colab notebook runs top to bottom on CPU with smoke = True."""
import os
import shutil
import subprocess

import nbformat
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


def test_colab_notebook_smoke(tmp_path):
  nb = nbformat.read(os.path.join(LAUNCH, "colab_tpu.ipynb"), as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and "smoke = False" in params[0].source
  # papermill's convention: a cell after the parameters cell overrides them.
  index = nb.cells.index(params[0])
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
      f"smoke = True\nworkdir = {str(tmp_path / 'run')!r}\n"
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
