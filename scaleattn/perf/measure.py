"""Speed and memory record: `python -m scaleattn.benchmark --config=configs/voc.py --steps=10 --out=bench.json`.

For each scale set x precision x scale-execution path it times the jitted train step on a random batch (median
of `--steps` steps after the compiling one; compile time apart), images/s, achieved GFLOP/s from XLA's cost
analysis against the same machine's dense matmul peak measured in the same run (float32, and bfloat16 for bf16
cases), model FLOP/s (`scaleattn.perf.flops`: the network's dense convolutions, however the backend runs them) and
model FLOP utilisation against the data-sheet dense bf16 peak where the device is known, and peak memory (one
device's, or XLA's buffer assignment on CPU); then the eval step on whole `eval_size` images. Rates are the whole
step's over all the mesh's `devices`; peaks are one device's.
With `--profile_dir` it also traces each case with `jax.profiler` (open the trace in Perfetto or TensorBoard) and
records where the step's time goes: milliseconds per step by kind of XLA operation.
"""
from __future__ import annotations

import collections
import functools
import glob
import gzip
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.sharding import Mesh
from ml_collections import config_flags

from scaleattn import sharding
from scaleattn.config import validation
from scaleattn.data import input_pipeline
from scaleattn.data.preprocessing import IGNORE_LABEL
from scaleattn.evaluation import segmentation
from scaleattn.experiment import build_experiment
from scaleattn.inference import forward, tiling
from scaleattn.inference.memory import memory_analysis
from scaleattn.models import resize
from scaleattn.perf import flops, host_memory
from scaleattn.perf.environment import environment
from scaleattn.training import train_step

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/voc.py", "Model config to time.", lock_config=False)
flags.DEFINE_integer("steps", 10, "Timed steps per case (after one compiling step).")
flags.DEFINE_integer("batch_size", 1, "Global train batch size.")
flags.DEFINE_integer("eval_batch_size", 1, "Global eval batch size (0: skip the eval cases).")
flags.DEFINE_list("scale_execution", ["loop", "vmap"], "Scale-execution paths to time.")
flags.DEFINE_list("precision", ["float32"], "Compute dtypes to time (float32, bfloat16).")
flags.DEFINE_list("scales", [], "Scale sets to time, e.g. '1' and '1-0.75-0.5' (default: the config's).")
flags.DEFINE_string("out", "", "JSON file to write.")
flags.DEFINE_string("profile_dir", "", "If set, trace --profile_steps steps of each case into a subdirectory of "
                    "this one and record the time per kind of XLA operation.")
flags.DEFINE_integer("profile_steps", 3, "Steps traced per case with --profile_dir.")
flags.DEFINE_list("microbatches", ["1"], "Gradient-accumulation slices of the train batch to time.")
flags.DEFINE_list("remat", ["none"], "Rematerialisation settings of the backbone to time (config.model.remat).")
flags.DEFINE_bool("memory_only", False, "Compile the train step of each case and record XLA's memory analysis "
                  "only (no timing).")
flags.DEFINE_string("tpu_topology", "", "With --memory_only: compile for this TPU topology (e.g. 'v5e:2x2'; "
                    "--config.mesh.data=1 takes one of its chips) on this host, without a TPU (JAX's deviceless "
                    "compilation; needs libtpu installed).")
flags.DEFINE_list("inference_sizes", [], "Instead of train and eval steps, time prediction (the config's scales, "
                  "fusion and flip; batch 1) on images of these sizes, e.g. '513x513,1024x2048'.")
flags.DEFINE_list("tile_sizes", ["0", "513"], "With --inference_sizes: whole images (0) and these tile sizes "
                  "(config.eval.tile_overlap apart).")
flags.DEFINE_integer("tiles_per_step", None, "With --tile_sizes: tiles per backbone call (default: "
                     "config.eval.tiles_per_step).")
flags.DEFINE_list("memory_budgets_gb", [], "With --inference_sizes: for each budget and size, the tile and tiles "
                  "per step config.eval.memory_budget_gb would choose (compiled, not run).")
flags.DEFINE_bool("time_budgets", False, "With --memory_budgets_gb: also time each budget's choice, alternating "
                  "with the other cases of the size (in one process).")
