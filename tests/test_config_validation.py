"""Each bad config value gives one message naming the field, the value and what was expected."""
import pytest

from configs import base
from scaleattn import config_validation as cv


def _validate(config, devices=4, processes=1):
  cv.validate(config, num_data_devices=devices, process_count=processes)


def test_paper_config_is_valid_on_one_and_two_devices():
  config = base.get_config()
  for devices in (1, 2):
    _validate(config, devices=devices)


@pytest.mark.parametrize("field, value, message", [
    ("model.scales", (), "config.model.scales=(): expected a non-empty tuple"),
    ("model.scales", (1.0, -0.5), "config.model.scales=(1.0, -0.5): expected a non-empty tuple of positive"),
    ("model.scales", (0.5, 1.0), "the first scale must be 1.0"),
    ("model.scales", (1.0, 0.5, 0.5), "scales must be distinct"),
    ("model.fusion", "mean", "config.model.fusion='mean': expected one of ('attention', 'average', 'max')"),
    ("model.scale_execution", "pmap", "config.model.scale_execution='pmap'"),
    ("model.dtype", "float16", "config.model.dtype='float16'"),
    ("loss.per_scale_grid", "input", "config.loss.per_scale_grid='input'"),
    ("loss.scale_weights", (1.0,), "expected one weight per scale (3)"),
    ("input.crop_size", 7, "config.input.crop_size=7: expected at least the output stride 8"),
    ("input.random_scale", (1.5, 0.5), "expected 0 < min <= max"),
    ("train.batch_size", 30, "config.train.batch_size=30: expected a positive multiple of the 4 data-parallel"),
    ("train.num_steps", 0, "config.train.num_steps=0: expected a positive integer"),
    ("optim.name", "lamb", "config.optim.name='lamb'"),
    ("train.on_nonfinite", "ignore", "config.train.on_nonfinite='ignore'"),
])
def test_bad_values(field, value, message):
  config = base.get_config()
  config.train.batch_size = 32
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(cv.ConfigError, match=None) as err:
    _validate(config)
  assert message in str(err.value)


def test_batch_must_divide_over_processes():
  config = base.get_config()
  config.train.batch_size, config.eval.batch_size = 6, 6
  _validate(config, devices=2, processes=2)
  config.eval.batch_size = 3
  with pytest.raises(cv.ConfigError, match="config.eval.batch_size=3"):
    _validate(config, devices=1, processes=2)


def test_all_problems_reported_together():
  config = base.get_config()
  config.model.fusion, config.input.crop_size = "sum", 4
  with pytest.raises(cv.ConfigError) as err:
    _validate(config, devices=1)
  assert "config.model.fusion='sum'" in str(err.value) and "config.input.crop_size=4" in str(err.value)


def test_class_count_must_match_dataset():
  config = base.get_config()
  cv.check_num_classes(config, [str(i) for i in range(21)])
  with pytest.raises(cv.ConfigError, match="num_classes=21 disagrees with dataset 'voc2012_aug', which has 7"):
    cv.check_num_classes(config, [str(i) for i in range(7)])
