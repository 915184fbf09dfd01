"""The dataset builders on fabricated trees in the real layouts, their errors on bad input, and scale_shapes."""
import os
import shutil

import fake_data
import numpy as np
import pytest
import scipy.ndimage
import tensorflow_datasets as tfds
from PIL import Image

from scaleattn import data as datasets
from scaleattn.data import DataError, scale_shapes

VOC_TRAIN, VOC_VAL = ["2007_000001", "2007_000002", "2007_000003"], ["2007_000010", "2007_000011"]
SBD_TRAIN, SBD_VAL = ["2007_000002", "2008_000020", "2007_000010"], ["2008_000021", "2007_000011", "2008_000022"]
PERSON_TRAIN, PERSON_VAL = ["2008_000003", "2008_000008"], ["2008_000026"]


def _build(name, data_dir, manual_dir=None, **kw):
  builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record", **kw)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _read(builder, split):
  src = builder.as_data_source(split=split)
  return {ex["file_name"].decode(): ex for ex in (src[i] for i in range(len(src)))}


def _check_examples(examples, truth, image_dir):
  for image_id, ex in examples.items():
    assert ex["label"].dtype == np.uint8 and ex["label"].shape == truth[image_id].shape
    np.testing.assert_array_equal(ex["label"], truth[image_id])
    with Image.open(os.path.join(image_dir, f"{image_id}.jpg")) as im:  # stored as the file's own JPEG bytes
      np.testing.assert_array_equal(ex["image"], np.asarray(im))


