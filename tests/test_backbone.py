"""DeepLab-LargeFOV: exact VGG-16 size, Caffe geometry and a forward pass against a NumPy transcription, with the
plain (XLA) kernels and the CPU ones."""
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from configs import voc
from scaleattn.models import DeepLabLargeFOV, output_size, registry, scaled_size
from scaleattn.models.layers import max_pool_3x3

RECIPE = {k: v for k, v in voc.get_config().model.backbone.items() if k != "name"}  # the VOC recipe's backbone
TINY = dict(block_widths=(3, 4, 4, 5, 5), block_depths=(1, 2, 1, 2, 1), fc_width=6, fc6_dilation=2)
VGG_LAYERS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
              "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7", "fc8"]


def largefov(num_classes, **changes) -> DeepLabLargeFOV:
  """The recipe's LargeFOV with `changes` (narrower, shallower)."""
  return DeepLabLargeFOV(num_classes, **{**RECIPE, **changes})


def vgg16_largefov() -> DeepLabLargeFOV:
  """The VGG-16 LargeFOV the VOC recipe trains, built as training builds it."""
  return registry.build_backbone(voc.get_config().model)


def _apply(model):
  """Jitted apply: one compilation beats op-by-op dispatch even for tiny widths."""
  return jax.jit(model.apply, static_argnames="train")


def test_vgg16_largefov_has_20505429_parameters():
  abstract = jax.eval_shape(lambda: vgg16_largefov().init(jax.random.key(0), jnp.zeros((1, 321, 321, 3)),
                                                           train=False))
  params = abstract["params"]
  assert list(params) == VGG_LAYERS
  assert sum(x.size for x in jax.tree.leaves(abstract)) == 20_505_429
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))
  assert params["conv5_3"]["kernel"].shape == (3, 3, 512, 512)
  assert params["fc6"]["kernel"].shape == (3, 3, 512, 1024)
  assert params["fc7"]["kernel"].shape == (1, 1, 1024, 1024)
  assert params["fc8"]["kernel"].shape == (1, 1, 1024, 21) and params["fc8"]["bias"].shape == (21,)


def test_fc8_starts_from_deeplabs_gaussian():
  """DeepLab's prototxt: fc8 weights N(0, 0.01), bias 0."""
  model = largefov(21, block_widths=(4, 4, 4, 4, 4), fc_width=1024)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 9, 9, 3)), train=False)["params"])()
  kernel = np.asarray(params["fc8"]["kernel"])
  assert abs(kernel.std() - 0.01) < 0.0005 and abs(kernel.mean()) < 0.0005
  assert not np.asarray(params["fc8"]["bias"]).any()


@pytest.mark.parametrize("size, expected", [((321, 321), (41, 41)), ((513, 513), (65, 65)),
                                            ((353, 497), (45, 63))])
def test_output_size_of_the_full_network(size, expected):
  model = vgg16_largefov()
  images = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  scores, fc7 = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert scores.shape == (1, *expected, 21) and fc7.shape == (1, *expected, 1024)
  assert (output_size(size[0]), output_size(size[1])) == expected


def test_caffe_sizes():
  assert [scaled_size(321, s) for s in (1, 0.75, 0.5)] == [321, 241, 161]
  assert [scaled_size(513, s) for s in (1, 0.75, 0.5)] == [513, 385, 257]
  assert [output_size(n) for n in (321, 241, 161, 513)] == [41, 31, 21, 65]


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 7), (8, 5), (1, 2), (10, 9)])
def test_max_pool_is_caffe_ceil_mode(stride, size, impl):
  x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32) - 3.0  # negative: pad must not win
  np.testing.assert_array_equal(max_pool_3x3(jnp.asarray(x), stride, impl), ref.max_pool(x, stride))


@pytest.mark.parametrize("conv_impl", ["xla", "cpu"])
@pytest.mark.parametrize("conv5_dilation, fc6_kernel, stride1_pools", [(2, 3, True), (1, 3, True), (2, 1, False),
                                                                       (1, 5, True)])
