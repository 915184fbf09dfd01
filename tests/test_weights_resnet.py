"""DeepLab v2 ResNet converters: random reduced-depth state dicts in each source's own layout (torchvision,
the authors' caffemodels as the Caffe reader flattens them, deeplab-pytorch), recognised by their names, converted,
and run by the Flax model against a NumPy forward of the source network on the source's own input."""
import jax
import numpy as np
import pytest
import resnet_reference as rref
from test_resnet import to_flax

from scaleattn.models.resnet import DeepLabV2, Stem
from scaleattn.weights import resnet, sources

DEPTHS, WIDTH, CLASSES = (2, 3, 3, 1), 4, 3  # stage 2 lettered a, b; stages 3, 4 numbered a, b1, b2 in Caffe
CAFFE_MEAN_BGR = np.array([104.008, 116.669, 122.675])
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _image(seed=0, size=(2, 35, 30)):
  """RGB 0..255."""
  return np.random.default_rng(seed).uniform(0, 255, size=(*size, 3))


def _run(variables, x, **model_kwargs):
  model = DeepLabV2(CLASSES, block_depths=DEPTHS, width=WIDTH, **model_kwargs)
  return jax.jit(model.apply, static_argnames="train")(variables, x.astype(np.float32), train=False)


def _flat_backbone(converted):
  return {collection: tree["backbone"] for collection, tree in converted.items()}


@pytest.mark.parametrize("layout, render", [
    ("deeplab_pytorch", lambda u: rref.deeplab_pytorch_state(u)),
    ("deeplab_pytorch", lambda u: rref.deeplab_pytorch_state(u, prefix="")),
    ("caffe_deeplab_resnet", lambda u: rref.caffe_state(u, numbered_stages=(3, 4))),
    ("caffe_deeplab_resnet", lambda u: rref.caffe_state(u, head="pascal_person_part", copies=())),
])
def test_bgr_caffe_sources_run_as_the_source_network(layout, render):
  """Their networks take BGR 0..255 minus Caffe's mean; ours RGB minus the same mean: conv1's channels flip."""
  units = rref.random_units(DEPTHS, WIDTH, CLASSES, seed=1)
  state = render(units)
  found = sources.find_layout(set(state), "test")
  assert found.name == layout and found.input_order == "bgr"
  converted = found.convert(state, source="test", mean_rgb=tuple(CAFFE_MEAN_BGR[::-1]))
  img = _image()
  scores, features = _run(_flat_backbone(converted), img - CAFFE_MEAN_BGR[::-1])
  ref_scores, ref_features = rref.deeplab_v2(img[..., ::-1] - CAFFE_MEAN_BGR, units, DEPTHS)
  np.testing.assert_allclose(features, ref_features, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-3)


