"""The label doctor on fabricated folders: each good mask mode passes with the pixel shares of the labels drawn;
each defect is reported once, with its kind, severity and file, and errors give exit status 1."""
import json
import os
import subprocess
import sys

import fake_data
import numpy as np
import pytest
from PIL import Image

from scaleattn.data import doctor, folder_format
from scaleattn.visualize import voc_palette

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, W = doctor.ERROR, doctor.WARNING
GOOD_TABLE_PALETTE = np.concatenate([np.asarray(fake_data.FOLDER_COLOURS, np.uint8), fake_data.PALETTE[3:]])


def _folder(tmp_path, **kw):
  root = tmp_path / "data"
  return root, fake_data.make_image_folder(root, **kw)


def _found(report):
  return {(p.severity, p.kind, os.path.relpath(p.path, report.folder)) for p in report.problems}


@pytest.mark.parametrize("mode, kw, words", [
    ("L", {}, "index masks"),
    ("P", {"palette": voc_palette()}, "palette masks"),
    ("RGB", {"colours": fake_data.FOLDER_COLOURS, "ignore_colour": (255, 255, 255)}, "colour masks"),
])
def test_good_folders_pass_with_the_pixel_shares_drawn(tmp_path, capsys, mode, kw, words):
  root, truth = _folder(tmp_path, mode=mode, **kw)
  report = doctor.diagnose(str(root))
  assert report.problems == [] and report.modes == {mode: 12}
  assert report.summary() == f"12 images, 3 classes, {words}: 0 errors, 0 warnings"
  assert sorted(report.splits["train"] + report.splits["validation"]) == sorted(truth)
  for split, stems in report.splits.items():
    labels = np.concatenate([truth[s].ravel() for s in stems])
    expected = [np.sum(labels == c) for c in (0, 1, 2, 255)]  # background, cat, dog, ignore
    np.testing.assert_array_equal(report.counts[split], expected)
  assert doctor.main([str(root)]) == 0
  assert capsys.readouterr().out.rstrip().endswith(report.summary())


def _rewrite(path, label, mode="L"):
  Image.fromarray(np.asarray(label, np.uint8), mode=mode).save(path)


def _palette_mask(path, label, palette):
  im = Image.fromarray(np.asarray(label, np.uint8), mode="P")
  im.putpalette(np.asarray(palette, np.uint8).ravel().tolist())
  im.save(path)


def _truncate_image(root, truth):
  path = root / "images" / "img_00.jpg"
  path.write_bytes(path.read_bytes()[:150])


