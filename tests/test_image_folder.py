"""The image_folder builder and configs/folder.py on fabricated folders: labels as drawn in each mask mode, images
as they came, split lists honoured, the doctor's errors stop the build, the class count and the prepared copy
follow --config.dataset.manual_dir, and a tiny run trains, evaluates, predicts and exports on a folder."""
import os
import sys

import fake_data
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags
from PIL import Image

from scaleattn import data as datasets
from scaleattn.config import validation
from scaleattn.data import DataError, image_folder
from scaleattn.evaluation import segmentation
from scaleattn.inference import export, predict
from scaleattn.training import loop


def _build(manual_dir, data_dir):
  builder = tfds.builder("image_folder", data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _read(builder, split):
  src = builder.as_data_source(split=split)
  return {ex["file_name"].decode(): ex for ex in (src[i] for i in range(len(src)))}


@pytest.mark.parametrize("mode, kw", [
    ("I;16", {"ignore": 1000}),
    ("P", {}),
    ("RGB", {"colours": fake_data.FOLDER_COLOURS, "ignore_colour": (255, 255, 255)}),
])
def test_labels_and_images_as_drawn(tmp_path, mode, kw):
  truth = fake_data.make_image_folder(tmp_path / "data", mode=mode, **kw)
  builder = _build(tmp_path / "data", tmp_path / "tfds")
  examples = {**_read(builder, "train"), **_read(builder, "validation")}
  assert sorted(examples) == sorted(truth) and len(_read(builder, "validation")) == 1
  for stem, ex in examples.items():
    np.testing.assert_array_equal(ex["label"], truth[stem])
    path = tmp_path / "data" / "images" / f"{stem}.{'png' if int(stem[-2:]) % 2 else 'jpg'}"
    with Image.open(path) as im:  # JPEGs stored as their bytes, PNGs losslessly: the same pixels either way
      np.testing.assert_array_equal(ex["image"], np.asarray(im))
  assert tfds.builder("image_folder", data_dir=str(tmp_path / "tfds")).info.metadata["class_names"] == \
      list(fake_data.FOLDER_CLASSES)


def test_split_lists_are_honoured(tmp_path):
  fake_data.make_image_folder(tmp_path / "data", n=8)
  lists = {"train": ["img_00", "img_03", "img_04", "img_05"], "validation": ["img_01", "img_07"],
           "test": ["img_02", "img_06"]}
  (tmp_path / "data" / "splits").mkdir()
  for name, stems in lists.items():
    (tmp_path / "data" / "splits" / f"{name}.txt").write_text("\n".join(stems) + "\n")
  builder = _build(tmp_path / "data", tmp_path / "tfds")
  assert {split: sorted(_read(builder, split)) for split in lists} == lists


def test_doctor_errors_stop_the_build_before_anything_is_written(tmp_path):
  fake_data.make_image_folder(tmp_path / "data")
  Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "data" / "masks" / "img_04.png")
  os.remove(tmp_path / "data" / "masks" / "img_05.png")
  with pytest.raises(DataError, match=r"data: the label doctor found errors; nothing was written:\n"
                                      r"  error +no_mask +images/img_05.png: no mask masks/img_05.png\n"
                                      r"  error +size_mismatch +masks/img_04.png: mask is 10x12 but image "
                                      r"images/img_04.jpg is 10x14\n"
                                      r"12 images, 3 classes, index masks: 2 errors, 0 warnings$"):
    _build(tmp_path / "data", tmp_path / "tfds")
  assert not tfds.builder("image_folder", data_dir=str(tmp_path / "tfds")).is_prepared()
  assert not [p for p in (tmp_path / "tfds").rglob("*") if p.is_dir() and "1.0.0" in p.name]


def _load_config(monkeypatch, *args):
  """configs/folder.py as `python -m scaleattn.main` loads it: the file first, then the --config.* overrides."""
  argv = ["main", *args]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
  flag_values(argv)
  return flag_values.config