def test_torchvision_runs_as_the_source_network_with_its_stride_layout():
  """torchvision takes (RGB / 255 - mean) / std and strides in the 3x3; with the pipeline's mean at ImageNet's the
  conversion is exact everywhere. It has no ASPP: the model keeps its own."""
  units = rref.random_units(DEPTHS, WIDTH, CLASSES, seed=2)
  state = rref.torchvision_state(units)
  found = sources.find_layout(set(state), "test")
  assert found.name == "torchvision_resnet" and found.input_order == "rgb"
  converted = _flat_backbone(found.convert(state, source="test", mean_rgb=tuple(255 * IMAGENET_MEAN)))
  assert "aspp" not in converted["params"]
  converted["params"]["aspp"] = to_flax(units)["params"]["aspp"]
  img = _image(3)
  scores, features = _run(converted, img - 255 * IMAGENET_MEAN, stride_in_3x3=True)
  ref_scores, ref_features = rref.deeplab_v2((img / 255 - IMAGENET_MEAN) / IMAGENET_STD, units, DEPTHS,
                                             stride_in_3x3=True)
  np.testing.assert_allclose(features, ref_features, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("layout, render, source_input", [
    ("torchvision_resnet", rref.torchvision_state, lambda img: (img / 255 - IMAGENET_MEAN) / IMAGENET_STD),
    ("deeplab_pytorch", rref.deeplab_pytorch_state, lambda img: img[..., ::-1] - CAFFE_MEAN_BGR),
])
def test_another_pipeline_mean_moves_into_conv1s_batch_norm(layout, render, source_input):
  """With DeepLab's mean for a torchvision source (or another mean for a Caffe one) the stem computes what the
  source's computes, away from conv1's zero-padded 3-pixel border (3 output rows of the pool)."""
  units = rref.random_units(DEPTHS, WIDTH, CLASSES, seed=4)
  mean_rgb = (122.675, 116.669, 104.008) if layout == "torchvision_resnet" else (100.0, 130.0, 90.0)
  converted = sources.find_layout(set(render(units)), "test").convert(render(units), source="test",
                                                                      mean_rgb=mean_rgb)
  img = _image(5)
  stem = {k: v["backbone"]["stem"] for k, v in converted.items()}
  out, _ = jax.jit(lambda v, x: Stem(WIDTH).apply(v, x, None))(stem, (img - np.array(mean_rgb)).astype(np.float32))
  expected = rref.stem(source_input(img), units)
  np.testing.assert_allclose(out[:, 2:-2, 2:-2], expected[:, 2:-2, 2:-2], rtol=1e-4, atol=1e-3)
  assert not np.allclose(out[:, 0], expected[:, 0], atol=1e-2)  # the border does differ: the fold is not exact


def test_converted_tree_fits_the_model_exactly():
  units = rref.random_units(DEPTHS, WIDTH, CLASSES, seed=6)
  model = DeepLabV2(CLASSES, block_depths=DEPTHS, width=WIDTH)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 33, 33, 3), np.float32), train=False))
  converted = resnet.caffe_to_deeplab(rref.caffe_state(units, numbered_stages=(3, 4)), expected=abstract)
  assert jax.tree.structure(_flat_backbone(converted)) == jax.tree.structure(abstract)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype,
                                   _flat_backbone(converted), abstract))


@pytest.mark.parametrize("source_depths, classes, message", [
    ((2, 2, 3, 1), CLASSES, r"backbone/res3_3/conv3x3/kernel \(shape \(3, 3, 8, 8\)\) is not in the checkpoint"),
    ((2, 3, 4, 1), CLASSES, r"backbone/res4_4/reduce/kernel \(shape \(1, 1, 64, 16\)\) is not in the model"),
    (DEPTHS, 5, r"backbone/aspp/c0/kernel is \(3, 3, 128, 5\) in the checkpoint, \(3, 3, 128, 3\) in the model"),
])
def test_another_depth_or_class_count_names_the_first_mismatch(source_depths, classes, message):
  model = DeepLabV2(CLASSES, block_depths=DEPTHS, width=WIDTH)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 33, 33, 3), np.float32), train=False))
  state = rref.deeplab_pytorch_state(rref.random_units(source_depths, WIDTH, classes))
  with pytest.raises(ValueError, match="ckpt.pth does not fit the model: .*" + message):
    resnet.deeplab_pytorch_to_deeplab(state, source="ckpt.pth", expected={"params": {"backbone": abstract["params"]},
                                                                          "batch_stats": abstract["batch_stats"]})


def test_width_mismatch_names_both_shapes():
  model = DeepLabV2(CLASSES, block_depths=DEPTHS, width=WIDTH)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 33, 33, 3), np.float32), train=False))
  state = rref.torchvision_state(rref.random_units(DEPTHS, 2 * WIDTH, CLASSES))
  with pytest.raises(ValueError, match=r"params backbone/stem/conv1/kernel is \(7, 7, 3, 8\) in the checkpoint, "
                                       r"\(7, 7, 3, 4\) in the model"):
    resnet.torchvision_to_deeplab(state, source="resnet.pth", expected=abstract)


