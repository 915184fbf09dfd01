"""Command line: `python -m scaleattn.main --config=configs/shapes.py --workdir=/tmp/run [--mode=train|eval|predict]`.

Flags and start-up only; the work is done by importable functions (`loop.train_and_evaluate` and friends).
A config, data or checkpoint problem prints its message alone and exits with status 2; `--verbosity=1` (or
SCALEATTN_TRACEBACK=1) shows the traceback too. The terminal shows the project's own lines and every warning;
`--verbosity=1` shows the libraries' INFO lines as well (`scaleattn.terminal`).
"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow serves only datasets and event files,
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # so its oneDNN kernels and their start-up notice are not needed.

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from scaleattn import terminal
from scaleattn.perf import host_memory
from scaleattn.perf.environment import environment
from scaleattn.training import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/shapes.py or configs/shapes.py:smoke.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, the resolved config and outputs.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "What to run.")
flags.DEFINE_list("inputs", [], "predict: image files or folders.")
flags.DEFINE_string("output_dir", "", "predict: where to write the outputs (default WORKDIR/predictions).")
flags.DEFINE_string("exported", "", "eval/predict: a model written by `python -m scaleattn.export` (parameters and "
                    "config) instead of a checkpoint; --config is then not needed.")
flags.DEFINE_string("coordinator_address", "", "Multi-process runs: host:port of process 0.")
flags.DEFINE_integer("num_processes", 0, "Multi-process runs: number of processes.")
flags.DEFINE_integer("process_id", -1, "Multi-process runs: this process's index.")
flags.DEFINE_string("compilation_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/scaleattn/xla")),
                    "Persistent XLA compilation cache: a rerun or a resumed run loads its compiled steps from here "
                    "instead of compiling them again ('' turns it off).")
host_memory.define_flag()
flags.DEFINE_string("results", "", "Also write what the run returned (final metrics), its wall time and where it ran "
                    "to this JSON file, e.g. a record under launch/results/.")
flags.mark_flags_as_required(["workdir"])

USER_ERROR_EXIT = 2


def run(mode: str) -> object:
  from scaleattn.evaluation import segmentation
  from scaleattn.inference import predict
  from scaleattn.training import loop  # noqa: PLC0415 - after the runtime is initialised.
  config, params = FLAGS.config, None
  if FLAGS.exported:
    from scaleattn.inference import export  # noqa: PLC0415
    params, config = export.load_exported(FLAGS.exported)
  if config is None:
    raise app.UsageError("--config is required unless --exported gives a model with its config.")
  if mode == "train":
    try:
      return loop.train_and_evaluate(config, FLAGS.workdir)
    except loop.Preempted as e:  # a clean exit: the scheduler restarts the job, which resumes
      logging.warning("%s", e)
      return None
  if mode == "eval":
    return segmentation.evaluate(config, FLAGS.workdir, params=params)
  out_dir = FLAGS.output_dir or os.path.join(FLAGS.workdir, "predictions")
  return predict.predict_files(config, FLAGS.workdir, FLAGS.inputs, out_dir, params=params)


def _user_errors() -> tuple[type[Exception], ...]:
  """Errors whose message says all a person needs: a bad config, bad data, a missing file, a diverged run, a full
  disk."""
  from scaleattn import checkpointing, data  # noqa: PLC0415 - after the runtime is initialised
  from scaleattn.config import validation  # noqa: PLC0415
  from scaleattn.training import loop  # noqa: PLC0415
  return (validation.ConfigError, data.DataError, FileNotFoundError, loop.NonFiniteError,
          checkpointing.CheckpointWriteError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  terminal.show_project_lines(FLAGS.verbosity)
  host_memory.retain_on_cpu(FLAGS.retain_host_memory)
  import tensorflow as tf  # noqa: PLC0415 - keep TensorFlow off accelerators that JAX owns.
  tf.config.set_visible_devices([], "GPU")
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.config.distributed if FLAGS.config else None)
  if FLAGS.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
  start = time.perf_counter()
  try:
    result = run(FLAGS.mode)
  except _user_errors() as e:
    if FLAGS.verbosity >= 1 or os.environ.get("SCALEATTN_TRACEBACK") == "1":
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)
  logging.info("Done in %.0f s%s.", time.perf_counter() - start, _summary(result))
  if FLAGS.results and jax.process_index() == 0:
    write_results(FLAGS.results, result, time.perf_counter() - start)


def _summary(result: object) -> str:
  """The headline of what a mode returned: mIoU per split, or how many files prediction wrote."""
  if not isinstance(result, dict):
    return ""
  splits = {k: v for k, v in result.items() if isinstance(v, dict) and "miou" in v} or {"": result}
  parts = [f"{split + ' ' if split else ''}mIoU {v['miou']:.4f}" for split, v in splits.items() if "miou" in v]
  if "written" in result:
    parts.append(f"{len(result['written'])} files written, {len(result['failed'])} images failed")
  return ": " + ", ".join(parts) if parts else ""


def write_results(path: str, result: object, wall_s: float) -> None:
  record = {"command": " ".join(["python -m scaleattn.main", *sys.argv[1:]]), "wall_s": wall_s, **environment(),
            "result": result}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=1, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))


if __name__ == "__main__":
  app.run(main)
