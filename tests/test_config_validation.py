"""Each bad config value gives one message naming the field, the value and what was expected."""
import pytest

from configs import person_part, shapes, voc
from scaleattn.config import defaults as base
from scaleattn.config import validation as cv


def _validate(config, devices=4, processes=1):
  cv.validate(config, num_data_devices=devices, process_count=processes)


@pytest.mark.parametrize("get_config", [voc.get_config, person_part.get_config, shapes.get_config],
                         ids=["voc", "person_part", "shapes"])
@pytest.mark.parametrize("devices", [1, 2, 4, 8, 16, 32, 64, 256])
def test_shipped_configs_are_valid_on_any_data_axis(get_config, devices):
  """Batches are padded to the device count, so every shipped config starts on the launchers' topologies (a TPU
  v4-8's 4 chips, v4-32's 16, 2 nodes x 8 GPUs) and beyond, one process per 4 or 8 devices as they run."""
  for processes in {1, max(1, devices // 8), max(1, devices // 4)}:
    _validate(get_config(), devices=devices, processes=processes)


@pytest.mark.parametrize("field, value, message", [
    ("model.scales", (), "config.model.scales=(): expected a non-empty tuple"),
    ("model.scales", (1.0, -0.5), "config.model.scales=(1.0, -0.5): expected a non-empty tuple of positive"),
    ("model.scales", (0.5, 0.75), "config.model.scales=(0.5, 0.75): 1.0 must be among the scales"),
    ("eval.scales", (1.5, 0.5), "config.eval.scales=(1.5, 0.5): 1.0 must be among the scales"),
    ("eval.scales", (1.0, 0.5, 1.0), "config.eval.scales=(1.0, 0.5, 1.0): scales must be distinct"),
    ("eval.scales", (1.0, 0.5), "config.eval.scales=(1.0, 0.5): a model trained on config.model.scales=(1.0, 0.75, "
                                "0.5) with fusion 'attention' runs only on those scales; fusions that run on another "
                                "set: ('shared_attention', 'hierarchical', 'average', 'max')"),
    ("model.scales", (1.0, 0.5, 0.5), "scales must be distinct"),
    ("model.fusion.name", "mean", "config.model.fusion.name='mean': expected one of ('attention', 'shared_attention', "
                                  "'hierarchical', 'average', 'max')"),
    ("model.backbone.name", "resnet", "config.model.backbone.name='resnet': expected one of ('largefov', 'resnet50', 'resnet101', 'resnet152')"),
    ("model.backbone.fc_widht", 8, "config.model.backbone.fc_widht: not a setting of backbone 'largefov' (it takes"),
    ("model.fusion.hiden", 8, "config.model.fusion.hiden: not a setting of fusion 'attention' (it takes ('hidden',"),
    ("model.fusion_input", "fc6", "config.model.fusion_input='fc6': expected one of ('features', 'scores')"),
    ("model.conv_impl", "cudnn", "config.model.conv_impl='cudnn': expected one of ('auto', 'xla', 'cpu')"),
    ("model.remat", "all", "config.model.remat='all': expected one of ('none', 'per_scale', 'per_block')"),
    ("train.microbatches", 4, "config.train.microbatches=4: expected a divisor of config.train.batch_size=30, one "
                              "of (1, 2, 3, 5, 6, 10, 15, 30)"),
    ("train.microbatches", 0, "config.train.microbatches=0: expected a divisor"),
    ("model.scale_execution", "pmap", "config.model.scale_execution='pmap'"),
    ("model.dtype", "float16", "config.model.dtype='float16'"),
    ("loss.per_scale_grid", "input", "config.loss.per_scale_grid='input'"),
    ("loss.scale_weights", (1.0,), "expected one weight per scale (3)"),
    ("input.crop_size", 7, "config.input.crop_size=7: expected at least the output stride 8"),
    ("input.random_scale", (1.5, 0.5), "expected 0 < min <= max"),
    ("train.batch_size", 0, "config.train.batch_size=0: expected a positive integer"),
    ("train.num_steps", 0, "config.train.num_steps=0: expected a positive integer"),
    ("optim.name", "lamb", "config.optim.name='lamb'"),
    ("train.on_nonfinite", "ignore", "config.train.on_nonfinite='ignore'"),
    ("eval.tile_size", 5, "config.eval.tile_size=5: expected 0 (whole images) or at least the output stride 8"),
    ("eval.tile_overlap", -8, "config.eval.tile_overlap=-8: expected 0 <= overlap < config.eval.tile_size=0"),
    ("eval.memory_budget_gb", -1.0, "config.eval.memory_budget_gb=-1.0: expected 0 (no budget) or a positive"),
])
def test_bad_values(field, value, message):
  config = base.get_config()
  *path, key = field.split(".")
  section = config
  for name in path:
    section = section[name]
  section[key] = value
  with pytest.raises(cv.ConfigError, match=None) as err:
    _validate(config)
  assert message in str(err.value)


@pytest.mark.parametrize("fusion", ["shared_attention", "hierarchical", "average", "max"])
def test_scale_agnostic_fusions_take_another_inference_scale_set(fusion):
  config = base.get_config()
  config.model.fusion.name, config.eval.scales = fusion, (2.0, 1.5, 1.0, 0.75, 0.5, 0.25)
  _validate(config)
  config.model.scale_execution = "vmap"
  with pytest.raises(cv.ConfigError, match=r"config.eval.scales=\(2.0, .*'vmap' needs every scale <= 1"):
    _validate(config)


def test_single_scale_model_fuses_other_scales_only_without_parameters():
  config = base.get_config()
  config.model.scales, config.eval.scales = (1.0,), (1.0, 0.5)
  for fusion, ok in (("average", True), ("max", True), ("shared_attention", False), ("attention", False)):
    config.model.fusion.name = fusion
    if ok:
      _validate(config)
    else:
      with pytest.raises(cv.ConfigError, match=r"fusions that run on another set: \('average', 'max'\)"):
        _validate(config)


def test_tile_overlap_must_be_smaller_than_the_tile():
  config = base.get_config()
  config.eval.tile_size, config.eval.tile_overlap = 257, 257
  with pytest.raises(cv.ConfigError, match=r"config.eval.tile_overlap=257: expected 0 <= overlap < "
                                           r"config.eval.tile_size=257"):
    _validate(config)


def test_devices_must_split_evenly_over_processes():
  config = base.get_config()
  config.mesh.data = 6
  with pytest.raises(cv.ConfigError, match="config.mesh.data=6: 6 data-parallel devices cannot be split evenly over "
                                           "4 processes"):
    _validate(config, devices=6, processes=4)


def test_all_problems_reported_together():
  config = base.get_config()
  config.model.fusion.name, config.input.crop_size = "sum", 4
  with pytest.raises(cv.ConfigError) as err:
    _validate(config, devices=1)
  assert "config.model.fusion.name='sum'" in str(err.value) and "config.input.crop_size=4" in str(err.value)


def test_class_count_must_match_dataset():
  config = base.get_config()
  cv.check_num_classes(config, [str(i) for i in range(21)])
  with pytest.raises(cv.ConfigError, match="config.dataset.num_classes=21 disagrees with dataset 'voc2012_aug', "
                                           "which has 7"):
    cv.check_num_classes(config, [str(i) for i in range(7)])