flags.DEFINE_enum("case_processes", "auto", ["auto", "one", "each"], "Run all cases in this process ('one': peak "
                  "memory is XLA's buffer assignment of each case's program) or each in a fresh one ('each': the "
                  "device's own peak, which JAX cannot reset, is then the case's); 'auto': 'each' unless JAX runs "
                  "on the CPU or --memory_only.")
flags.DEFINE_integer("case_index", -1, "Run only the case with this index, in the order 'one' runs them (what "
                     "--case_processes=each gives each of its processes).")
flags.DEFINE_list("matmul_peaks", [], "precision=GFLOP/s measured by an earlier process of the same record "
                  "(--case_processes=each measures them once).")
host_memory.define_flag()


class CaseSelector:
  """Counts the cases in the order they come; `take()` says whether to run the current one (all, or the one at
  --case_index)."""

  def __init__(self, index: int):
    self.index, self.seen = index, 0

  def take(self) -> bool:
    self.seen += 1
    return self.index < 0 or self.seen - 1 == self.index

  @property
  def alone(self) -> bool:
    """Whether this process runs a single case: the device's peak since the start is then the case's own."""
    return self.index >= 0


def device_memory_stats() -> dict:
  """The first device's allocator statistics (empty on CPU)."""
  return jax.devices()[0].memory_stats() or {}


def own_device_peak(alone: bool) -> int | None:
  """The device's peak bytes since the process started where it keeps one and the case ran `alone` in its process
  (the peak is then the case's own), else None."""
  peak = device_memory_stats().get("peak_bytes_in_use")
  return int(peak) if alone and peak is not None else None


# Dense (no sparsity) bf16 peak TFLOP/s of one JAX device, from the vendors' data sheets: (substring of the
# lower-cased device_kind, peak), first match wins. Other devices and other precisions get no MFU.
DATASHEET_BF16_TFLOPS = (("h100 pcie", 756.5), ("h100 nvl", 835.5), ("h100", 989.4), ("h200 nvl", 835.5),
                         ("h200", 989.4), ("a100", 312.0), ("tpu v4", 275.0), ("tpu v5 lite", 197.0),
                         ("tpu v5e", 197.0), ("tpu v5", 459.0), ("tpu v6", 918.0))


def datasheet_peak_gflops(device_kind: str, precision: str) -> float | None:
  """The data-sheet dense peak of `device_kind` in `precision`, or None where the table has none."""
  if precision != "bfloat16":
    return None
  kind = device_kind.lower()
  return next((1e3 * tflops for key, tflops in DATASHEET_BF16_TFLOPS if key in kind), None)


