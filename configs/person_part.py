"""PASCAL-Person-Part (7 classes), the paper's recipe as for VOC.

  python -m scaleattn.main --config=configs/person_part.py --workdir=/path/to/workdir \
      --config.dataset.manual_dir=/path/to/downloads

The backbone starts from ImageNet VGG-16, as for VOC (init_from='imagenet:vgg16'; '' trains from scratch).
"""
import ml_collections

from scaleattn.config import defaults as base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.init_from = "imagenet:vgg16"
  c.expects_pretrained = True
  c.dataset.name = "pascal_person_part"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "val"
  c.dataset.num_classes = 7
  return c