@pytest.mark.parametrize("archived", [False, True])
def test_voc2012_aug_splits_and_labels(tmp_path, archived):
  manual = tmp_path / "manual"
  truth = fake_data.make_voc(manual, VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
  image_dir = manual / "VOCdevkit" / "VOC2012" / "JPEGImages"
  if archived:
    reference = {p.name: np.asarray(Image.open(p)) for p in image_dir.iterdir()}
    fake_data.archive(manual)
  builder = _build("voc2012_aug", tmp_path / "tfds", manual)
  train_aug, train, val = (_read(builder, s) for s in ("train_aug", "train", "val"))
  # train_aug = VOC train + SBD train + SBD val - VOC val, worked out by hand:
  assert sorted(train_aug) == ["2007_000001", "2007_000002", "2007_000003", "2008_000020", "2008_000021",
                               "2008_000022"]
  assert sorted(train) == VOC_TRAIN and sorted(val) == VOC_VAL
  if archived:
    for image_id, ex in {**train_aug, **val}.items():
      np.testing.assert_array_equal(ex["image"], reference[f"{image_id}.jpg"])
      np.testing.assert_array_equal(ex["label"], truth[image_id])
  else:
    _check_examples({**train_aug, **val}, truth, image_dir)
  assert 255 in train_aug["2007_000002"]["label"]  # VOC's PNG wins over SBD's .mat, 255 kept
  assert set(np.unique(train_aug["2008_000021"]["label"])) == {0, 7}  # from its .mat: 7th id, class 6 + 1
  assert len(datasets.class_names("voc2012_aug")) == 21 and datasets.class_names("voc2012_aug")[15] == "person"


def test_voc_missing_manual_files_say_what_to_download_and_where(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  instructions = r"Download VOCtrainval_11-May-2012.tar .* benchmark.tgz .* into the manual directory"
  with pytest.raises(DataError, match=f"(?s)Manual directory {manual} does not exist or is empty.*{instructions}"):
    _build("voc2012_aug", tmp_path / "tfds", manual)
  fake_data.make_voc(manual, VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
  shutil.rmtree(manual / "benchmark_RELEASE")
  with pytest.raises(DataError, match=f"benchmark_RELEASE/ \\(or benchmark.tgz\\) not found at {manual}/benchmark.tgz. "
                                      f"{instructions}"):
    _build("voc2012_aug", tmp_path / "tfds", manual)


def test_pascal_person_part(tmp_path):
  manual = tmp_path / "manual"
  truth = fake_data.make_person_part(manual, PERSON_TRAIN, PERSON_VAL)
  builder = _build("pascal_person_part", tmp_path / "tfds", manual)
  train, val = _read(builder, "train"), _read(builder, "val")
  assert sorted(train) == PERSON_TRAIN and sorted(val) == PERSON_VAL
  _check_examples({**train, **val}, truth, manual / "VOCdevkit" / "VOC2012" / "JPEGImages")
  assert datasets.class_names("pascal_person_part") == (
      "background", "head", "torso", "upper_arms", "lower_arms", "upper_legs", "lower_legs")


def test_person_part_missing_annotations(tmp_path):
  (tmp_path / "manual" / "VOCdevkit").mkdir(parents=True)
  with pytest.raises(DataError, match="pascal_person_part_gt/ not found at .*Put the PASCAL-Person-Part annotations"):
    _build("pascal_person_part", tmp_path / "tfds", tmp_path / "manual")


def _break(manual, fault):
  """Damages the fabricated VOC tree in one way; returns the file the error must name."""
  voc, sbd = manual / "VOCdevkit" / "VOC2012", manual / "benchmark_RELEASE" / "dataset"
  label_path = voc / "SegmentationClass" / "2007_000002.png"
  if fault == "label value":
    label = np.asarray(Image.open(label_path)).copy()
    label[5, 5] = 30
    fake_data.save_palette_png(label_path, label)
  elif fault == "size mismatch":
    fake_data.save_palette_png(label_path, np.zeros((12, 10), np.uint8))
  elif fault == "corrupt image":
    path = voc / "JPEGImages" / "2007_000002.jpg"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    return path
  elif fault == "corrupt label":
    label_path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  elif fault == "RGB label":
    Image.new("RGB", (14, 12)).save(label_path)
  elif fault == "corrupt mat":
    label_path = sbd / "cls" / "2008_000021.mat"
    label_path.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
  elif fault == "missing label":
    label_path = sbd / "cls" / "2008_000021.mat"
    os.remove(label_path)
  return label_path


@pytest.mark.parametrize("fault, problem", [
    ("label value", r"label values \[30\] outside 0..20 \(and 255 = void\)"),
    ("size mismatch", r"label is 12x10 but image .*2007_000002.jpg is 12x14"),
    ("corrupt image", r"cannot read image \(OSError: .*[Tt]runcated"),
    ("corrupt label", r"cannot read label"),
    ("RGB label", r"expected an indexed \('P'\) or greyscale \('L'\) label PNG, got mode 'RGB'"),
    ("corrupt mat", r"cannot read SBD label GTcls.Segmentation"),
    ("missing label", r"cannot read SBD label .*No such file"),
])
def test_bad_input_stops_the_build_naming_file_and_problem(tmp_path, fault, problem):
  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  fake_data.make_voc(manual, VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
  bad_file = _break(manual, fault)
  with pytest.raises(DataError, match=f"^{bad_file}: {problem}"):
    _build("voc2012_aug", data_dir, manual)
  # Nothing half-written: no version folder (prepared or temporary) is left, so the next try starts clean.
  assert not tfds.builder("voc2012_aug", data_dir=str(data_dir)).is_prepared()
  assert not [p for p in (data_dir / "voc2012_aug").rglob("*") if p.is_dir() and "1.1.0" in p.name]


def test_prepared_data_survives_later_bad_files_and_failed_builds(tmp_path):
  """Prepared data is never rebuilt over (TFDS's default mode reuses it), and a failing build of another dataset
  in the same data_dir leaves it byte for byte as it was. (A forced rebuild, which this project never asks for,
  would delete it before regenerating: TFDS's FORCE_REDOWNLOAD does that.)"""
  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  truth = fake_data.make_person_part(manual, PERSON_TRAIN, PERSON_VAL)
  _build("pascal_person_part", data_dir, manual)
  before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
  fake_data.save_palette_png(manual / "pascal_person_part_gt" / "2008_000008.png", np.full((10, 12), 9, np.uint8))
  _build("pascal_person_part", data_dir, manual)  # already prepared: the bad file is not even read
  fake_data.make_voc(manual, VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
  _break(manual, "label value")
  with pytest.raises(DataError, match="label values"):
    _build("voc2012_aug", data_dir, manual)
  assert {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file() and "voc2012_aug" not in str(p)} == before
  reread = tfds.builder("pascal_person_part", data_dir=str(data_dir))
  np.testing.assert_array_equal(_read(reread, "train")["2008_000008"]["label"], truth["2008_000008"])


def test_person_part_list_needs_two_columns(tmp_path):
  manual = tmp_path / "manual"
  fake_data.make_person_part(manual, PERSON_TRAIN, PERSON_VAL)
  lst = manual / "pascal_person_part_trainval_list" / "val.txt"
  lst.write_text("/JPEGImages/2008_000026.jpg\n")
  with pytest.raises(DataError, match=rf"^{lst}: expected two columns \(image, label\), got '/JPEGImages/2008_000026"):
    _build("pascal_person_part", tmp_path / "tfds", manual)


@pytest.fixture(scope="module")
def shapes_examples():
  cfg = scale_shapes.CONFIGS[0]
  assert cfg.name == "default"
  return [scale_shapes.generate(cfg, i, seed=0) for i in range(40)]


def test_scale_shapes_sizes_and_classes(shapes_examples):
  all_sizes, classes = [], set()
  for ex in shapes_examples:
    h, w = ex["label"].shape
    assert 161 <= h <= 193 and 161 <= w <= 193 and h % 2 == 1 and w % 2 == 1 and ex["image"].shape == (h, w, 3)
    assert ex["image"].dtype == ex["label"].dtype == np.uint8 and ex["instance_size"].dtype == np.uint16
    objects = ex["label"] > 0
    np.testing.assert_array_equal(ex["instance_size"] > 0, objects)  # a size on object pixels only
    classes |= set(np.unique(ex["label"]).tolist())
    sizes = np.unique(ex["instance_size"][objects])
    assert sizes.max() >= 2.3 * sizes.min()  # a large and a small object in every image
    assert sizes.min() >= 12 and sizes.max() <= 0.95 * min(h, w) + 0.5
    for size in sizes:  # each connected piece spans at most the object's size (box side; rotated: x sqrt 2)
      pieces, count = scipy.ndimage.label(ex["instance_size"] == size)
      for ys, xs in (np.nonzero(pieces == k) for k in range(1, count + 1)):
        assert max(np.ptp(ys), np.ptp(xs)) <= np.sqrt(2) * size + 1
    all_sizes += sizes.tolist()
  assert classes == set(range(len(scale_shapes.CLASS_NAMES))) == set(range(5))
  assert max(all_sizes) >= 140 and min(all_sizes) <= 16  # sizes span more than 8x
  assert datasets.class_names("scale_shapes") == ("background", "disk", "square", "triangle", "cross")


def test_scale_shapes_is_deterministic_and_splits_differ(shapes_examples):
  again = scale_shapes.generate(scale_shapes.CONFIGS[0], 3, seed=0)
  for key in ("image", "label", "instance_size"):
    np.testing.assert_array_equal(again[key], shapes_examples[3][key])
  other = scale_shapes.generate(scale_shapes.CONFIGS[0], 3, seed=1)
  assert other["image"].shape != again["image"].shape or (other["image"] != again["image"]).any()


def test_scale_shapes_colour_does_not_reveal_the_class(shapes_examples):
  """Objects' mean colours: the same distribution for every class (uniform over RGB, mean ~128)."""
  means = {c: [] for c in range(1, 5)}
  for ex in shapes_examples:
    for c in means:
      if (ex["label"] == c).sum() > 50:
        means[c].append(ex["image"][ex["label"] == c].mean(0))
  centres = np.array([np.mean(v, 0) for v in means.values()])  # [class, RGB]
  assert all(len(v) >= 8 for v in means.values())
  assert np.abs(centres - 127.5).max() < 40  # of a 0..255 range; class-dependent colours would stand out


def test_scale_shapes_objects_stand_out_and_small_ones_occlude(shapes_examples):
  inside_larger = 0
  for ex in shapes_examples:
    sizes = ex["instance_size"]
    for size in np.unique(sizes[sizes > 0]):
      mask = sizes == size
      ring = _dilate(mask) & ~mask
      beneath = ring & ((sizes == 0) | (sizes > size))  # background or larger objects around it
      if mask.sum() > 30 and beneath.sum() > 30:
        gap = np.linalg.norm(ex["image"][mask].mean(0) - ex["image"][beneath].mean(0))
        assert gap > 15, f"an object of size {size} barely differs from what lies around it"
      inside_larger += (sizes[ring] > size).mean() > 0.5  # mostly surrounded by one larger object: in front of it
  assert inside_larger >= 5


def _dilate(mask):
  out = mask.copy()
  out[1:] |= mask[:-1]
  out[:-1] |= mask[1:]
  out[:, 1:] |= mask[:, :-1]
  out[:, :-1] |= mask[:, 1:]
  return out


def test_scale_shapes_builder_stores_the_generated_examples(tmp_path):
  cfg = scale_shapes.ShapesConfig(name="tiny", num_train=3, num_validation=2, num_test=1, min_image=33,
                                  max_image=41, min_object=5.0, max_object=30.0)
  builder = tfds.builder("scale_shapes", config=cfg, data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 3, "validation": 2, "test": 1}
  src = builder.as_data_source(split="validation")
  for i in range(2):
    expected = scale_shapes.generate(cfg, i, seed=scale_shapes.SPLIT_SEEDS["validation"])
    for key in ("image", "label", "instance_size"):  # lossless, and in the spec's shapes ([H, W] labels)
      np.testing.assert_array_equal(src[i][key], expected[key])
    assert src[i]["file_name"].decode() == f"validation_{i:05d}"
