"""Training-input throughput: the project's grain pipeline against an equivalent tf.data one, same data, same work.

  PYTHONPATH=. python launch/pipeline_throughput.py --config=configs/shapes.py --batches=100

Both read the training split of config.dataset and produce the same batches' worth of work: decode the JPEG,
subtract the mean, pad to the crop size (mean, label 255), random crop, random mirror (and random scaling when the
config asks for it). grain reads the array_record files through `tfds.data_source` (`scaleattn.data.input_pipeline`);
tf.data reads a TFRecord copy of the same prepared dataset (TFDS cannot serve array_record to tf.data), copied
once into `--tfrecord_dir`. Prints and writes (`--out`) images/s for each after `--warmup` batches.
"""
from __future__ import annotations

import json
import os
import shutil
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/shapes.py", "Training config whose input is measured.")
flags.DEFINE_integer("batches", 100, "Batches timed per pipeline.")
flags.DEFINE_integer("warmup", 10, "Batches read before timing starts.")
flags.DEFINE_list("pipelines", ["grain", "grain_workers", "tfdata"], "Which to measure.")
flags.DEFINE_integer("workers", 2, "Worker processes of 'grain_workers'.")
flags.DEFINE_string("tfrecord_dir", "workdirs/tfrecord", "Where the TFRecord copy for tf.data goes.")
flags.DEFINE_string("out", "", "JSON file for the results.")


def _images_per_s(batches, num: int, warmup: int, batch_size: int) -> float:
  it = iter(batches)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(num):
    batch = next(it)
    np.asarray(batch["image"])  # tf.data hands tensors: include the copy out
  return num * batch_size / (time.perf_counter() - start)


def grain_batches(config: ml_collections.ConfigDict, worker_count: int):
  from scaleattn.data import input_pipeline  # noqa: PLC0415
  config = config.copy_and_resolve_references()
  config.input.worker_count = worker_count
  return input_pipeline.create_datasets(config, process_index=0, process_count=1).train_batches(0)


def tfrecord_builder(config: ml_collections.ConfigDict, out_dir: str):
  """A TFRecord copy of the prepared array_record dataset (made once: the serialized examples copied record by
  record, the metadata copied with its file format changed), as a TFDS builder."""
  import tensorflow as tf  # noqa: PLC0415
  import tensorflow_datasets as tfds  # noqa: PLC0415
  from array_record.python import array_record_module  # noqa: PLC0415

  from scaleattn.data import input_pipeline  # noqa: PLC0415
  source = input_pipeline.prepare(config.dataset)
  kwargs = {"config": config.dataset.builder_config} if config.dataset.builder_config else {}
  builder = tfds.builder(config.dataset.name, data_dir=out_dir, file_format="tfrecord", **kwargs)
  if builder.is_prepared():
    return builder
  copy = os.path.join(out_dir, os.path.relpath(source.data_dir, source.data_dir_root))
  shutil.rmtree(copy, ignore_errors=True)
  os.makedirs(copy + ".incomplete")
  for name in os.listdir(source.data_dir):
    src = os.path.join(source.data_dir, name)
    if ".array_record-" not in name:
      shutil.copy(src, copy + ".incomplete")
      continue
    reader = array_record_module.ArrayRecordReader(src)
    with tf.io.TFRecordWriter(os.path.join(copy + ".incomplete", name.replace(".array_record-", ".tfrecord-"))) as w:
      for record in reader.read_all():
        w.write(record)
    reader.close()
  info_path = os.path.join(copy + ".incomplete", "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"
  with open(info_path, "w") as f:
    json.dump(info, f)
  os.rename(copy + ".incomplete", copy)
  return tfds.builder(config.dataset.name, data_dir=out_dir, file_format="tfrecord", **kwargs)


def tfdata_batches(config: ml_collections.ConfigDict, out_dir: str):
  """The training augmentation in TensorFlow ops, parallel map, deterministic order."""
  import tensorflow as tf  # noqa: PLC0415
  cfg = config.input
  crop = cfg.crop_size
  mean = tf.constant(cfg.mean_rgb, tf.float32)
  lo, hi = cfg.random_scale

  def augment(index, example):
    seeds = tf.random.experimental.stateless_split(tf.stack([tf.cast(config.seed, tf.int64), index]), 3)
    image = tf.cast(example["image"], tf.float32) - mean
    label = tf.cast(example["label"], tf.float32)[..., None]
    if (lo, hi) != (1.0, 1.0):
      factor = tf.random.stateless_uniform([], seeds[0], lo, hi)
      size = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * factor), tf.int32)
      image = tf.image.resize(image, size, "bilinear")
      label = tf.image.resize(label, size, "nearest")
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    pad_h, pad_w = tf.maximum(crop - h, 0), tf.maximum(crop - w, 0)
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])  # zero after mean subtraction: the mean colour
    label = tf.pad(label - 255.0, [[0, pad_h], [0, pad_w], [0, 0]]) + 255.0
    both = tf.image.stateless_random_crop(tf.concat([image, label], -1), [crop, crop, 4], seeds[1])
    if cfg.random_mirror:
      both = tf.image.stateless_random_flip_left_right(both, seeds[2])
    return {"image": both[..., :3], "label": tf.cast(both[..., 3], tf.int32)}

  ds = tfrecord_builder(config, out_dir).as_dataset(split=config.dataset.train_split)
  ds = ds.repeat().shuffle(1024, seed=config.seed).enumerate()
  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(config.train.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def main(argv):
  del argv
  config = FLAGS.config
  makers = {"grain": lambda: grain_batches(config, 0), "grain_workers": lambda: grain_batches(config, FLAGS.workers),
            "tfdata": lambda: tfdata_batches(config, FLAGS.tfrecord_dir)}
  unknown = set(FLAGS.pipelines) - set(makers)
  if unknown:
    raise ValueError(f"launch/pipeline_throughput.py: --pipelines has {sorted(unknown)}; expected {sorted(makers)}")
  results = {"config": {"dataset": config.dataset.name, "builder_config": config.dataset.builder_config,
                        "crop_size": config.input.crop_size, "random_scale": list(config.input.random_scale),
                        "batch_size": config.train.batch_size}, "cpu_cores": os.cpu_count(), "images_per_s": {}}
  for name in FLAGS.pipelines:
    rate = _images_per_s(makers[name](), FLAGS.batches, FLAGS.warmup, config.train.batch_size)
    results["images_per_s"][name] = rate
    print(f"{name:>14}: {rate:8.1f} images/s")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
