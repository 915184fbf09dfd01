"""Deterministic, resumable, host-sharded input pipeline: grain over TFDS array_record data sources.

Random access makes exact resumption free: the global batch at step t holds the examples at global positions
t*B .. t*B+B-1 of an endless stream that is a fresh permutation of the split every epoch, and each example's
augmentation draws from a generator seeded by (seed, position). So batch t is the same whatever the start step
or the number of processes; process i reads only rows i*b .. i*b+b-1 of every global batch (b = B / processes).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from scaleattn import datasets, preprocessing  # importing datasets registers the builders

_ENDLESS = 2**40


def _prepare(cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  kwargs = {"config": cfg.builder_config} if cfg.builder_config else {}
  builder = tfds.builder(cfg.name, data_dir=cfg.data_dir, file_format="array_record", **kwargs)
  download_config = tfds.download.DownloadConfig(manual_dir=cfg.manual_dir) if cfg.manual_dir else None
  builder.download_and_prepare(download_config=download_config)
  return builder


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the split in `epoch`: a fresh permutation every epoch."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def _arrays(example: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  label = np.asarray(example["label"])
  return np.asarray(example["image"]), label.reshape(label.shape[:2]), example.get("instance_size")


@dataclasses.dataclass
class Datasets:
  """Training and evaluation batches of one process."""
  config: ml_collections.ConfigDict
  builder: tfds.core.DatasetBuilder
  process_index: int
  process_count: int
  _sources: dict[str, Any] = dataclasses.field(default_factory=dict, init=False)

  @property
  def class_names(self) -> tuple[str, ...]:
    return datasets.class_names(self.config.dataset.name)

  def source(self, split: str):
    if split not in self._sources:
      self._sources[split] = self.builder.as_data_source(split=split)
    return self._sources[split]

  def _read_options(self) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=max(1, self.config.input.worker_count or 2),
                             prefetch_buffer_size=max(1, self.config.input.prefetch) * 8)

  def train_batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """Local rows of the global training batches from `start_step` on (endless)."""
    cfg = self.config
    src = self.source(cfg.dataset.train_split)
    n, global_bs = len(src), cfg.train.batch_size
    local_bs = global_bs // self.process_count

    def load(k: int) -> dict[str, np.ndarray]:
      step, row = divmod(k, local_bs)
      position = step * global_bs + self.process_index * local_bs + row
      epoch, offset = divmod(position, n)
      index = int(_permutation(cfg.seed, epoch, n)[offset])
      image, label, _ = _arrays(src[index])
      return preprocessing.train_example(
          image, label, np.random.default_rng([cfg.seed, 1, position]), crop_size=cfg.input.crop_size,
          mean_rgb=cfg.input.mean_rgb, mirror=cfg.input.random_mirror, scale_range=cfg.input.random_scale)

    ds = grain.MapDataset.range(start_step * local_bs, _ENDLESS).map(load).batch(local_bs)
    return iter(ds.to_iter_dataset(self._read_options()))

  def num_eval_batches(self, split: str) -> int:
    return -(-len(self.source(split)) // self.config.eval.batch_size)

  def num_eval_examples(self, split: str) -> int:
    return len(self.source(split))

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `split` once, padded to eval_size; the last batch is filled with masked-out padding."""
    cfg = self.config
    src = self.source(split)
    n, global_bs = len(src), cfg.eval.batch_size
    local_bs = global_bs // self.process_count
    with_sizes = "instance_size" in self.builder.info.features

    def load(k: int) -> dict[str, np.ndarray]:
      step, row = divmod(k, local_bs)
      position = step * global_bs + self.process_index * local_bs + row
      if position >= n:
        return preprocessing.empty_eval_example(cfg.input.eval_size, with_sizes)
      image, label, sizes = _arrays(src[position])
      return preprocessing.eval_example(image, label, eval_size=cfg.input.eval_size, mean_rgb=cfg.input.mean_rgb,
                                        instance_size=sizes)

    ds = grain.MapDataset.range(0, self.num_eval_batches(split) * local_bs).map(load).batch(local_bs)
    return iter(ds.to_iter_dataset(self._read_options()))


def create_datasets(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                    process_count: int | None = None) -> Datasets:
  """Prepares the dataset if needed (on first use) and returns this process's view of it."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  return Datasets(config, _prepare(config.dataset), process_index, process_count)
