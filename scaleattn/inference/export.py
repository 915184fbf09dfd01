"""A trained model as one file for inference, in either of two forms:

  python -m scaleattn.export --workdir=W --out=model.msgpack            # latest checkpoint (or --step=N)
  python -m scaleattn.main --exported=model.msgpack --workdir=W2 --mode=predict --inputs=img.jpg

  python -m scaleattn.export --workdir=W --out=model.npz --platforms=cpu,cuda,tpu
  python -m scaleattn.predict --exported=model.npz --inputs=img.jpg,folder/ --out_dir=D

The first (msgpack) holds the parameters and the resolved config, without optimizer state: this package's code
runs it, under any eval settings. The second (`--platforms`) is a serving artefact (`scaleattn.inference.serving`): the whole
inference of the evaluation path as StableHLO with the parameters, run with jax alone. Before writing it, the
program is deserialised and run here on generated images against the evaluation path (`inference`, jitted); a
difference in scores above --parity_tolerance stops the export with `ParityError` and nothing is written.

Parameter file format: flax msgpack (`flax.serialization.msgpack_serialize`) of a dict
  {'format': 'scaleattn.export', 'version': 2, 'config_json': the ConfigDict as JSON, 'params': the MultiScaleNet
   parameter tree of float32 arrays ({'backbone': ..., 'fusion': ...}), or, for a model with non-parameter state
   (a backbone's BatchNorm statistics), all its variables ({'params': ..., 'batch_stats': ...})}.
The config is stored as `scaleattn.config.serialization` writes it. Version 1 files (and workdirs' config.json from
before `config.model` had backbone and fusion sub-configs) are read too: `serialization.upgrade_config` moves their
model fields into today's layout; the parameter tree is the same.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import serialization, traverse_util
from jax.sharding import AbstractMesh, AxisType

from scaleattn import checkpointing, inference, models, sharding
from scaleattn import data as datasets
from scaleattn.config.serialization import config_from_json, config_to_json
from scaleattn.experiment import Experiment, build_experiment
from scaleattn.inference import serving

FORMAT, VERSION = "scaleattn.export", 2  # 2: config.model with backbone and fusion sub-configs
READABLE_VERSIONS = (1, 2)
SERVING_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def check_params(params: Any, model_config: ml_collections.ConfigDict, source: str) -> None:
  """Raises ValueError unless `params` has exactly the names and shapes `build_model(model_config)` creates (its
  parameters; or all its variables, when `params` holds variables: a model with non-parameter state)."""
  model = models.build_model(model_config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False))
  abstract = abstract if "params" in params or len(abstract) > 1 else abstract["params"]  # state needs variables
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  problems = [f"{k}: missing (config expects {s})" for k, s in want.items() if k not in got]
  problems += [f"{k}: not a parameter of the configured model" for k in got if k not in want]
  problems += [f"{k}: config expects {want[k]}, got {s}" for k, s in got.items() if k in want and want[k] != s]
  if problems:
    raise ValueError(f"{source}: parameters do not match config.model:\n  " + "\n  ".join(sorted(problems)))


def export_model(path: str, params: Any, config: ml_collections.ConfigDict) -> None:
  """Writes `params` (checked against `config.model`) and `config` to `path` (temporary name, then renamed)."""
  params = jax.device_get(params)
  check_params(params, config.model, f"export to {path}")
  payload = {"format": FORMAT, "version": VERSION, "config_json": config_to_json(config),
             "params": jax.tree.map(np.asarray, params)}
  path_ = epath.Path(path)
  path_.parent.mkdir(parents=True, exist_ok=True)
  tmp = path_.parent / (path_.name + ".tmp")
  tmp.write_bytes(serialization.msgpack_serialize(payload))
  tmp.replace(path_)


def load_exported(path: str) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
  """(params as NumPy arrays, config) from a file written by `export_model`."""
  path_ = epath.Path(path)
  if not path_.exists():
    raise FileNotFoundError(f"exported model {path}: no such file")
  try:
    payload = serialization.msgpack_restore(path_.read_bytes())
  except Exception as e:  # noqa: BLE001 - msgpack raises several types for a file that is not msgpack.
    raise ValueError(f"{path}: not an exported scaleattn model ({type(e).__name__}: {e})") from e
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    raise ValueError(f"{path}: not an exported scaleattn model (no format tag {FORMAT!r})")
  if payload.get("version") not in READABLE_VERSIONS:
    raise ValueError(f"{path}: export format version {payload.get('version')}, this code reads {READABLE_VERSIONS}")
  return payload["params"], config_from_json(payload["config_json"])


class ParityError(ValueError):
  """The exported program's scores differ from the evaluation path's beyond the tolerance; nothing was written."""


def serving_function(exp: Experiment) -> Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]:
  """The evaluation path's whole inference as one function of (params, images, valid) (`scaleattn.inference.serving`
  describes the arrays): every inference scale, the fusion, the flip if config.eval.flip, the upsampling to the
  input's size, and the CRF on the labels if config.eval.crf.enabled."""
  def serve(params: Any, images: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    out = inference.predict_scores(params, images, exp=exp, flip=exp.config.eval.flip)
    return {"scores": inference.to_input_size(out.fused, images),
            "labels": inference.predict_labels(out.fused, images, valid, exp=exp),
            "weights": inference.to_input_size(out.weights, images)}
  return serve


def _serving_experiment(config: ml_collections.ConfigDict, platforms: tuple[str, ...]) -> Experiment:
  """The model as the program runs it: one device; convolutions for the targets (config.model.conv_impl='auto'
  gives XLA's as soon as a GPU or TPU is among them: the CPU kernels are for CPUs only)."""
  if config.model.conv_impl == "cpu" and platforms != ("cpu",):
    raise ValueError(f"config.model.conv_impl='cpu' cannot be exported for --platforms={','.join(platforms)}: the "
                     "CPU kernels are for CPU-only programs; expected 'auto' or 'xla'")
  target = next((p for p in platforms if p != "cpu"), "cpu")
  mesh = AbstractMesh((1,), (sharding.DATA_AXIS,), axis_types=(AxisType.Auto,))
  return build_experiment(config, mesh, platform=target)


def _parity_images(size: int, count: int, seed: int = 0) -> list[np.ndarray]:
  """uint8 noise images, the first of the full size, the others smaller (so padding is exercised)."""
  rng = np.random.default_rng(seed)
  shapes = [(size, size)] + [tuple(rng.integers(size // 2, size + 1, 2)) for _ in range(count - 1)]
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _reference(params: Any, config: ml_collections.ConfigDict, images: np.ndarray, valid: np.ndarray
               ) -> dict[str, np.ndarray]:
  """The evaluation path on this machine (its own kernels, one device), jitted as evaluation and prediction are."""
  exp = build_experiment(config, sharding.make_mesh(ml_collections.ConfigDict({"data": 1})))
  return jax.device_get(jax.jit(serving_function(exp))(params, images, valid))


def check_parity(model: serving.ServingModel, params: Any, config: ml_collections.ConfigDict, *, tolerance: float,
                 num_images: int = 3) -> dict[str, Any]:
  """Runs the program and the evaluation path on generated images prepared as serving prepares them; returns the
  differences, or raises ParityError when the scores differ by more than `tolerance`."""
  images, valid = model.prepare(_parity_images(config.input.eval_size, num_images))
  got, want = model(images, valid), _reference(params, config, images, valid)
  result = {"images": f"{num_images} generated (uint8 noise, seed 0), {images.shape[1]}x{images.shape[2]} padded",
            "tolerance": tolerance,
            "max_abs_diff_scores": float(np.max(np.abs(got["scores"] - want["scores"]))),
            "max_abs_diff_weights": float(np.max(np.abs(got["weights"] - want["weights"]))),
            "max_abs_scores": float(np.max(np.abs(want["scores"]))),
            "label_agreement": float(np.mean(got["labels"][valid] == want["labels"][valid]))}
  logging.info("Parity of the exported program with the evaluation path: %s", result)
  if not result["max_abs_diff_scores"] <= tolerance:
    raise ParityError(f"the exported program's scores differ from the evaluation path's by up to "
                      f"{result['max_abs_diff_scores']:.3g} (scores up to {result['max_abs_scores']:.3g}) on "
                      f"{num_images} images, more than --parity_tolerance={tolerance:g}; nothing was written")
  return result


def export_serving(path: str, params: Any, config: ml_collections.ConfigDict, platforms: Sequence[str], *,
                   tolerance: float = 1e-3, source: dict[str, Any] | None = None) -> dict[str, Any]:
  """Lowers `serving_function` for `platforms` with a symbolic batch size and images of config.input.eval_size,
  checks the deserialised program against the evaluation path (`check_parity`), then writes the artefact with
  `params`. Returns a summary (also stored in the artefact's info, with `source`)."""
  start = time.perf_counter()
  platforms = tuple(platforms)
  here = jax.export.default_export_platform()
  if not platforms or set(platforms) - set(SERVING_PLATFORMS) or here not in platforms:
    raise ValueError(f"--platforms={','.join(platforms)}: expected some of {', '.join(SERVING_PLATFORMS)}, "
                     f"including {here} (the parity check runs the program on this machine)")
  params = jax.device_get(params)
  check_params(params, config.model, f"export to {path}")
  exp = _serving_experiment(config, platforms)
  size = config.input.eval_size
  b, = jax.export.symbolic_shape("b")
  program = jax.export.export(jax.jit(serving_function(exp)), platforms=platforms)(
      jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params),
      jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32), jax.ShapeDtypeStruct((b, size, size), jnp.bool_))
  blob = bytes(program.serialize())
  try:
    names = list(datasets.class_names(config.dataset))
  except KeyError:
    names = None
  info = {"image_size": [size, size], "mean_rgb": list(config.input.mean_rgb), "scales": list(exp.eval_scales),
          "num_classes": config.model.num_classes, "class_names": names, "flip": bool(config.eval.flip),
          "crf": bool(config.eval.crf.enabled), "platforms": list(platforms), "source": source or {},
          "config_json": config_to_json(config)}
  model = serving.ServingModel(jax.export.deserialize(bytearray(blob)), jax.device_put(jax.tree.leaves(params)),
                               info)
  info["parity"] = check_parity(model, params, config, tolerance=tolerance)
  size_bytes = serving.save(path, blob, params, info)
  summary = {"out": path, "bytes": size_bytes, "program_bytes": len(blob),
             **{k: info[k] for k in ("platforms", "image_size", "scales", "flip", "crf", "parity", "source")},
             "export_s": round(time.perf_counter() - start, 2)}
  logging.info("Wrote the serving artefact %s: %s", path, summary)
  return summary


def restore_workdir(workdir: str, step: int | None = None) -> tuple[Any, ml_collections.ConfigDict, int]:
  """(params, config, step) of a training run's checkpoint (latest, or `step`) and config.json."""
  config_path = epath.Path(workdir) / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path}: no such file; is {workdir} a training workdir?")
  config = config_from_json(config_path.read_text())
  params, restored_step = checkpointing.restore_params(workdir, config.train, build_experiment(config).abstract_state,
                                                       step)
  return params, config, restored_step


def export_workdir(workdir: str, out: str, step: int | None = None) -> int:
  """Exports a training run's checkpoint (latest, or `step`) with the run's config.json; returns the step."""
  params, config, restored_step = restore_workdir(workdir, step)
  export_model(out, params, config)
  return restored_step


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m scaleattn.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="training workdir (its config.json and checkpoints/)")
  parser.add_argument("--out", required=True, help="the exported file, e.g. model.msgpack")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--platforms", default="", help="write a serving artefact lowered for these platforms, e.g. "
                      "cpu,cuda,tpu (this machine's among them); without it, the parameter file")
  parser.add_argument("--image_size", type=int, default=None,
                      help="serving: the largest image side the artefact takes (default: config.input.eval_size)")
  parser.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                      help="serving: apply the dense CRF to the labels (default: config.eval.crf.enabled)")
  parser.add_argument("--parity_tolerance", type=float, default=1e-3,
                      help="serving: the largest |score difference| from the evaluation path accepted")
  args = parser.parse_args(argv)
  if not args.platforms:
    step = export_workdir(args.workdir, args.out, args.step)
    print(f"Exported step {step} of {args.workdir} to {args.out}")
    return
  params, config, step = restore_workdir(args.workdir, args.step)
  if args.image_size is not None:
    config.input.eval_size = args.image_size
  if args.crf is not None:
    config.eval.crf.enabled = args.crf
  summary = export_serving(args.out, params, config, args.platforms.split(","), tolerance=args.parity_tolerance,
                           source={"workdir": args.workdir, "step": step})
  print(json.dumps(summary, indent=1))
