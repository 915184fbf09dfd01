"""Your own data: a folder of images/, masks/ and classes.txt or classes.json (the layout and mask modes are in
scaleattn/data/image_folder.py; check a folder with `python -m scaleattn.doctor DIR`). The number of
classes and their names (config.dataset.class_names) are read from the folder's classes file whenever the config
is read, so they follow --config.dataset.manual_dir; the prepared copy goes to a data_dir of its own per folder (image_folder.prepared_dir)
unless --config.dataset.data_dir is given.

  python -m scaleattn.main --config=configs/folder.py --workdir=W --config.dataset.manual_dir=DIR \
      --config.init_from=vgg16_largefov.npz          # the paper's recipe (scaleattn/config/defaults.py) from ImageNet VGG-16
  python -m scaleattn.main --config=configs/folder.py:smoke --workdir=W --config.dataset.manual_dir=DIR
                                                      # configs/shapes.py's smoke model: a few steps, for tests

Add --config.dataset.test_split=test when the folder has splits/test.txt.
"""
import ml_collections

from configs import shapes
from scaleattn.config import defaults as base
from scaleattn.data import folder_format, image_folder


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in ("", "smoke"):
    raise ValueError(f"configs/folder.py: unknown variant {variant!r}; expected '' or 'smoke'")
  c = shapes.get_config("smoke") if variant == "smoke" else base.get_config()
  c.dataset.name = image_folder.NAME
  c.dataset.builder_config = None
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.test_split = None
  manual_dir = c.dataset.get_ref("manual_dir")
  c.dataset.class_names = image_folder.from_folder(manual_dir, folder_format.class_names, tuple)
  c.dataset.num_classes = image_folder.from_folder(manual_dir, folder_format.num_classes, int)
  c.dataset.data_dir = image_folder.from_folder(manual_dir, image_folder.prepared_dir, str)
  return c
