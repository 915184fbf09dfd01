"""PASCAL-Person-Part (7 classes) with DeepLab v2 ResNet-101 + ASPP, the recipe of configs/deeplab_v2.py.

  python -m scaleattn.main --config=configs/deeplab_v2_person_part.py --workdir=/path/to/workdir \
      --config.dataset.manual_dir=/path/to/downloads [--config.model.fusion.name=attention]
"""
import ml_collections

from configs import deeplab_v2


def get_config() -> ml_collections.ConfigDict:
  c = deeplab_v2.get_config()
  c.dataset.name = "pascal_person_part"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "val"
  c.dataset.num_classes = 7
  return c
