"""Deterministic, resumable, host-sharded input pipeline: grain over TFDS array_record data sources.

Random access makes exact resumption free: the global batch at step t holds the examples at global positions
t*B .. t*B+B-1 of an endless stream that is a fresh permutation of the split every epoch, and each example's
augmentation draws from a generator seeded by (seed, position). So batch t is the same whatever the start step
or the number of processes, and no iterator state needs checkpointing; process i reads and decodes only rows
i*b .. i*b+b-1 of every global batch (b = B / processes).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from scaleattn import datasets, preprocessing  # importing datasets registers the builders

_ENDLESS = 2**40  # positions of the training stream; a MapDataset needs a length
_AUGMENT_STREAM = 1  # keeps augmentation draws apart from epoch permutations, which use (seed, epoch)


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


@dataclasses.dataclass
class Datasets:
  """Training and evaluation batches of one process."""
  config: ml_collections.ConfigDict
  builder: tfds.core.DatasetBuilder
  process_index: int
  process_count: int
  _sources: dict[str, Any] = dataclasses.field(default_factory=dict, init=False)

  def __post_init__(self):
    names, expected = self.class_names, self.config.dataset.num_classes
    if len(names) != expected:
      raise ValueError(f"config.dataset.num_classes={expected} but dataset {self.config.dataset.name!r} has "
                       f"{len(names)} classes {names}")
    for field in ("train", "eval"):
      size = self.config[field].batch_size
      if size % self.process_count:
        raise ValueError(f"config.{field}.batch_size={size} is not divisible by the {self.process_count} processes")

  @property
  def class_names(self) -> tuple[str, ...]:
    return datasets.class_names(self.config.dataset.name)

  def source(self, split: str):
    """Random access to the decoded examples of `split`."""
    if split not in self._sources:
      if split not in self.builder.info.splits:
        raise ValueError(f"dataset {self.builder.info.full_name!r} has no split {split!r}; it has "
                         f"{sorted(self.builder.info.splits)}")
      self._sources[split] = self.builder.as_data_source(split=split)
    return self._sources[split]

  def _batches(self, positions: grain.MapDataset, load: Callable[[int], dict[str, np.ndarray]],
               local_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Loads the examples at `positions` in reading threads (or worker processes) and batches them in order."""
    cfg = self.config.input
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(1, cfg.prefetch) * local_batch)
    ds = positions.map(load).to_iter_dataset(read)
    if cfg.worker_count:
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app take the defaults
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return iter(ds.batch(local_batch))

  def _local_rows(self, global_batch: int, num_steps: int, first_step: int = 0) -> grain.MapDataset:
    """Global stream positions of this process's rows of batches first_step .. first_step+num_steps-1."""
    local = global_batch // self.process_count
    offset = self.process_index * local
    return grain.MapDataset.range(first_step * local, (first_step + num_steps) * local).map(
        lambda k: (k // local) * global_batch + offset + k % local)

  def train_batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the global training batches from `start_step` on (endless)."""
    cfg = self.config
    src = self.source(cfg.dataset.train_split)
    n = len(src)

    def load(position: int) -> dict[str, np.ndarray]:
      epoch, offset = divmod(position, n)
      example = src[int(_permutation(cfg.seed, epoch, n)[offset])]
      return preprocessing.train_example(
          np.asarray(example["image"]), np.asarray(example["label"]),
          np.random.default_rng([cfg.seed, _AUGMENT_STREAM, position]), crop_size=cfg.input.crop_size,
          mean_rgb=cfg.input.mean_rgb, mirror=cfg.input.random_mirror, scale_range=cfg.input.random_scale)

    global_batch = cfg.train.batch_size
    rows = self._local_rows(global_batch, _ENDLESS // global_batch - start_step, start_step)
    return self._batches(rows, load, global_batch // self.process_count)

  def num_eval_examples(self, split: str) -> int:
    return len(self.source(split))

  def num_eval_batches(self, split: str) -> int:
    return -(-self.num_eval_examples(split) // self.config.eval.batch_size)

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `split` once, in order, padded to eval_size; the last global batch is filled up with
    all-masked padding examples, so every process yields num_eval_batches(split) batches."""
    cfg = self.config
    src = self.source(split)
    n = len(src)
    with_sizes = "instance_size" in self.builder.info.features

    def load(position: int) -> dict[str, np.ndarray]:
      if position >= n:
        return preprocessing.empty_eval_example(cfg.input.eval_size, with_sizes)
      example = src[position]
      return preprocessing.eval_example(
          np.asarray(example["image"]), np.asarray(example["label"]), eval_size=cfg.input.eval_size,
          mean_rgb=cfg.input.mean_rgb, instance_size=example.get("instance_size"))

    global_batch = cfg.eval.batch_size
    rows = self._local_rows(global_batch, self.num_eval_batches(split))
    return self._batches(rows, load, global_batch // self.process_count)


def create_datasets(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                    process_count: int | None = None) -> Datasets:
  """Prepares config.dataset if needed and returns this process's view of it (defaults: JAX's process)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  return Datasets(config, prepare(config.dataset), process_index, process_count)