def test_forward_matches_numpy(conv5_dilation, fc6_kernel, stride1_pools, conv_impl):
  model = largefov(4, **TINY, conv5_dilation=conv5_dilation, fc6_kernel=fc6_kernel, stride1_pools=stride1_pools,
                   conv_impl=conv_impl)
  x = np.random.default_rng(1).normal(size=(2, 35, 27, 3)).astype(np.float32)
  variables = ref.random_variables(model, x, train=False)
  scores, fc7 = _apply(model)(variables, x, train=False)
  params = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
  ref_scores, ref_fc7 = ref.largefov(params, x.astype(np.float64), TINY["block_depths"], TINY["fc6_dilation"],
                                     conv5_dilation=conv5_dilation, stride1_pools=stride1_pools)
  assert params["fc6"]["kernel"].shape[:2] == (fc6_kernel, fc6_kernel)
  assert scores.shape == (2, 6, 5, 4) == ref_scores.shape  # 35 -> 18 -> 10 -> 6, 27 -> 14 -> 8 -> 5
  np.testing.assert_allclose(fc7, ref_fc7, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv_impl", ["xla", "cpu"])
def test_valid_size_makes_a_padded_image_compute_what_it_computes_alone(conv_impl):
  model = largefov(4, **TINY, conv_impl=conv_impl)
  x = np.random.default_rng(2).normal(size=(1, 21, 18, 3)).astype(np.float32)
  canvas = np.pad(x, ((0, 0), (0, 12), (0, 15), (0, 0)))
  variables = ref.random_variables(model, x, train=False)
  apply = _apply(model)
  alone, alone_fc7 = apply(variables, x, train=False)
  padded, padded_fc7 = apply(variables, canvas, train=False, valid_size=jnp.array([21, 18]))
  oh, ow = output_size(21), output_size(18)
  np.testing.assert_allclose(padded[:, :oh, :ow], alone, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(padded_fc7[:, :oh, :ow], alone_fc7, rtol=1e-5, atol=1e-5)
  unconfined, _ = apply(variables, canvas, train=False)
  assert not np.allclose(unconfined[:, :oh, :ow], alone, atol=1e-3)  # without confinement padding leaks in


def test_dropout_half_of_fc7_in_training_only():
  model = largefov(4, **dict(TINY, fc_width=64, dropout_rate=0.5))
  x = np.random.default_rng(3).normal(size=(2, 35, 27, 3)).astype(np.float32)
  variables = ref.random_variables(model, x, train=False)
  apply = _apply(model)
  train = lambda seed: apply(variables, x, train=True, rngs={"dropout": ref.dropout_key(seed)})
  (scores_a, fc7_a), (scores_b, _) = train(0), train(1)
  _, fc7_eval = apply(variables, x, train=False)
  relu_zeros, zeros = np.mean(np.asarray(fc7_eval) == 0), np.mean(np.asarray(fc7_a) == 0)
  np.testing.assert_allclose((zeros - relu_zeros) / (1 - relu_zeros), 0.5, atol=0.1)
  assert not np.allclose(scores_a, scores_b)


def test_bfloat16_compute_keeps_float32_parameters():
  model = largefov(4, dtype=jnp.bfloat16, **TINY)
  x = jnp.ones((1, 17, 17, 3))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(abstract))
  scores, fc7 = _apply(model)(ref.random_variables(model, x, train=False), x, train=False)
  assert scores.dtype == fc7.dtype == jnp.bfloat16


def test_wrong_block_structure_is_reported():
  with pytest.raises(ValueError, match="expected 5 entries"):
    jax.eval_shape(lambda: largefov(4, block_widths=(3, 4), block_depths=(1, 1)).init(
        jax.random.key(0), jnp.zeros((1, 9, 9, 3)), train=False))
