"""The input pipeline: deterministic for a seed, resumable at an exact step, disjoint and complete process shards,
each epoch a permutation of the split, any batch padded onto any device count and cut into microbatches without
changing which examples it holds, evaluation covering every example once on every process layout."""
import fake_data
import numpy as np
import pytest

from scaleattn.data import input_pipeline

NUM_TRAIN, NUM_VALIDATION = 32, 8  # the 'smoke' scale_shapes config; images 65..81 px


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.prepare(fake_data.pipeline_config(path).dataset)
  return path


def _datasets(data_dir, process_index=0, process_count=1, data_devices=1, **kw):
  return input_pipeline.create_datasets(fake_data.pipeline_config(data_dir, **kw), data_devices=data_devices,
                                        process_index=process_index, process_count=process_count)


def _take(iterator, n):
  """n training batches, each flattened from [microbatches, rows] to rows."""
  return [{k: v.reshape(-1, *v.shape[2:]) for k, v in next(iterator).items()} for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_batches_are_deterministic_and_resume_exactly(data_dir):
  data = _datasets(data_dir)
  first = _take(data.train_batches(0), 11)  # 44 examples: past the 32-example epoch boundary
  raw = next(data.train_batches(0))
  assert raw["image"].shape == (1, 4, 49, 49, 3) and raw["image"].dtype == np.float32
  assert raw["label"].shape == (1, 4, 49, 49) and raw["label"].dtype == np.int32
  for a, b in zip(first, _take(_datasets(data_dir).train_batches(0), 11), strict=True):
    _assert_same(a, b)
  for k in (1, 7, 9):
    for a, b in zip(first[k:], _take(data.train_batches(k), 2), strict=False):
      _assert_same(a, b)
  (other_seed,) = _take(_datasets(data_dir, seed=1).train_batches(0), 1)
  assert not np.array_equal(other_seed["image"], first[0]["image"])


def _source_ids(data, batches):
  """Which source example each row is: crop = eval size with no mirror/scale leaves the whole padded image."""
  src = data.source("train")
  reference = {i: np.asarray(src[i]["image"]) for i in range(len(src))}
  ids = []
  for batch in batches:
    for row, label in zip(batch["image"], batch["label"], strict=True):
      h, w = (label != 255).sum(0).max(), (label != 255).sum(1).max()
      pixels = np.rint(row[:h, :w] + np.asarray(fake_data.MEAN_RGB, np.float32)).astype(np.uint8)
      ids.append(next(i for i, ref in reference.items() if ref.shape == pixels.shape and (ref == pixels).all()))
  return ids


def test_each_epoch_is_a_fresh_permutation(data_dir):
  data = _datasets(data_dir, crop_size=81, mirror=False)
  ids = _source_ids(data, _take(data.train_batches(0), 16))  # two epochs of 8 batches of 4
  assert sorted(ids[:NUM_TRAIN]) == sorted(ids[NUM_TRAIN:]) == list(range(NUM_TRAIN))
  assert ids[:NUM_TRAIN] != ids[NUM_TRAIN:] and ids[:NUM_TRAIN] != list(range(NUM_TRAIN))


def test_process_shards_are_disjoint_and_complete(data_dir):
  whole = _take(_datasets(data_dir).train_batches(3), 2)
  parts = [_take(_datasets(data_dir, i, 2).train_batches(3), 2) for i in range(2)]
  for step in range(2):
    assert parts[0][step]["image"].shape[0] == parts[1][step]["image"].shape[0] == 2
    merged = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in whole[step]}
    _assert_same(merged, whole[step])  # process i holds rows 2i, 2i+1 of the global batch, augmentation included
  kw = {"crop_size": 81, "mirror": False}
  ids = [_source_ids(_datasets(data_dir, i, 2, **kw), _take(_datasets(data_dir, i, 2, **kw).train_batches(0), 4))
         for i in range(2)]
  assert not set(ids[0]) & set(ids[1]) and len(set(ids[0]) | set(ids[1])) == 16  # 16 distinct examples of epoch 0


@pytest.mark.parametrize("microbatches, devices, processes, rows", [(1, 8, 1, 8), (2, 8, 2, 8), (2, 1, 1, 2),
                                                                    (4, 2, 2, 2), (1, 3, 1, 6)])
