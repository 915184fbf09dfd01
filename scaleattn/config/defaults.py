"""Base configuration: the paper's recipe (DeepLab-LargeFOV on VGG-16, attention over scales 1, 0.75, 0.5
with extra supervision), which the dataset configs override.

Every field a run needs lives here, so a run is reproducible from its config and seed.
"""
import ml_collections

from scaleattn.data.preprocessing import CAFFE_MEAN_RGB

# Caffe DeepLab learning-rate multipliers: fc8 and the attention head x10 (biases x20), other biases x2.
# The first pattern that matches a parameter path (e.g. 'backbone/fc8/kernel') wins.
PAPER_LR_MULTIPLIERS = (
    (r"backbone/fc8/kernel", 10.0),
    (r"backbone/fc8/bias", 20.0),
    (r"fusion/.*/kernel", 10.0),
    (r"fusion/.*/bias", 20.0),
    (r".*/bias", 2.0),
)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Weights the run starts from: a file in any layout `python -m scaleattn.convert` recognises (or one it wrote),
  # or named weights ('imagenet:vgg16', fetched once); '' starts from scratch. A resume always wins over it.
  c.init_from = ""
  # The recipe's published numbers assume pretrained weights: starting from scratch is then warned about.
  c.expects_pretrained = False

  c.dataset = ml_collections.ConfigDict(dict(
      name="voc2012_aug",
      data_dir=ml_collections.FieldReference(None, field_type=str),
      manual_dir=ml_collections.FieldReference(None, field_type=str),
      builder_config=ml_collections.FieldReference(None, field_type=str),
      train_split="train_aug",
      eval_split="val",
      test_split=ml_collections.FieldReference(None, field_type=str),
      num_classes=21,
  ))

  c.input = ml_collections.ConfigDict(dict(
      crop_size=321,
      eval_size=513,
      mean_rgb=CAFFE_MEAN_RGB,
      random_mirror=True,
      random_scale=(1.0, 1.0),  # (0.5, 1.5) as in DeepLab v2, (0.6, 1.4) as in "Attention+".
      worker_count=0,
      prefetch=2,
      # A record that does not decode or fails its checks (label size and values): 'raise' (stop, naming split and
      # record) | 'skip' (training: an ignored padding example instead, counted in the 'skipped_records' scalar;
      # evaluation: left out).
      on_bad_record="raise",
  ))

  c.model = ml_collections.ConfigDict(dict(
      num_classes=c.dataset.get_ref("num_classes"),
      scales=(1.0, 0.75, 0.5),
      # The backbone and the fusion: `name` picks a factory in scaleattn/models/registry.py, the other fields are
      # its keywords.
      backbone=ml_collections.ConfigDict(dict(
          name="largefov",
          block_widths=(64, 128, 256, 512, 512),
          block_depths=(2, 2, 3, 3, 3),
          fc_width=1024,
          conv5_dilation=2,
          fc6_dilation=12,
          fc6_kernel=3,  # odd; fc6's kernel and dilation set the field of view (DeepLab's Table 2)
          stride1_pools=True,  # pool4 and pool5 (3x3, stride 1); False drops them
          dropout_rate=0.5,
          fc8_init_std=ml_collections.FieldReference(0.01, field_type=float),  # None: LeCun normal
      )),
      fusion=ml_collections.ConfigDict(dict(
          # 'attention' (the paper's: one logit per trained scale) | 'shared_attention' | 'hierarchical' (Tao et
          # al. 2020) | 'average' | 'max'; all but 'attention' also run on scale sets they were not trained on.
          name="attention",
          hidden=512,
          dropout_rate=0.5,
      )),
      fusion_input="features",  # what the fusion's head reads: 'features' (fc7, the paper's) | 'scores' (fc8)
      scale_execution="loop",  # 'loop' | 'vmap'
      input_scale=1.0,  # images (RGB 0..255 minus mean) are multiplied by this; 1.0 for Caffe-trained VGG-16
      dtype="float32",  # 'float32' | 'bfloat16' (compute; parameters stay float32)
      conv_impl="auto",  # 'auto' (by the mesh's platform) | 'xla' | 'cpu' (scaleattn/kernels, CPU only)
      remat="none",  # 'none' | 'per_scale' | 'per_block': recompute the backbone in the backward pass
  ))

  c.loss = ml_collections.ConfigDict(dict(
      extra_supervision=True,
      scale_weights=ml_collections.FieldReference(None, field_type=tuple),
      # Where each scale's own loss is taken: 'authors' (scales >= 0.75 on the scale-1 grid, smaller ones on
      # their own grid, as the authors' configs), 'output' (all on the scale-1 grid), 'native' (all on their own).
      per_scale_grid="authors",
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name="sgd",  # 'sgd' (Caffe-style momentum) | 'adam'
      learning_rate=1e-3,
      momentum=0.9,
      weight_decay=5e-4,  # kernels only, never biases
      schedule="step",  # 'step' | 'poly' | 'cosine' | 'constant'
      decay_every_steps=2000,
      decay_factor=0.1,
      warmup_steps=0,
      lr_multipliers=PAPER_LR_MULTIPLIERS,
      grad_clip_norm=0.0,  # 0 = off
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=30,  # global; padded with ignored examples to a multiple of the data-parallel devices
      microbatches=1,  # gradient accumulation: the batch runs in this many slices, one update (Caffe: 3 x 10)
      num_steps=6000,
      log_every_steps=20,
      eval_every_steps=2000,
      checkpoint_every_steps=500,
      # The step watchdog (scaleattn/training/watchdog.py): a train step, an evaluation batch or a checkpoint save
      # that takes longer ends the process with status 75 and every thread's stack in the log, so that a stalled
      # multi-host job is restarted (and resumes) instead of holding its machines. 900 s is 10x a batch-30 step of
      # the 3-scale VGG-16 on a CPU; the first beats of each phase compile, and get first_steps_timeout_seconds
      # (an hour: a large model's compile with autotuning on a loaded host). 0 turns the watchdog off.
      step_timeout_seconds=900,
      first_steps_timeout_seconds=3600,
      keep_checkpoints=2,
      keep_best=1,
      on_nonfinite="raise",  # 'raise' | 'skip' (skip the step's update and count it)
      profile_steps=0,  # 0 = no profiler trace
  ))

  c.eval = ml_collections.ConfigDict(dict(
      # Inference scales (evaluation and prediction); empty: config.model.scales. 1.0 must be among them; scales
      # above 1 are allowed. Another set than the training one needs a scale-agnostic fusion.
      scales=(),
      batch_size=8,
      flip=False,
      # Tiled (sliding-window) inference, scaleattn/inference/tiling.py: 0 runs whole images; otherwise tiles of
      # this many pixels overlapping by tile_overlap (prediction also tiles images larger than input.eval_size, with
      # eval_size tiles overlapping by at most half a tile). tile_overlap unset: the backbone's exact overlap where
      # it fits the tile, else the largest multiple of the output stride below the tile (not exact; logged).
      # memory_budget_gb > 0 (GiB per device): the whole image if its compiled step fits, else the largest tile
      # whose compiled steps do, then the most tiles per step that still fit (else tiles_per_step: tiles stacked
      # into one backbone call; a last, partial group is padded with dummy tiles, so it computes up to
      # tiles_per_step - 1 tiles for nothing).
      tile_size=0,
      tile_overlap=ml_collections.FieldReference(None, field_type=int),
      memory_budget_gb=0.0,
      tiles_per_step=4,
      # What runs at every evaluation step, by name (scaleattn/evaluation/evaluators.py): 'segmentation' (mIoU
      # and the by-size statistics on dataset.eval_split), 'panels' (the num_examples images below).
      evaluators=("segmentation", "panels"),
      # Validation images shown with ground truth, weight maps and prediction: in TensorBoard at every evaluation,
      # as files in WORKDIR/examples at the end of training. 0 = none.
      num_examples=4,
      # Edges (pixels) of the object-size bins for the attention-by-size statistics (datasets with
      # per-pixel instance sizes only).
      size_bins=(16, 32, 64, 128),
      # Fully connected CRF on the fused scores (scaleattn/crf/), off by default: DeepLab-LargeFOV's released VOC
      # settings, its kernel-normalised messages (the weights were tuned for those).
      crf=ml_collections.ConfigDict(dict(
          enabled=False,
          iterations=10,
          bilateral_weight=4.0,
          bilateral_xy_std=121.0,
          bilateral_rgb_std=5.0,
          gaussian_weight=3.0,
          gaussian_xy_std=3.0,
          normalize=True,
      )),
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=-1))  # -1: every device on the data axis.
  # Multi-process runs (jax.distributed.initialize): JAX's defaults, for real clusters. A process that stops sending
  # heartbeats (killed, its host lost) stops every other process after about heartbeat_timeout_seconds.
  c.distributed = ml_collections.ConfigDict(dict(
      initialization_timeout_seconds=300,
      heartbeat_timeout_seconds=100,
      shutdown_timeout_seconds=300,
  ))
  return c
