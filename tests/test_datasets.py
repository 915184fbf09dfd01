"""The dataset builders on fabricated trees in the real layouts, and their errors on bad input."""

import fake_data
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from scaleattn import datasets
from scaleattn.datasets import scale_shapes

VOC_TRAIN, VOC_VAL = ["2007_000001", "2007_000002", "2007_000003"], ["2007_000010", "2007_000011"]
SBD_TRAIN, SBD_VAL = ["2007_000002", "2008_000020", "2007_000010"], ["2008_000021", "2007_000011", "2008_000022"]


def _build(name, data_dir, manual_dir, **kw):
  builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record", **kw)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _read(builder, split):
  src = builder.as_data_source(split=split)
  return {ex["file_name"].decode() if isinstance(ex["file_name"], bytes) else ex["file_name"]: ex
          for ex in (src[i] for i in range(len(src)))}


def test_voc2012_aug_splits_and_labels(tmp_path):
  truth = fake_data.make_voc(tmp_path / "manual", VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
  builder = _build("voc2012_aug", tmp_path / "tfds", tmp_path / "manual")
  # train_aug = VOC train + SBD train + SBD val - VOC val
  expected_aug = sorted(set(VOC_TRAIN + SBD_TRAIN + SBD_VAL) - set(VOC_VAL))
  assert sorted(_read(builder, "train_aug")) == expected_aug == [
      "2007_000001", "2007_000002", "2007_000003", "2008_000020", "2008_000021", "2008_000022"]
  assert sorted(_read(builder, "train")) == VOC_TRAIN and sorted(_read(builder, "val")) == VOC_VAL
  for split in ("train_aug", "val"):
    for image_id, ex in _read(builder, split).items():
      np.testing.assert_array_equal(ex["label"][..., 0], truth[image_id])
  val = _read(builder, "val")["2007_000010"]["label"]
  assert 255 in val and set(np.unique(val)) <= set(range(21)) | {255}
  assert datasets.class_names("voc2012_aug")[15] == "person"


def test_voc_missing_manual_files_say_what_to_download(tmp_path):
  (tmp_path / "manual").mkdir()
  with pytest.raises(Exception, match="Download VOCtrainval_11-May-2012.tar"):
    _build("voc2012_aug", tmp_path / "tfds", tmp_path / "manual")


def test_pascal_person_part(tmp_path):
  truth = fake_data.make_person_part(tmp_path / "manual", ["2008_000003", "2008_000008"], ["2008_000026"])
  builder = _build("pascal_person_part", tmp_path / "tfds", tmp_path / "manual")
  assert builder.info.splits["train"].num_examples == 2 and builder.info.splits["val"].num_examples == 1
  for image_id, ex in {**_read(builder, "train"), **_read(builder, "val")}.items():
    np.testing.assert_array_equal(ex["label"][..., 0], truth[image_id])
  assert len(datasets.class_names("pascal_person_part")) == 7


@pytest.mark.parametrize("fault, message", [
    ("value", r"2007_000002.png: label values \[30\] outside 0..20"),
    ("size", r"2007_000002.png: label is 12x10 but image .*2007_000002.jpg is 12x14"),
    ("corrupt", r"2007_000002.jpg: cannot read image"),
])
def test_bad_input_names_the_file_and_writes_nothing(tmp_path, fault, message):
  manual = tmp_path / "manual"
  fake_data.make_voc(manual, VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
  voc = manual / "VOCdevkit" / "VOC2012"
  label_path = voc / "SegmentationClass" / "2007_000002.png"
  if fault == "value":
    label = np.asarray(Image.open(label_path)).copy()
    label[5, 5] = 30
    fake_data.save_palette_png(label_path, label)
  elif fault == "size":
    fake_data.save_palette_png(label_path, np.zeros((12, 10), np.uint8))
  else:
    (voc / "JPEGImages" / "2007_000002.jpg").write_bytes(b"\xff\xd8 truncated")
  with pytest.raises(Exception, match=message):
    _build("voc2012_aug", tmp_path / "tfds", manual)
  # Nothing half-written is left where TFDS would find a prepared dataset.
  prepared = tmp_path / "tfds" / "voc2012_aug" / "1.0.0"
  assert not prepared.exists() or not any(f.name == "dataset_info.json" for f in prepared.iterdir())
  assert not tfds.builder("voc2012_aug", data_dir=str(tmp_path / "tfds")).is_prepared()


def test_scale_shapes_properties():
  spec = scale_shapes.SPECS["default"]
  sizes, classes = [], set()
  for i in range(40):
    ex = scale_shapes.generate(spec, i, seed=0)
    h, w = ex["label"].shape
    assert 161 <= h <= 193 and 161 <= w <= 193 and ex["image"].shape == (h, w, 3)
    objects = ex["instance_size"] > 0
    np.testing.assert_array_equal(objects, ex["label"] > 0)  # sizes exactly on object pixels
    classes |= set(np.unique(ex["label"]).tolist())
    present = np.unique(ex["instance_size"][objects])
    assert present.max() >= 2.5 * present.min()  # a large and a small object in every image
    sizes += present.tolist()
  assert classes == set(range(len(scale_shapes.CLASS_NAMES)))
  assert max(sizes) / min(sizes) >= 8  # sizes span at least 8x
  again = scale_shapes.generate(spec, 3, seed=0)
  np.testing.assert_array_equal(again["image"], scale_shapes.generate(spec, 3, seed=0)["image"])


def test_scale_shapes_colour_does_not_reveal_the_class():
  """Mean object colour is drawn from the same distribution for every class."""
  spec = scale_shapes.SPECS["default"]
  means = {c: [] for c in range(1, 5)}
  for i in range(60):
    ex = scale_shapes.generate(spec, i, seed=5)
    for c in means:
      if (ex["label"] == c).sum() > 50:
        means[c].append(ex["image"][ex["label"] == c].mean())
  centres = [np.mean(v) for v in means.values()]
  assert max(centres) - min(centres) < 25  # of a 0..255 range; colours are uniform over it