def test_unknown_and_missing_names_are_errors():
  units = rref.random_units(DEPTHS, WIDTH, CLASSES)
  state = rref.torchvision_state(units)
  with pytest.raises(ValueError, match="layer5.0.conv1.weight"):
    resnet.torchvision_to_deeplab({**state, "layer5.0.conv1.weight": np.zeros((4, 4, 1, 1))}, source="x.pth")
  del state["layer2.0.bn3.running_var"]
  with pytest.raises(ValueError, match="x.pth: not a complete torchvision ResNet.*missing layer2.0.bn3.running_var"):
    resnet.torchvision_to_deeplab(state, source="x.pth")


def test_layouts_recognise_only_their_own_names():
  units = rref.random_units((1, 1, 1, 1), 2, 2)
  for render, name in ((rref.torchvision_state, "torchvision_resnet"), (rref.caffe_state, "caffe_deeplab_resnet"),
                       (rref.deeplab_pytorch_state, "deeplab_pytorch")):
    names = set(render(units))
    assert [layout.name for layout in sources.layouts() if layout.matches(names)] == [name]


@pytest.mark.parametrize("convert, render", [
    (resnet.caffe_to_deeplab, rref.caffe_state),
    (resnet.deeplab_pytorch_to_deeplab, rref.deeplab_pytorch_state),
])
def test_a_trained_model_of_the_other_stride_layout_is_refused(convert, render):
  """Both layouts have the same shapes, so only the converter knows where the source strides: a trained DeepLab v2
  (stride in the 1x1) never runs silently in a model that strides in the 3x3."""
  state = render(rref.random_units(DEPTHS, WIDTH, CLASSES))
  with pytest.raises(ValueError, match="stride_in_3x3=False"):
    convert(state, source="w", stride_in_3x3=True)
  convert(state, source="w", stride_in_3x3=False)


def test_imagenet_classifier_weights_initialise_either_layout():
  """torchvision's ImageNet ResNet (stride in the 3x3) fills a model of the DeepLab v2 layout with the same arrays,
  with a warning that the networks differ: an initialisation, not the source network."""
  state = rref.torchvision_state(rref.random_units(DEPTHS, WIDTH, CLASSES))
  same = resnet.torchvision_to_deeplab(state, source="w", stride_in_3x3=True)
  moved = resnet.torchvision_to_deeplab(state, source="w", stride_in_3x3=False)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(moved), strict=True):
    np.testing.assert_array_equal(a, b)


def test_init_from_puts_a_sources_statistics_and_parameters_into_a_run(tmp_path):
  """The start of a run (`experiment.initial_state`) with config.init_from naming a deeplab-pytorch checkpoint: the
  run's model, with the statistics as non-parameter state, computes the source network on the source's input."""
  from configs import deeplab_v2  # noqa: PLC0415
  from scaleattn.experiment import build_experiment, initial_state  # noqa: PLC0415

  units = rref.random_units(DEPTHS, WIDTH, CLASSES, seed=4)
  path = tmp_path / "deeplab_pytorch_state.npz"
  np.savez(path, **rref.deeplab_pytorch_state(units))
  config = deeplab_v2.get_config()
  config.init_from, config.model.num_classes, config.model.scales = str(path), CLASSES, (1.0,)
  config.model.backbone.update(block_depths=DEPTHS, width=WIDTH, stride_in_3x3=False)
  config.input.crop_size = config.input.eval_size = 33
  config.train.batch_size, config.eval.batch_size = 4, 4
  exp = build_experiment(config)
  state = initial_state(exp)
  assert set(state.model_state) == {"batch_stats"}
  img = _image(seed=5, size=(1, 33, 33))
  mean_rgb = np.asarray(config.input.mean_rgb)
  scores = exp.model.apply(state.variables, (img - mean_rgb).astype(np.float32), train=False).fused
  ref_scores, _ = rref.deeplab_v2(img[..., ::-1] - CAFFE_MEAN_BGR, units, DEPTHS)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-3)