def test_class_count_and_data_dir_follow_the_manual_dir_flag(tmp_path, monkeypatch):
  monkeypatch.setattr(image_folder.constants, "DATA_DIR", str(tmp_path / "tfds"))
  fake_data.make_image_folder(tmp_path / "three", n=3)
  fake_data.make_image_folder(tmp_path / "four", n=3, classes=("background", "cat", "dog", "bird"))
  three = _load_config(monkeypatch, "--config=configs/folder.py", f"--config.dataset.manual_dir={tmp_path / 'three'}")
  four = _load_config(monkeypatch, "--config=configs/folder.py", f"--config.dataset.manual_dir={tmp_path / 'four'}")
  assert (three.dataset.num_classes, three.model.num_classes, four.model.num_classes) == (3, 3, 4)
  assert datasets.class_names(four.dataset) == ("background", "cat", "dog", "bird")
  validation.validate(three, num_data_devices=1)
  assert three.dataset.data_dir.startswith(str(tmp_path / "tfds" / "image_folders" / "three-"))
  assert four.dataset.data_dir.startswith(str(tmp_path / "tfds" / "image_folders" / "four-"))
  before = three.dataset.data_dir
  os.utime(tmp_path / "three" / "masks" / "img_01.png", ns=(1, 1))  # an edited mask: prepared anew
  assert three.dataset.data_dir != before and three.dataset.data_dir.startswith(before[:-12])
  overridden = _load_config(monkeypatch, "--config=configs/folder.py", f"--config.dataset.manual_dir={tmp_path}/four",
                            "--config.dataset.num_classes=5", f"--config.dataset.data_dir={tmp_path}/mine")
  assert (overridden.model.num_classes, overridden.dataset.data_dir) == (5, f"{tmp_path}/mine")
  unset = _load_config(monkeypatch, "--config=configs/folder.py")
  with pytest.raises(validation.ConfigError, match="config.model.num_classes=None: expected at least 2; a "
                     "folder dataset counts its classes in config.dataset.manual_dir, which is not set"):
    validation.validate(unset, num_data_devices=1)
  missing = _load_config(monkeypatch, "--config=configs/folder.py", f"--config.dataset.manual_dir={tmp_path}/none")
  with pytest.raises(DataError, match=f"{tmp_path}/none: no such folder"):
    validation.validate(missing, num_data_devices=1)


def test_a_tiny_run_trains_evaluates_predicts_and_exports(tmp_path, monkeypatch):
  """configs/folder.py:smoke on 12 images of 3 classes, loaded as the command line loads it, through every mode."""
  monkeypatch.setattr(image_folder.constants, "DATA_DIR", str(tmp_path / "tfds"))
  fake_data.make_image_folder(tmp_path / "data", size=(40, 48))
  config = _load_config(monkeypatch, "--config=configs/folder.py:smoke", f"--config.dataset.manual_dir={tmp_path}/data",
                        "--config.train.num_steps=2", "--config.train.eval_every_steps=2",
                        "--config.train.checkpoint_every_steps=2")
  workdir = str(tmp_path / "work")
  result = loop.train_and_evaluate(config, workdir)
  assert {"iou/background", "iou/cat", "iou/dog"} <= set(result) and 0 <= result["miou"] <= 1
  assert os.listdir(tmp_path / "tfds" / "image_folders")[0].startswith("data-")
  evaluated = segmentation.evaluate(config, workdir)["validation"]
  assert evaluated["miou"] == pytest.approx(result["miou"])
  written = predict.predict_files(config, workdir, [str(tmp_path / "data" / "images" / "img_01.png")],
                                  str(tmp_path / "predictions"))
  assert written["written"] and not written["failed"] and all(os.path.exists(p) for p in written["written"])
  export.export_workdir(workdir, str(tmp_path / "model.msgpack"))
  _, exported = export.load_exported(str(tmp_path / "model.msgpack"))
  assert (exported.dataset.num_classes, exported.model.num_classes) == (3, 3)
