"""The recipe's values have one source, scaleattn/config/defaults.py: the modules it configures declare no defaults
for them (a module built without the config fails instead of silently using other numbers), the convert command
reads its defaults from it, and the model still builds from it."""
import dataclasses
import inspect

import jax
import jax.numpy as jnp
import pytest

from scaleattn import convert
from scaleattn.config import defaults
from scaleattn.models import fusion, fusion_nnx, registry
from scaleattn.models.largefov import DeepLabLargeFOV
from scaleattn.models.multiscale import MultiScaleNet

NOT_RECIPE = {"dtype", "conv_impl", "num_scales", "parent", "name"}  # settings the config does not fix


def defaulted(cls) -> set[str]:
  """The dataclass fields of `cls` that have a default."""
  return {f.name for f in dataclasses.fields(cls)
          if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def recipe_keys(sub) -> set[str]:
  return {k for k in sub if k != "name"}


def test_largefov_declares_no_recipe_defaults():
  backbone = defaults.get_config().model.backbone
  assert recipe_keys(backbone) == {"block_widths", "block_depths", "fc_width", "conv5_dilation", "fc6_dilation",
                                   "fc6_kernel", "stride1_pools", "dropout_rate", "fc8_init_std"}
  fields = {f.name for f in dataclasses.fields(DeepLabLargeFOV)}
  assert recipe_keys(backbone) <= fields
  assert defaulted(DeepLabLargeFOV) == {"dtype", "conv_impl"} | (NOT_RECIPE & fields)
  assert set(registry.options(DeepLabLargeFOV)) == recipe_keys(backbone)  # and the config sets every one
  with pytest.raises(TypeError, match="missing"):
    DeepLabLargeFOV(21)


def test_multiscale_net_declares_no_recipe_defaults():
  for name in ("scales", "scale_execution", "input_scale", "remat"):
    assert name in defaults.get_config().model
  assert not defaulted(MultiScaleNet) & {"backbone", "fusion", "scales", "scale_execution", "input_scale", "remat"}
  assert defaulted(MultiScaleNet) <= NOT_RECIPE


@pytest.mark.parametrize("cls", [fusion.Fusion, *fusion.FUSIONS.values()], ids=lambda c: c.__name__)
def test_fusions_declare_no_recipe_defaults(cls):
  assert recipe_keys(defaults.get_config().model.fusion) == {"hidden", "dropout_rate"}
  assert {"hidden", "dropout_rate"} <= {f.name for f in dataclasses.fields(cls)}
  assert defaulted(cls) == {"num_scales", "dtype", "parent", "name"}
  assert set(registry.options(cls)) == {"hidden", "dropout_rate"}


def test_nnx_fusion_declares_no_recipe_defaults():
  params = inspect.signature(fusion_nnx.ScaleFusion.__init__).parameters
  assert params["hidden"].default is inspect.Parameter.empty
  assert params["dropout_rate"].default is inspect.Parameter.empty
  with pytest.raises(TypeError, match="hidden"):
    fusion_nnx.ScaleFusion("average", 2)


def test_the_fusion_front_door_names_what_is_missing_and_the_papers_values():
  with pytest.raises(TypeError, match=r"'attention'.*hidden and dropout_rate are required.*hidden=512, "
                     r"dropout_rate=0\.5"):
    fusion.ScaleFusion("attention", num_scales=2)
  with pytest.raises(TypeError, match="dropout_rate is required"):
    fusion.ScaleFusion("max", hidden=8)
  module = fusion.ScaleFusion("attention", num_scales=2, hidden=8, dropout_rate=0.25)
  assert (module.num_scales, module.hidden, module.dropout_rate) == (2, 8, 0.25)


def test_the_model_builds_from_the_defaults_with_their_values():
  cfg = defaults.get_config().model
  model = registry.build_model(cfg)
  for key in recipe_keys(cfg.backbone):
    assert getattr(model.backbone, key) == cfg.backbone[key], key
  assert (model.fusion.hidden, model.fusion.dropout_rate) == (cfg.fusion.hidden, cfg.fusion.dropout_rate)
  assert model.fusion.num_scales == len(cfg.scales)
  assert (tuple(model.scales), model.scale_execution, model.input_scale, model.remat) == (
      tuple(cfg.scales), cfg.scale_execution, cfg.input_scale, cfg.remat)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 65, 65, 3)), train=False))
  assert set(variables["params"]) == {"backbone", "fusion"}
  assert variables["params"]["backbone"]["fc7"]["kernel"].shape == (1, 1, cfg.backbone.fc_width,
                                                                    cfg.backbone.fc_width)
  assert variables["params"]["fusion"]["hidden"]["kernel"].shape[-1] == cfg.fusion.hidden


def test_convert_takes_its_defaults_from_the_config(monkeypatch, tmp_path):
  """Changing the defaults changes the command's: --mean_rgb and --fc_width are read from them, not repeated."""
  recipe = defaults.get_config()
  recipe.input.mean_rgb, recipe.model.backbone.fc_width = (1.0, 2.0, 3.0), 48
  monkeypatch.setattr(defaults, "get_config", lambda: recipe)
  calls = []
  monkeypatch.setattr(convert.weights, "resolve", lambda src: src)
  monkeypatch.setattr(convert.weights, "convert_file",
                      lambda path, **kw: calls.append(kw) or ("test", {"backbone": {}}))
  monkeypatch.setattr(convert.tree, "save", lambda path, params: None)
  convert.main(["--src=in.npz", f"--out={tmp_path / 'out.npz'}"])
  assert tuple(calls[-1]["mean_rgb"]) == (1.0, 2.0, 3.0) and calls[-1]["fc_width"] == 48
  convert.main(["--src=in.npz", f"--out={tmp_path / 'out.npz'}", "--mean_rgb", "4", "5", "6", "--fc_width=16"])
  assert tuple(calls[-1]["mean_rgb"]) == (4.0, 5.0, 6.0) and calls[-1]["fc_width"] == 16
  convert.load_pretrained("in.npz")
  assert tuple(calls[-1]["mean_rgb"]) == (1.0, 2.0, 3.0)