def call_times(fn: Callable[[], object], calls: int, warmup: int = 1) -> list[float]:
  """Seconds taken by each of `calls` blocking calls of `fn`, after `warmup` untimed ones."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def matmul_peak_gflops(dtype: str = "float32", n: int | None = None, repeats: int = 5) -> float:
  """Measured dense matmul throughput of the default device: the denominator of the efficiency. n defaults to 2048
  on CPU and 8192 on accelerators, where a 2048 matmul (tens of microseconds) is too short to time against the
  dispatch overhead."""
  n = n or (2048 if jax.default_backend() == "cpu" else 8192)
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / min(call_times(lambda: f(a).block_until_ready(), repeats)) / 1e9


def _random_batch(config: ml_collections.ConfigDict, shape: tuple[int, ...], size: int, mask: bool
                  ) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(0, 50, (*shape, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, config.model.num_classes, (*shape, size, size)).astype(np.int32)}
  if mask:
    batch["mask"] = np.ones((*shape, size, size), bool)
  return batch


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


class Runner(NamedTuple):
  """A compiled step ready to time: `run` does one blocking call; the step is split over `devices` devices."""
  run: Callable[[], None]
  compiled: Any
  compile_s: float
  devices: int


def train_runner(config: ml_collections.ConfigDict, compile_only: bool = False, mesh: Mesh | None = None,
                 platform: str | None = None) -> Runner:
  """`run` does one blocking train step of `config` on a fixed random batch (laid out in microbatches and padded
  as the input pipeline does), carrying the state from step to step. With `compile_only` the step is compiled from
  abstract inputs and never run, possibly for another `platform` over a `mesh` of devices this host lacks."""
  exp = build_experiment(config, mesh, platform)
  layout = input_pipeline.batch_layout(config.train.batch_size, config.train.microbatches, exp.mesh.size, 1)
  train_fn = train_step.jit_train_step(exp)
  t = time.perf_counter()
  if compile_only:
    size = config.input.crop_size
    batch = {"image": jax.ShapeDtypeStruct((layout.microbatches, layout.rows, size, size, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((layout.microbatches, layout.rows, size, size), jnp.int32)}
    key = jax.eval_shape(lambda: jax.random.key(1))
    compiled = train_fn.trace(exp.abstract_state, batch, key).lower().compile()
    return Runner(lambda: None, compiled, time.perf_counter() - t, exp.mesh.size)
  batch = _random_batch(config, (layout.microbatches, layout.rows), config.input.crop_size, mask=False)
  batch["label"][:, layout.real_per_microbatch:] = IGNORE_LABEL
  key = jax.random.key(1)
  batch = sharding.global_batch(exp.mesh, batch, batch_axis=1)
  state = [exp.init_state(jax.random.key(0))]
  compiled = train_fn.lower(state[0], batch, key).compile()
  compile_s = time.perf_counter() - t

  def run() -> None:
    state[0], metrics = compiled(state[0], batch, key)
    jax.block_until_ready((state[0], metrics))

  return Runner(run, compiled, compile_s, exp.mesh.size)


def eval_runner(config: ml_collections.ConfigDict, batch_size: int) -> Runner:
  """The eval step on whole images padded to config.input.eval_size."""
  exp = build_experiment(config)
  batch = sharding.global_batch(exp.mesh, _random_batch(config, (batch_size,), config.input.eval_size, mask=True))
  params = exp.init_state(jax.random.key(0)).weights
  eval_fn = segmentation.jit_eval_step(exp)
  t = time.perf_counter()
  compiled = eval_fn.lower(params, batch).compile()
  compile_s = time.perf_counter() - t
  return Runner(lambda: jax.block_until_ready(compiled(params, batch)), compiled, compile_s, exp.mesh.size)


class Prediction(NamedTuple):
  """A prediction case ready to time: XLA's bytes for each of its compiled programs, the host bytes the tiled pass
  holds between them (0 for whole images), and the tiled forward (None for whole images)."""
  runner: Runner
  program_bytes: dict[str, int]
  host_bytes: int
  tiled: Any


def inference_runner(config: ml_collections.ConfigDict, height: int, width: int, tile: int,
                     tiles_per_step: int | None = None) -> Prediction:
  """Prediction of one random height x width image, whole at its own size (tile 0: `forward.full_resolution`) or
  in `tile`-pixel tiles as `forward.plan` sets them up, `tiles_per_step` per call (default config.eval's)."""
  config = config.copy_and_resolve_references()
  config.eval.tile_size, config.eval.memory_budget_gb = tile, 0.0
  config.eval.tiles_per_step = tiles_per_step or config.eval.tiles_per_step
  exp = build_experiment(config)
  params = exp.init_state(jax.random.key(0)).weights
  image = np.random.default_rng(0).normal(0, 50, (1, height, width, 3)).astype(np.float32)
  valid = np.ones((1, height, width), bool)
  t = time.perf_counter()
  if not tile:
    compiled = forward.full_resolution.lower(params, image, valid, exp=exp).compile()
    runner = Runner(lambda: jax.block_until_ready(compiled(params, image, valid)), compiled, time.perf_counter() - t, 1)
    runner.run()  # as the tiled pass's compiling call: the timed calls find the buffers allocated once
    return Prediction(runner, {"whole": memory_analysis(compiled)["total_bytes"]}, 0, None)
  plan = forward.plan(exp, params, rows=1, size=max(height, width))
  tiled = plan.tiled

  def run() -> None:
    out = plan.scores(params, image, exp=exp)
    tiled.upsample(out.fused, out.weights, height, width)

  run()  # compiles the three steps
  return Prediction(Runner(run, tiled.tile_step, time.perf_counter() - t, 1),
                    tiled.program_bytes(params, 1, height, width), tiled.host_bytes(params, 1, height, width), tiled)


def scale_pixels(model: Any, height: int, width: int) -> int:
  """The pixels of every scale's input for one height x width image."""
  return sum(math.prod(resize.scaled_size(n, s) for n in (height, width)) for s in model.scales)


def computed_pixels(model: Any, height: int, width: int, tiled: Any) -> int:
  """Input pixels the backbone runs on for one image: every scale's input (on the scale-1 canvas with the vmapped
  scale execution), or every tile the tiled pass runs, dummy tiles padding the last group included."""
  if tiled is None:
    vmapped = model.scale_execution == "vmap"
    return len(model.scales) * height * width if vmapped else scale_pixels(model, height, width)
  count, per_step = tiling.tile_count(model, tiled.tile, tiled.overlap, height, width), tiled.tiles_per_step
  return -(-count // per_step) * per_step * tiled.tile ** 2


def inference_cases(base: ml_collections.ConfigDict, peak: float | None, selector: CaseSelector) -> list[dict]:
  """Whole against tiled prediction per image size: images/s (median of --steps calls; the cases of a size that
  share this process alternate call by call, so that a loaded machine slows them alike; the ratio to the whole
  image's is taken afterwards, `add_ratios_to_whole`), the input
  pixels each computes (per image pixel: the overlap's and padding's overhead; per second: the efficiency), and
  XLA's bytes of each compiled program (the largest is recorded as the peak: the programs run one after another,
  and what the tiled pass keeps between them is in host memory, recorded beside); the device's own peak where it
  keeps one and the case ran alone in its process; the tile and tiles per step each budget chooses (timed with
  --time_budgets: one case with the budget's)."""
  cases = []
  model = build_experiment(base).eval_model
  for size in FLAGS.inference_sizes:
    height, width = (int(n) for n in size.split("x"))
    runs = {}
    for tile in map(int, FLAGS.tile_sizes):
      if selector.take():
        runs[f"predict-{size}-" + (f"tile{tile}" if tile else "whole")] = inference_runner(
            base, height, width, tile, FLAGS.tiles_per_step)
    for budget in map(float, FLAGS.memory_budgets_gb):
      if not selector.take():
        continue
      config = base.copy_and_resolve_references()
      config.eval.memory_budget_gb = budget
      exp = build_experiment(config)
      try:
        chosen_plan = forward.plan(exp, exp.abstract_state.weights, rows=1, size=max(height, width))
        tiled = chosen_plan.tiled
        chosen = {"tile_size": tiled.tile if tiled else 0, "tiles_per_step": tiled.tiles_per_step if tiled else None,
                  "measured_bytes": chosen_plan.measured}
      except validation.ConfigError as e:
        chosen = {"tile_size": None, "error": str(e)}
      case = {"name": f"budget-{size}-{budget:g}GB", "kind": "memory_budget", "image_size": [height, width],
              "memory_budget_gb": budget, **chosen}
      print(json.dumps(case), flush=True)
      cases.append(case)
      if FLAGS.time_budgets and chosen["tile_size"]:  # the choice, without choosing again
        config.eval.memory_budget_gb, config.eval.tile_overlap = 0.0, tiled.overlap
        runs[f"predict-{size}-budget{budget:g}GB"] = inference_runner(config, height, width, tiled.tile,
                                                                      tiled.tiles_per_step)
    times = {name: [] for name in runs}
    for _ in range(FLAGS.steps):
      for name, run in runs.items():
        times[name] += call_times(run.runner.run, 1, warmup=0)
    image_pixels = scale_pixels(model, height, width)
    timed = []
    for name, run in runs.items():
      median, tiled = float(np.median(times[name])), run.tiled
      pixels = computed_pixels(model, height, width, tiled)
      timed.append({
          "name": name, "kind": "predict", "image_size": [height, width], "tile_size": tiled.tile if tiled else 0,
          "tile_overlap": tiled.overlap if tiled else None, "tiles_per_step": tiled.tiles_per_step if tiled else None,
          "scales": list(base.eval.scales or base.model.scales), "fusion": base.model.fusion.name,
          "flip": base.eval.flip, "peak_gflops_per_s": peak, "compile_s": run.runner.compile_s,
          "programs": tiled.programs if tiled else 1, "median_s": median, "times_s": times[name],
          "calls": len(times[name]), "images_per_s": 1 / median, "image_pixels": image_pixels,
          "computed_pixels": pixels, "computed_per_image_pixel": pixels / image_pixels,
          "computed_pixels_per_s": pixels / median, "program_bytes": run.program_bytes,
          "peak_memory_bytes": max(run.program_bytes.values()), "peak_memory_source": "xla_buffer_assignment",
          "host_bytes_held": run.host_bytes,
          **({"device_peak_bytes": peak} if (peak := own_device_peak(selector.alone)) is not None else {})})
      print(json.dumps(timed[-1]), flush=True)
    cases.extend(timed)
  return cases


def add_ratios_to_whole(cases: list[dict]) -> None:
  """Each prediction case's images/s and computed pixels/s over those of the whole image of its size (the cases may
  come from different processes)."""
  predictions = [c for c in cases if c["kind"] == "predict"]
  for case in predictions:
    whole = next((c for c in predictions if c["tile_size"] == 0 and c["image_size"] == case["image_size"]), None)
    if whole is not None:
      case["images_per_s_vs_whole"] = case["images_per_s"] / whole["images_per_s"]
      case["computed_pixels_per_s_vs_whole"] = case["computed_pixels_per_s"] / whole["computed_pixels_per_s"]


def measure(runner: Runner, batch_size: int, steps: int, model_flop: float, datasheet_gflops: float | None,
            alone: bool) -> dict:
  """Median (and min) step time over `steps` runs after one warm-up run, throughput, achieved GFLOP/s of the whole
  step on all its devices (XLA's count of the compiled step, and the model's `model_flop`), and MFU against
  `datasheet_gflops` (one device's peak) where known. `alone`: this case is the only one its process ran."""
  times = call_times(runner.run, steps)
  median = float(np.median(times))
  xla_flop = _flops(runner.compiled) * runner.devices  # XLA counts one device's share of the partitioned step
  model_gflops = model_flop / median / 1e9
  mfu = model_gflops / (datasheet_gflops * runner.devices) if datasheet_gflops else None
  return {"devices": runner.devices, "median_step_s": median, "min_step_s": float(min(times)),
          "compile_s": runner.compile_s, "images_per_s": batch_size / median, "gflop_per_step": xla_flop / 1e9,
          "gflops_per_s": xla_flop / median / 1e9, "model_gflop_per_step": model_flop / 1e9,
          "model_gflops_per_s": model_gflops, "datasheet_peak_gflops_per_s": datasheet_gflops, "mfu": mfu,
          **_peak_memory(runner.compiled, alone)}


def _peak_memory(compiled, alone: bool) -> dict:
  """The device's own peak where it keeps one (GPU, TPU) and the case ran alone in its process (the peak is
  since the process started); otherwise the step's buffers as XLA assigned them: arguments + outputs +
  temporaries - donated aliases, the most the step holds at once."""
  peak = own_device_peak(alone)
  if peak is not None:
    return {"peak_memory_bytes": peak, "peak_memory_source": "device"}
  if compiled.memory_analysis() is None:
    return {"peak_memory_bytes": None, "peak_memory_source": "unavailable"}
  return {"peak_memory_bytes": memory_analysis(compiled)["total_bytes"], "peak_memory_source": "xla_buffer_assignment"}


def op_kind(name: str) -> str:
  """An XLA instruction's kind: its name without the numeric suffix ('ynn_fusion.12' -> 'ynn_fusion')."""
  return re.sub(r"(\.\d+)+$", "", name)


def time_by_op_kind(trace_dir: str, hlo_text: str, steps: int) -> dict[str, float]:
  """Milliseconds per step by kind of XLA operation, from the newest `*.trace.json.gz` under `trace_dir`.

  Only events named after an instruction of `hlo_text` count (an event's name, or its `hlo_op` argument where a
  device names kernels differently); operations that overlap in time are each counted in full, so the sum can
  exceed the step time when the runtime runs independent operations concurrently.
  """
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"benchmark.py: no *.trace.json.gz under profile directory {trace_dir!r}; expected "
                            "the trace jax.profiler writes")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  instructions = set(re.findall(r"%([\w.\-]+) = ", hlo_text))
  total_us = collections.Counter()
  for event in events:
    if event.get("ph") != "X" or "dur" not in event:
      continue
    name = event.get("args", {}).get("hlo_op") or event.get("name", "")
    if name in instructions:
      total_us[op_kind(name)] += event["dur"]
  return {kind: us / steps / 1e3 for kind, us in total_us.most_common()}


def profile(runner: Runner, trace_dir: str, steps: int) -> dict[str, float]:
  """Traces `steps` runs of an already warm runner into `trace_dir`; returns `time_by_op_kind`."""
  jax.profiler.start_trace(trace_dir)
  try:
    for _ in range(steps):
      runner.run()
  finally:
    jax.profiler.stop_trace()
  return time_by_op_kind(trace_dir, runner.compiled.as_text(), steps)


_CASE_PROCESS = "SCALEATTN_BENCHMARK_CASE_PROCESS"  # set for the processes record_from_own_processes starts


def measured_peaks_in_own_process(precisions: list[str]) -> dict[str, float]:
  """The matmul peaks, measured in a process of their own: in a case's process they would be its peak memory."""
  code = ("import json, sys; from scaleattn.perf import measure; "
          "print(json.dumps({p: measure.matmul_peak_gflops(p) for p in sys.argv[1:]}))")
  out = subprocess.run([sys.executable, "-c", code, *precisions], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def parsed_peaks(items: list[str]) -> dict[str, float]:
  """--matmul_peaks' 'precision=GFLOP/s' items."""
  peaks = {}
  for item in items:
    precision, _, value = item.partition("=")
    try:
      peaks[precision] = float(value)
    except ValueError:
      raise app.UsageError(f"--matmul_peaks item {item!r}: expected precision=GFLOP/s, e.g. float32=166.0") from None
  return peaks


def record_from_own_processes() -> dict:
  """Runs this command again once per case (--case_index=0, 1, ...), each in a fresh process, and joins their
  records; the matmul peaks are measured once, in a process of their own. This process touches no device: a TPU
  admits one process at a time, and a GPU's memory would be shared. The cases of an image size are then timed one
  after another, not alternating."""
  peaks = parsed_peaks(FLAGS.matmul_peaks) if FLAGS.matmul_peaks or FLAGS.memory_only else (
      measured_peaks_in_own_process(FLAGS.precision))
  record, cases, total, index = None, [], 1, 0
  with tempfile.TemporaryDirectory() as tmp:
    while index < total:
      out = os.path.join(tmp, f"case_{index}.json")
      command = [sys.executable, *sys.orig_argv[1:], f"--case_index={index}", "--case_processes=one", f"--out={out}"]
      if peaks:
        command.append("--matmul_peaks=" + ",".join(f"{p}={v!r}" for p, v in peaks.items()))
      subprocess.run(command, check=True, env={**os.environ, _CASE_PROCESS: "1"})
      with open(out) as f:
        ran = json.load(f)
      record, total = record or ran, ran["cases_counted"]
      cases.extend(ran["cases"])
      index += 1
  return {**record, "case_processes": "each", "cases": cases}


def record_in_this_process(retained: int) -> dict:
  """Every case (or the one at --case_index) run here, with the environment and the matmul peaks."""
  base = FLAGS.config
  scale_sets = [tuple(float(s) for s in x.split("-")) for x in FLAGS.scales] or [tuple(base.model.scales)]
  if FLAGS.matmul_peaks:
    peaks = parsed_peaks(FLAGS.matmul_peaks)
  else:
    peaks = {} if FLAGS.memory_only else {p: matmul_peak_gflops(p) for p in FLAGS.precision}
    logging.info("Measured matmul peaks (GFLOP/s): %s", peaks)
  selector = CaseSelector(FLAGS.case_index)
  datasheet = {p: datasheet_peak_gflops(jax.devices()[0].device_kind, p) for p in FLAGS.precision}
  target_mesh, target_platform, target = None, None, {}
  if FLAGS.tpu_topology:
    from jax.experimental import topologies  # noqa: PLC0415 - deviceless compilation only
    topology = topologies.get_topology_desc(topology_name=FLAGS.tpu_topology, platform="tpu")
    devices = topology.devices if base.mesh.data == -1 else topology.devices[:base.mesh.data]
    target_mesh = Mesh(np.array(devices), (sharding.DATA_AXIS,))
    target_platform = "tpu"
    target = {"compiled_for": FLAGS.tpu_topology, "compiled_for_device": topology.devices[0].device_kind}
  if FLAGS.inference_sizes:
    cases = inference_cases(base, peaks.get("float32"), selector)
  else:
    cases = train_and_eval_cases(base, scale_sets, peaks, datasheet, selector, target_mesh, target_platform)
  return {**environment(), **target, "host_memory_retained": retained, "case_processes": "one",
          "matmul_peaks": peaks, "cases_counted": selector.seen, "cases": cases}


def main(argv):
  del argv
  retained = host_memory.retain_on_cpu(FLAGS.retain_host_memory)
  each = FLAGS.case_processes == "each" or (FLAGS.case_processes == "auto" and not FLAGS.memory_only
                                            and not host_memory.cpu_process())
  if os.environ.get(_CASE_PROCESS) and FLAGS.case_index < 0:
    raise app.UsageError("a case's process got no --case_index: a '--' in the benchmark's command line ends its "
                         "flags; expected the flags before it")
  if each and FLAGS.case_index < 0:
    record = record_from_own_processes()
  else:
    record = record_in_this_process(retained)
  add_ratios_to_whole(record["cases"])
  if FLAGS.out:
    record["command"] = " ".join(["python -m scaleattn.benchmark", *sys.argv[1:]])
    with open(FLAGS.out, "w") as f:
      json.dump(record, f, indent=2)


def train_and_eval_cases(base: ml_collections.ConfigDict, scale_sets: list[tuple[float, ...]],
                         peaks: dict[str, float], datasheet: dict[str, float | None], selector: CaseSelector,
                         target_mesh: Mesh | None, target_platform: str | None) -> list[dict]:
  """The train (and eval) step of every scale set x precision x scale-execution path x microbatches x remat."""
  cases = []
  for scales, precision, microbatches, remat in itertools.product(scale_sets, FLAGS.precision,
                                                                  map(int, FLAGS.microbatches), FLAGS.remat):
    for execution in (FLAGS.scale_execution if len(scales) > 1 else ["loop"]):
      config = base.copy_and_resolve_references()
      config.model.scales, config.model.dtype, config.model.scale_execution = scales, precision, execution
      config.model.remat = remat
      config.train.batch_size, config.train.microbatches = FLAGS.batch_size, microbatches
      fusion = config.model.fusion.name if len(scales) > 1 else "none"
      common = {"scales": list(scales), "fusion": fusion,
                "extra_supervision": config.loss.extra_supervision and len(scales) > 1, "precision": precision,
                "scale_execution": execution, "microbatches": microbatches, "remat": remat,
                "peak_gflops_per_s": peaks.get(precision)}
      name = f"{len(scales)}scale-{fusion}-{execution}-{precision}"
      if microbatches > 1 or remat != "none":
        name += f"-k{microbatches}-remat_{remat}"
      if FLAGS.memory_only:
        if not selector.take():
          continue
        built = train_runner(config, compile_only=True, mesh=target_mesh, platform=target_platform)
        case = {"name": f"train-{name}", "kind": "train", "batch_size": FLAGS.batch_size,
                "image_size": config.input.crop_size, **common, "compile_s": built.compile_s,
                "memory": memory_analysis(built.compiled)}
        print(json.dumps(case), flush=True)
        cases.append(case)
        continue
      runs = [("train", FLAGS.batch_size, config.input.crop_size, functools.partial(train_runner, config))]
      if FLAGS.eval_batch_size:
        runs.append(("eval", FLAGS.eval_batch_size, config.input.eval_size,
                     functools.partial(eval_runner, config, FLAGS.eval_batch_size)))
      for kind, batch_size, size, runner in runs:
        if not selector.take():
          continue
        built = runner()
        counted = config.model.copy_and_resolve_references()  # eval runs config.eval.scales when set
        counted.scales = tuple(config.eval.scales or config.model.scales) if kind == "eval" else config.model.scales
        model_flop = flops.step_flops(counted, batch_size, size, size, train=kind == "train")
        case = {"name": f"{kind}-{name}", "kind": kind, "batch_size": batch_size, "image_size": size, **common,
                **measure(built, batch_size, FLAGS.steps, model_flop, datasheet[precision], selector.alone)}
        if FLAGS.profile_dir:
          case["ms_per_step_by_op_kind"] = profile(built, os.path.join(FLAGS.profile_dir, case["name"]),
                                                   FLAGS.profile_steps)
        print(json.dumps(case), flush=True)
        cases.append(case)
  return cases


if __name__ == "__main__":
  app.run(main)
