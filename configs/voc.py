"""PASCAL VOC 2012 + SBD (train_aug), the paper's recipe: VGG-16 LargeFOV, scales (1, 0.75, 0.5),
attention with extra supervision, batch 30, SGD 1e-3 (x10 fc8 and attention), x0.1 every 2000 steps, 6000 steps.

  python -m scaleattn.main --config=configs/voc.py --workdir=/path/to/workdir \
      --config.dataset.manual_dir=/path/to/downloads
"""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  return base.get_config()
