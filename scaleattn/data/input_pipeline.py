"""Deterministic, resumable, host-sharded input pipeline: grain over TFDS array_record data sources.

Random access makes exact resumption free: the global batch at step t holds the examples at global positions
t*B .. t*B+B-1 of an endless stream that is a fresh permutation of the split every epoch, and each example's
augmentation draws from a generator seeded by (seed, position). So batch t is the same whatever the start step,
the number of processes or of devices, and no iterator state needs checkpointing.

Any global batch runs on any number of devices: a training batch is laid out as [microbatches, rows], each
microbatch holding B / microbatches real examples and, up to a multiple of the data-parallel devices, padding
examples whose every label is IGNORE_LABEL. Every loss is a mean over valid pixels, so padding changes nothing but
the compute spent. Each process reads and decodes only its own rows of every microbatch.

Every record is checked as it is decoded (the image decodes; the label matches its size and holds 0..C-1 or 255).
A bad one stops the run with a BadRecordError naming the split, the record and the problem
(config.input.on_bad_record='raise'), or, with 'skip', is replaced by an ignored padding example: the batch keeps its
shape, the step's loss and update are those of the other examples, and a restart skips the same record, since
records are addressed by stream position. Training counts what it skipped (`Datasets.skipped_records`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging

from scaleattn import data as datasets
from scaleattn.config import validation
from scaleattn.data import builder_base, preprocessing  # importing datasets registers the builders

_ENDLESS = 2**40  # positions of the training stream; a MapDataset needs a length
_AUGMENT_STREAM = 1  # keeps augmentation draws apart from epoch permutations, which use (seed, epoch)
_SKIPPED = "skipped_record"  # per training example: 1 if it replaces a bad record; counted and removed per batch


class BadRecordError(datasets.DataError):
  """A record of a prepared dataset that does not decode or fails its checks."""


def _builder(cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  kwargs = {"config": cfg.builder_config} if cfg.builder_config else {}
  return tfds.builder(cfg.name, data_dir=cfg.data_dir, file_format="array_record", **kwargs)


def prepare(cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder of config.dataset, prepared (generated, or converted from the manual files) on first use.

  Processes sharing a data_dir may prepare at the same time: TFDS writes into a temporary folder and renames it,
  so one wins, and the others, whose rename fails, use its result.
  """
  builder = _builder(cfg)
  if not builder.is_prepared():
    download_config = tfds.download.DownloadConfig(manual_dir=cfg.manual_dir) if cfg.manual_dir else None
    try:
      builder.download_and_prepare(download_config=download_config)
    except OSError:
      builder = _builder(cfg)
      if not builder.is_prepared():
        raise
  return builder


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the split in `epoch`: a fresh permutation every epoch."""
  return np.random.default_rng([seed, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How a global batch of `real` examples is laid out: `microbatches` slices of `rows` rows each, of which the first
  real // microbatches are examples and the rest padding; `rows` is a multiple of the data-parallel devices and of
  the processes."""
  real: int
  microbatches: int
  rows: int

  @property
  def real_per_microbatch(self) -> int:
    return self.real // self.microbatches

  @property
  def padding_fraction(self) -> float:
    return 1.0 - self.real / (self.microbatches * self.rows)


