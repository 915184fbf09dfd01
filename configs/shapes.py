"""The embedded default: attention to scale on `scale_shapes`, generated locally, sized for a 2-core CPU.

A narrow LargeFOV (same structure as VGG-16 DeepLab-LargeFOV, fewer channels and layers, smaller fc6
dilation) whose receptive field at scale 1 cannot take in the largest objects, so the coarse scale matters.

  python -m scaleattn.main --config=configs/shapes.py --workdir=workdirs/shapes
  python -m scaleattn.main --config=configs/shapes.py:smoke --workdir=/tmp/smoke   # < 2 minutes, for tests
"""
import ml_collections

from configs import base


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base.get_config()
  c.dataset.name = "scale_shapes"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.test_split = "test"
  c.dataset.num_classes = 5
  c.dataset.builder_config = "default"

  c.input.crop_size = 129
  c.input.eval_size = 193
  c.input.random_scale = (1.0, 1.0)

  c.model.block_widths = (16, 32, 64, 64, 64)
  c.model.block_depths = (1, 1, 2, 2, 2)
  c.model.fc_width = 128
  c.model.fc6_dilation = 2
  c.model.dropout_rate = 0.1
  c.model.attention_hidden = 64
  c.model.attention_dropout = 0.1

  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 1e-5
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  c.optim.lr_multipliers = ()

  c.train.batch_size = 8
  c.train.num_steps = 1200
  c.train.log_every_steps = 50
  c.train.eval_every_steps = 400
  c.train.checkpoint_every_steps = 200
  c.eval.batch_size = 8

  if variant == "smoke":
    c.dataset.builder_config = "smoke"
    c.input.crop_size = 65
    c.input.eval_size = 81
    c.model.block_widths = (4, 8, 8, 8, 8)
    c.model.block_depths = (1, 1, 1, 1, 1)
    c.model.fc_width = 16
    c.model.attention_hidden = 8
    c.model.scales = (1.0, 0.5)
    c.train.batch_size = 4
    c.train.num_steps = 6
    c.train.log_every_steps = 2
    c.train.eval_every_steps = 3
    c.train.checkpoint_every_steps = 3
    c.eval.batch_size = 4
    c.eval.num_examples = 1
  elif variant:
    raise ValueError(f"configs/shapes.py: unknown variant {variant!r}; expected '' or 'smoke'")
  return c