def test_padding_and_microbatches_keep_the_batch(data_dir, microbatches, devices, processes, rows):
  """The global batch of 4 at steps 2 and 3, laid out as `microbatches` slices of `rows` rows over `devices`
  devices and `processes` processes: the same examples in the same order, then padding (every label 255)."""
  plain = _take(_datasets(data_dir).train_batches(2), 2)
  parts = [[next(it) for _ in range(2)] for it in (_datasets(
      data_dir, i, processes, devices, microbatches=microbatches).train_batches(2) for i in range(processes))]
  real = 4 // microbatches
  for step in range(2):
    merged = {k: np.concatenate([p[step][k] for p in parts], axis=1) for k in plain[step]}
    assert merged["image"].shape == (microbatches, rows, 49, 49, 3)
    for k in plain[step]:
      np.testing.assert_array_equal(merged[k][:, :real].reshape(plain[step][k].shape), plain[step][k])
    assert (merged["label"][:, real:] == 255).all() and not merged["image"][:, real:].any()


def test_batch_layout_pads_to_the_devices():
  layout = input_pipeline.batch_layout(30, 3, 16, 2)
  assert (layout.rows, layout.real_per_microbatch) == (16, 10)
  assert layout.padding_fraction == pytest.approx(1 - 30 / 48)
  assert input_pipeline.batch_layout(30, 1, 4, 1).rows == 32 and input_pipeline.batch_layout(30, 1, 1, 1).rows == 30


def test_grain_worker_processes_give_the_same_batches(data_dir):
  """Worker processes read absl flags: outside an absl app the caller parses them (the library never does)."""
  from absl import flags  # noqa: PLC0415
  assert not flags.FLAGS.is_parsed()
  with pytest.raises(ValueError, match="worker_count=2: grain's worker processes read absl flags"):
    _datasets(data_dir, worker_count=2).train_batches(5)
  flags.FLAGS.mark_as_parsed()
  try:
    threads = _take(_datasets(data_dir).train_batches(5), 2)
    workers = _take(_datasets(data_dir, worker_count=2).train_batches(5), 2)
  finally:
    flags.FLAGS.unparse_flags()
  for a, b in zip(threads, workers, strict=True):
    _assert_same(a, b)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once(data_dir, process_count):
  # 8 validation examples in global batches of 6: 2 batches, the last with 4 padding examples.
  shards = [list(_datasets(data_dir, i, process_count).eval_batches("validation")) for i in range(process_count)]
  data = _datasets(data_dir)
  assert data.num_eval_examples("validation") == NUM_VALIDATION and data.num_eval_batches("validation") == 2
  assert all(len(batches) == 2 for batches in shards)  # the same number on every process
  rows = [{k: v[r] for k, v in batch.items()} for step in range(2) for shard in shards
          for batch in [shard[step]] for r in range(len(batch["mask"]))]
  assert len(rows) == 12
  src = data.source("validation")
  for position, row in enumerate(rows):
    assert row["image"].shape == (81, 81, 3) and set(row) == {"image", "label", "mask", "instance_size"}
    if position >= NUM_VALIDATION:
      assert not row["mask"].any() and (row["label"] == 255).all()
      continue
    example = src[position]
    h, w = example["label"].shape
    assert row["mask"].sum() == h * w and row["mask"][:h, :w].all()
    np.testing.assert_array_equal(row["label"][:h, :w], example["label"])
    np.testing.assert_array_equal(row["instance_size"][:h, :w], example["instance_size"])
    np.testing.assert_allclose(row["image"][:h, :w] + fake_data.MEAN_RGB, example["image"], atol=1e-3)


def test_config_errors(data_dir):
  with pytest.raises(ValueError, match=r"config.dataset.num_classes=3 disagrees with dataset 'scale_shapes', which "
                                       r"has 5 classes"):
    _datasets(data_dir, num_classes=3)
  with pytest.raises(ValueError, match=r"has no split 'nope'; it has \['test', 'train', 'validation'\]"):
    list(_datasets(data_dir).eval_batches("nope"))
  assert _datasets(data_dir).class_names == ("background", "disk", "square", "triangle", "cross")


def test_manual_dataset_end_to_end(tmp_path):
  """voc2012_aug from a fabricated tree through create_datasets (prepared on first use)."""
  manual = tmp_path / "manual"
  truth = fake_data.make_voc(manual, ["a1", "a2"], ["b1"], ["a2", "c1"], ["c2"], size=(12, 14))
  config = fake_data.pipeline_config(tmp_path / "tfds", name="voc2012_aug", builder_config=None, num_classes=21,
                                     manual_dir=str(manual), crop_size=16, eval_size=16, train_batch=2, eval_batch=2)
  config.dataset.train_split, config.dataset.eval_split = "train_aug", "val"
  data = input_pipeline.create_datasets(config, process_index=0, process_count=1)
  batch = next(data.train_batches(0))
  assert batch["image"].shape == (1, 2, 16, 16, 3) and set(np.unique(batch["label"])) <= set(range(21)) | {255}
  (only,) = list(data.eval_batches("val"))
  np.testing.assert_array_equal(only["label"][0, :12, :14], truth["b1"])
  assert only["mask"][0].sum() == 12 * 14 and not only["mask"][1].any()