def batch_layout(batch_size: int, microbatches: int, data_devices: int, process_count: int) -> BatchLayout:
  """The layout of a global batch of `batch_size` examples in `microbatches` slices over the devices."""
  multiple = math.lcm(data_devices, process_count)
  per_microbatch = batch_size // microbatches
  return BatchLayout(batch_size, microbatches, -(-per_microbatch // multiple) * multiple)


@dataclasses.dataclass
class Datasets:
  """Training and evaluation batches of one process of a run over `data_devices` data-parallel devices."""
  config: ml_collections.ConfigDict
  builder: tfds.core.DatasetBuilder
  process_index: int
  process_count: int
  data_devices: int = 1
  skipped_records: int = dataclasses.field(default=0, init=False)  # bad training records replaced so far
  _sources: dict[str, Any] = dataclasses.field(default_factory=dict, init=False)

  def __post_init__(self):
    validation.check_num_classes(self.config, self.class_names)

  @property
  def class_names(self) -> tuple[str, ...]:
    return datasets.class_names(self.config.dataset)

  @property
  def train_layout(self) -> BatchLayout:
    train = self.config.train
    return batch_layout(train.batch_size, train.microbatches, self.data_devices, self.process_count)

  @property
  def eval_batch_size(self) -> int:
    """The evaluation batch rounded up to a multiple of the devices and processes (filled with more examples)."""
    return batch_layout(self.config.eval.batch_size, 1, self.data_devices, self.process_count).rows

  def source(self, split: str):
    """Random access to the decoded examples of `split`."""
    if split not in self._sources:
      if split not in self.builder.info.splits:
        raise ValueError(f"dataset {self.builder.info.full_name!r} has no split {split!r}; it has "
                         f"{sorted(self.builder.info.splits)}")
      self._sources[split] = self.builder.as_data_source(split=split)
    return self._sources[split]

  def read(self, split: str, index: int, context: str) -> dict[str, Any] | None:
    """Record `index` of `split`, decoded and checked; None for a bad record under on_bad_record='skip', else a
    BadRecordError naming the split, the record, `context` (where it was needed) and the problem."""
    src = self.source(split)
    try:
      example = src[index]
      builder_base.check_pair(np.asarray(example["image"]), np.asarray(example["label"]),
                          self.config.dataset.num_classes, "image", "label")
      return example
    except datasets.DataError as e:
      problem = str(e)
    except Exception as e:  # noqa: BLE001 - anything that fails to decode is this record's problem
      problem = f"does not decode ({type(e).__name__}: {e})"
    where = f"{self.builder.info.full_name} split {split!r}, record {index} ({context})"
    if self.config.input.on_bad_record == "skip":
      logging.warning("Skipping bad record: %s: %s.", where, problem)
      return None
    raise BadRecordError(f"Bad record in {where}: {problem}. Prepare the dataset again, or set "
                         "config.input.on_bad_record='skip' to replace such records by ignored padding.")

  def _batches(self, positions: grain.MapDataset, load: Callable[[int], dict[str, np.ndarray]],
               local_batch: int) -> grain.IterDataset:
    """Loads the examples at `positions` in reading threads (or worker processes) and batches them in order."""
    cfg = self.config.input
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(1, cfg.prefetch) * local_batch)
    ds = positions.map(load).to_iter_dataset(read)
    if cfg.worker_count:
      if not flags.FLAGS.is_parsed():
        raise ValueError(f"config.input.worker_count={cfg.worker_count}: grain's worker processes read absl flags, "
                         "which are not parsed outside an absl app; call absl.flags.FLAGS.mark_as_parsed() first, "
                         "or use worker_count=0")
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return ds.batch(local_batch)

  def train_batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the global training batches from `start_step` on (endless), each array
    [microbatches, rows / processes, ...]."""
    cfg = self.config
    src = self.source(cfg.dataset.train_split)
    n = len(src)
    layout = self.train_layout
    local = layout.rows // self.process_count
    first_row = self.process_index * local
    per_step = layout.microbatches * local
    crop = cfg.input.crop_size

    def position(q: int) -> int:
      """Stream position of local row q (counted from step 0), or -1 for padding."""
      step, rest = divmod(q, per_step)
      microbatch, row = divmod(rest, local)
      row += first_row
      if row >= layout.real_per_microbatch:
        return -1
      return step * layout.real + microbatch * layout.real_per_microbatch + row

    def load(q: int) -> dict[str, np.ndarray]:
      pos = position(q)
      example = None
      if pos >= 0:
        epoch, offset = divmod(pos, n)
        example = self.read(cfg.dataset.train_split, int(_permutation(cfg.seed, epoch, n)[offset]),
                            f"training step {q // per_step}")
      if example is None:
        padding = preprocessing.padding_example(crop, with_mask=False, with_instance_size=False)
        return {**padding, _SKIPPED: np.int32(pos >= 0)}
      return {**preprocessing.train_example(
          np.asarray(example["image"]), np.asarray(example["label"]),
          np.random.default_rng([cfg.seed, _AUGMENT_STREAM, pos]), crop_size=crop,
          mean_rgb=cfg.input.mean_rgb, mirror=cfg.input.random_mirror, scale_range=cfg.input.random_scale),
              _SKIPPED: np.int32(0)}

    def shape(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
      """[microbatches, rows] layout; runs in the consuming thread, in step order, so the count is exact."""
      self.skipped_records += int(batch.pop(_SKIPPED).sum())
      return {k: v.reshape(layout.microbatches, local, *v.shape[1:]) for k, v in batch.items()}

    rows = grain.MapDataset.range(start_step * per_step, _ENDLESS)
    return iter(self._batches(rows, load, per_step).map(shape))

  def num_eval_examples(self, split: str) -> int:
    return len(self.source(split))

  def num_eval_batches(self, split: str) -> int:
    return -(-self.num_eval_examples(split) // self.eval_batch_size)

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `split` once, in order, padded to eval_size; the last global batch is filled up with
    all-masked padding examples, so every process yields num_eval_batches(split) batches."""
    cfg = self.config
    src = self.source(split)
    n = len(src)
    with_sizes = "instance_size" in self.builder.info.features

    def load(position: int) -> dict[str, np.ndarray]:
      example = self.read(split, position, "evaluation") if position < n else None
      if example is None:  # the last batch's filling, or a skipped bad record: masked out
        return preprocessing.padding_example(cfg.input.eval_size, with_mask=True, with_instance_size=with_sizes)
      return preprocessing.eval_example(
          np.asarray(example["image"]), np.asarray(example["label"]), eval_size=cfg.input.eval_size,
          mean_rgb=cfg.input.mean_rgb, instance_size=example.get("instance_size"))

    global_batch = self.eval_batch_size
    local = global_batch // self.process_count
    offset = self.process_index * local
    rows = grain.MapDataset.range(self.num_eval_batches(split) * local).map(
        lambda k: (k // local) * global_batch + offset + k % local)
    return iter(self._batches(rows, load, local))


def create_datasets(config: ml_collections.ConfigDict, *, data_devices: int = 1, process_index: int | None = None,
                    process_count: int | None = None) -> Datasets:
  """Prepares config.dataset if needed and returns this process's view of it for a run whose batches are split
  over `data_devices` devices (default process: JAX's)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  return Datasets(config, prepare(config.dataset), process_index, process_count, data_devices)
