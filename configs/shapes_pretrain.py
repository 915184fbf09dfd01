"""The stand-in for ImageNet pretraining: configs/shapes.py's backbone trained once, at scale 1 alone, to segment
five other outlines (scale_shapes 'pretrain': ring, star, ellipse, ell, bowtie) on images drawn apart from the
evaluation set's. configs/shapes_paper.py fine-tunes every Table-1 cell from its backbone, as the paper fine-tunes
every cell from the same ImageNet VGG-16; fc8 is not carried over (launch/paper_protocol.py).

The recipe is configs/shapes.py's from-scratch one (Adam, cosine), with more steps: pretraining is the larger
training, as ImageNet's is; how the backbone was trained is not part of the paper's protocol.

  python -m scaleattn.main --config=configs/shapes_pretrain.py --workdir=W
"""
import ml_collections

from configs import shapes
from scaleattn.data import scale_shapes


def get_config() -> ml_collections.ConfigDict:
  c = shapes.get_config("ablation")
  c.dataset.builder_config = "pretrain"
  c.dataset.class_names = scale_shapes.PRETRAIN_CLASS_NAMES
  c.dataset.num_classes = len(scale_shapes.PRETRAIN_CLASS_NAMES)
  c.model.scales = (1.0,)
  c.loss.extra_supervision = False
  c.train.num_steps = 1600
  c.train.eval_every_steps = c.train.num_steps
  return c
