"""PASCAL VOC 2012 + SBD (train_aug), the paper's recipe: VGG-16 LargeFOV, scales (1, 0.75, 0.5),
attention with extra supervision, batch 30, SGD 1e-3 (x10 fc8 and attention), x0.1 every 2000 steps, 6000 steps.

  python -m scaleattn.main --config=configs/voc.py --workdir=/path/to/workdir \
      --config.dataset.manual_dir=/path/to/downloads

The backbone starts from ImageNet VGG-16 (init_from='imagenet:vgg16': torchvision's file, downloaded once into
~/.cache/scaleattn/weights and verified; offline, put it there or pass its path). --config.init_from='' trains from
scratch, far from the paper's numbers.
"""
import ml_collections

from scaleattn.config import defaults as base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.init_from = "imagenet:vgg16"
  c.expects_pretrained = True
  return c
