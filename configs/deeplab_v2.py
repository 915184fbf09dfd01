"""DeepLab v2 (ResNet-101 + ASPP, output stride 8) on PASCAL VOC 2012 + SBD (train_aug), its MSC recipe: scales
(1, 0.75, 0.5) fused by max, a loss on every scale (on its own grid, as DeepLab v2's shrunk labels) and on the
fused map, 321 x 321 crops, batch 10, SGD momentum 0.9, learning rate 2.5e-4 (x10 kernels, x20 biases for ASPP and
the attention head) with poly decay (power 0.9) over 20,000 steps, weight decay 5e-4, frozen BatchNorm.

  python -m scaleattn.main --config=configs/deeplab_v2.py --workdir=/path/to/workdir \
      --config.dataset.manual_dir=/path/to/downloads
  # the paper's attention model on the same backbone:
  ... --config.model.fusion.name=attention

The backbone has DeepLab v2's (MSRA) layout, a stage's first block striding in its 1x1 reduce convolution, as the
authors' caffemodels and deeplab-pytorch's checkpoints do, so those run as they are (--config.init_from=FILE). It
starts from torchvision's ImageNet ResNet-101 (init_from='imagenet:resnet101'), which strides in the 3x3: those
weights initialise this layout (logged); --config.model.backbone.stride_in_3x3=True builds torchvision's layout.
"""
import ml_collections

from scaleattn.config import defaults as base

# First match wins (paths as 'backbone/aspp/c0/kernel'); ResNet's convolutions have no biases and BatchNorm is
# state, not parameters, so only ASPP and the fusion head have biases.
DEEPLAB_V2_LR_MULTIPLIERS = (
    (r"backbone/aspp/.*/kernel", 10.0),
    (r"backbone/aspp/.*/bias", 20.0),
    (r"fusion/.*/kernel", 10.0),
    (r"fusion/.*/bias", 20.0),
    (r".*/bias", 2.0),
)


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.init_from = "imagenet:resnet101"
  c.expects_pretrained = True
  c.input.random_scale = (0.5, 1.5)  # DeepLab v2's scale augmentation
  c.model.backbone = ml_collections.ConfigDict(dict(
      name="resnet101",  # 'resnet50' | 'resnet101' | 'resnet152'
      width=64,
      output_stride=8,  # 8: stages 4 and 5 dilated by 2 and 4; 16: stage 4 strided, stage 5 dilated by 2
      stride_in_3x3=False,  # MSRA/Caffe's layout (the authors' files, deeplab-pytorch); True: torchvision's
      aspp_dilations=(6, 12, 18, 24),
      aspp_init_std=0.01,
      bn_eps=1e-5,
  ))
  c.model.fusion.name = "max"
  c.loss.extra_supervision = True
  c.loss.per_scale_grid = "native"
  c.optim.learning_rate = 2.5e-4
  c.optim.schedule = "poly"
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.lr_multipliers = DEEPLAB_V2_LR_MULTIPLIERS
  c.train.batch_size = 10
  c.train.num_steps = 20_000
  return c