def _garbage_mask(root, truth):
  (root / "masks" / "img_01.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def _drop_mask(root, truth):
  os.remove(root / "masks" / "img_03.png")


def _extra_mask(root, truth):
  _rewrite(root / "masks" / "extra.png", truth["img_00"])


def _duplicate_image(root, truth):
  Image.new("RGB", (14, 10)).save(root / "images" / "img_00.png")


def _small_mask(root, truth):
  _rewrite(root / "masks" / "img_04.png", np.zeros((10, 12)))


def _jpeg_mask(root, truth):
  os.remove(root / "masks" / "img_02.png")
  Image.fromarray(truth["img_02"]).save(root / "masks" / "img_02.jpg")


def _grey_alpha_mask(root, truth):
  Image.fromarray(truth["img_03"]).convert("LA").save(root / "masks" / "img_03.png")


def _value_7(root, truth):
  label = truth["img_05"].copy()
  label[5, 5] = 7
  _rewrite(root / "masks" / "img_05.png", label)


def _one_based(root, truth):
  for stem, label in truth.items():
    _rewrite(root / "masks" / f"{stem}.png", np.where(label == 255, 255, label + 1))


def _grey_rgb_mask(root, truth):
  Image.fromarray(truth["img_06"]).convert("RGB").save(root / "masks" / "img_06.png")


def _voc_rgb_mask(root, truth):
  Image.fromarray(voc_palette()[truth["img_06"]]).save(root / "masks" / "img_06.png")


def _odd_colour(root, truth):
  path = root / "masks" / "img_07.png"
  rgb = np.asarray(Image.open(path)).copy()
  rgb[4, 4] = (1, 2, 3)
  Image.fromarray(rgb).save(path)


def _swapped_table_palette(root, truth):  # img_08 is 'cat' (1): its palette draws 1 in dog's colour
  _palette_mask(root / "masks" / "img_08.png", truth["img_08"], GOOD_TABLE_PALETTE[[0, 2, 1, *range(3, 256)]])


def _swapped_voc_palette(root, truth):  # img_09 is 'dog' (2)
  _palette_mask(root / "masks" / "img_09.png", truth["img_09"], voc_palette()[[0, 2, 1, *range(3, 256)]])


def _colour_greys(root, truth):  # img_01 is 'dog': its grey level under the table's colours
  label = truth["img_01"]
  grey = np.asarray(Image.fromarray(np.asarray(fake_data.FOLDER_COLOURS, np.uint8)[None]).convert("L"))[0]
  _rewrite(root / "masks" / "img_01.png", np.where(label == 2, grey[2], label))


def _no_classes(root, truth):
  os.remove(root / "classes.txt")


def _bad_json(root, truth):
  os.remove(root / "classes.txt")
  (root / "classes.json").write_text(json.dumps({"names": ["a", "b", "c"], "colors": [[0, 0, 0]] * 3}))


def _splits(root, train, validation, name="validation"):
  (root / "splits").mkdir()
  (root / "splits" / "train.txt").write_text("\n".join(train) + "\n")
  (root / "splits" / f"{name}.txt").write_text("\n".join(validation) + "\n")


def _val_txt(root, truth):
  _splits(root, sorted(truth)[:10], sorted(truth)[10:], name="val")


def _unknown_stem(root, truth):
  _splits(root, sorted(truth)[:11] + ["nope"], sorted(truth)[11:])


def _listed_twice(root, truth):
  _splits(root, sorted(truth), sorted(truth)[11:])


def _unlisted(root, truth):
  _splits(root, sorted(truth)[:9], sorted(truth)[9:11])


def _bird(root, truth):
  (root / "classes.txt").write_text("background\ncat\ndog\nbird\n")


TABLE = {"colours": fake_data.FOLDER_COLOURS}
DEFECTS = [  # (name, how the folder is made, how it is broken, {(severity, kind, file)}, words of the message)
    ("unreadable image", {}, _truncate_image, {(E, "unreadable", "images/img_00.jpg")}, "cannot read image"),
    ("unreadable mask", {}, _garbage_mask, {(E, "unreadable", "masks/img_01.png")}, "cannot read mask"),
    ("image without mask", {}, _drop_mask, {(E, "no_mask", "images/img_03.png")}, "no mask masks/img_03.png"),
    ("mask without image", {}, _extra_mask, {(E, "no_image", "masks/extra.png")}, "no image images/extra.*"),
    ("two images, one stem", {}, _duplicate_image, {(E, "duplicate_stem", "images/img_00.png")},
     "['img_00.jpg', 'img_00.png']"),
    ("size mismatch", {}, _small_mask, {(E, "size_mismatch", "masks/img_04.png")}, "mask is 10x12 but image images/img_04.jpg is 10x14"),
    ("JPEG mask", {}, _jpeg_mask, {(E, "lossy_mask", "masks/img_02.jpg")}, "save masks as PNG"),
    ("LA mask", {}, _grey_alpha_mask, {(E, "unsupported_mode", "masks/img_03.png")}, "mode 'LA'"),
    ("value 7", {}, _value_7, {(E, "out_of_range", "masks/img_05.png")}, "1 pixel with values [7] outside 0..2"),
    ("1-based", {}, _one_based, {(E, "one_based", "masks"), (W, "class_absent", "classes.txt")}, "reach 3"),
    ("grey RGB mask", {}, _grey_rgb_mask,
     {(E, "rgb_without_colours", "masks/img_06.png"), (W, "mixed_masks", "masks")}, "all grey"),
    ("VOC RGB mask", {}, _voc_rgb_mask,
     {(E, "rgb_without_colours", "masks/img_06.png"), (W, "mixed_masks", "masks")}, "VOC colour-map colours"),
    ("odd colour", {"mode": "RGB", "ignore_colour": (255, 255, 255), **TABLE}, _odd_colour,
     {(E, "unknown_colour", "masks/img_07.png")}, "1 pixel in 1 colour not in classes.json: [1, 2, 3]"),
    ("palette against table", {"mode": "P", "palette": GOOD_TABLE_PALETTE, **TABLE}, _swapped_table_palette,
     {(E, "palette_conflict", "masks/img_08.png")},
     "index 1 ('cat') is drawn in [30, 200, 30], the colour classes.json gives to 'dog'"),
    ("palette against VOC", {"mode": "P", "palette": voc_palette()}, _swapped_voc_palette,
     {(W, "palette_reordered", "masks/img_09.png")}, "the colour the VOC colour map gives to 'cat'"),
    ("greyscaled colour mask", TABLE, _colour_greys, {(E, "out_of_range", "masks/img_01.png")},
     "grey levels of the colours of ['dog'] in classes.json"),
    ("no classes file", {}, _no_classes, {(E, "classes_file", ".")}, "no classes.txt or classes.json"),
    ("classes.json key", {}, _bad_json, {(E, "classes_file", "classes.json")}, "unknown key 'colors'"),
    ("val.txt", {}, _val_txt, {(E, "split_file", "splits/val.txt"), (E, "split_file", "splits"),
                               (W, "unused_image", "splits")}, "no validation.txt"),
    ("unknown stem", {}, _unknown_stem, {(E, "split_stem", "splits/train.txt")}, "'nope': no image"),
    ("stem in two splits", {}, _listed_twice, {(E, "split_stem", "splits/validation.txt")},
     "'img_11' is also listed in train.txt"),
    ("unlisted pairs", {}, _unlisted, {(W, "unused_image", "splits")}, "1 image/mask pair in no split list"),
    ("class without pixels", {}, _bird, {(W, "class_absent", "classes.txt")}, "class 'bird' has no pixel in train"),
]


@pytest.mark.parametrize("make, damage, expected, words", [d[1:] for d in DEFECTS], ids=[d[0] for d in DEFECTS])
def test_each_defect_is_reported_with_its_file(tmp_path, capsys, make, damage, expected, words):
  root, truth = _folder(tmp_path, **make)
  damage(root, truth)
  report = doctor.diagnose(str(root))
  assert _found(report) == expected
  assert any(words in p.message for p in report.problems), [p.message for p in report.problems]
  errors = sum(severity == E for severity, _, _ in expected)
  assert doctor.main([str(root)]) == (1 if errors else 0)
  assert f": {errors} error{'s' * (errors != 1)}, " in capsys.readouterr().out.splitlines()[-1]


def test_one_based_labels_are_not_also_out_of_range_but_higher_values_are(tmp_path):
  root, truth = _folder(tmp_path)
  _one_based(root, truth)
  label = np.where(truth["img_05"] == 255, 255, truth["img_05"] + 1)
  label[0, 0] = 9
  _rewrite(root / "masks" / "img_05.png", label)
  found = {p.kind: p for p in doctor.diagnose(str(root)).problems}
  assert set(found) == {"one_based", "out_of_range", "class_absent"}
  assert "values [9] outside" in found["out_of_range"].message


def test_too_few_images(tmp_path):
  root, _ = _folder(tmp_path, n=1)
  assert _found(doctor.diagnose(str(root))) == {(E, "too_few_images", ".")}


def test_seeded_split_is_the_documented_rule(tmp_path):
  """10% validation (rounded, at least 1): the first of a default_rng(0) permutation of the sorted stems."""
  stems = [f"s{k:02d}" for k in range(25)]
  split = folder_format.seeded_splits(stems[::-1])
  order = np.random.default_rng(0).permutation(25)
  assert split["validation"] == sorted(stems[i] for i in order[:2])
  assert split["train"] == sorted(set(stems) - set(split["validation"]))


def test_command_line_prints_errors_without_traceback(tmp_path):
  root, truth = _folder(tmp_path)
  _small_mask(root, truth)
  out = subprocess.run([sys.executable, "-m", "scaleattn.doctor", str(root)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode == 1, out.stderr[-2000:]
  assert "Traceback" not in out.stderr and "Warning" not in out.stderr, out.stderr[-2000:]
  assert "error   size_mismatch       masks/img_04.png: mask is 10x12 but image" in out.stdout
  assert out.stdout.splitlines()[-1] == "12 images, 3 classes, index masks: 1 error, 0 warnings"
