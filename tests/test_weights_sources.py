"""Layout recognition, named weights through a stub fetcher (no network), and `load_init` into a model's tree:
fc8 by class count, the fusion head by presence, every mismatch reported."""
import hashlib
import pathlib

import numpy as np
import pytest

from scaleattn import weights
from scaleattn.weights import named, tree

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "weights"
V1 = FIXTURES / "largefov_v1_float.caffemodel"
CAFFE_MEAN_RGB = (122.675, 116.669, 104.008)
WIDTHS = {"conv1": 4, "conv2": 6, "conv3": 8, "conv4": 8, "conv5": 8}
CONVS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
         "conv4_3", "conv5_1", "conv5_2", "conv5_3")


def model_tree(classes: int, fill: float = 7.0, hidden: int = 3) -> dict:
  """A MultiScaleNet-shaped tree for the fixture's LargeFOV (widths 4, 6, 8, 8, 8; fc 16), filled with `fill`."""
  backbone, c_in = {}, 3
  for name in CONVS:
    c_out = WIDTHS[name[:5]]
    backbone[name] = {"kernel": np.full((3, 3, c_in, c_out), fill, np.float32), "bias": np.full(c_out, fill)}
    c_in = c_out
  backbone["fc6"] = {"kernel": np.full((3, 3, 8, 16), fill, np.float32), "bias": np.full(16, fill, np.float32)}
  backbone["fc7"] = {"kernel": np.full((1, 1, 16, 16), fill, np.float32), "bias": np.full(16, fill, np.float32)}
  backbone["fc8"] = {"kernel": np.full((1, 1, 16, classes), fill, np.float32),
                     "bias": np.full(classes, fill, np.float32)}
  fusion = {"hidden": {"kernel": np.full((3, 3, 32, hidden), fill, np.float32), "bias": np.full(hidden, fill)},
            "logits": {"kernel": np.full((1, 1, hidden, 2), fill, np.float32), "bias": np.full(2, fill)}}
  return {"backbone": backbone, "fusion": fusion}


def test_each_fixture_is_recognised_by_its_names():
  found = {p.name: weights.sources.find_layout(set(weights.read_any(str(p))), p.name).name
           for p in FIXTURES.glob("*.caffemodel")}
  assert found == {"largefov_v1_float.caffemodel": "caffe-largefov", "largefov_v2_double.caffemodel": "caffe-largefov"}
  with pytest.raises(ValueError, match=r"tiny.pth: no known weights layout has these names \(8 arrays: "
                     r"classifier.0.bias.*Known layouts:\n") as e:
    weights.sources.find_layout(set(weights.read_any(str(FIXTURES / "tiny_state_zip.pth"))), "tiny.pth")
  assert "\n  scaleattn: " in str(e.value) and "\n  torchvision-vgg16: " in str(e.value)


def test_fc8_loads_when_the_class_count_matches_and_is_skipped_otherwise(caplog):
  source = weights.read_any(str(V1))
  loaded = weights.load_init(str(V1), model_tree(classes=5), mean_rgb=CAFFE_MEAN_RGB)
  np.testing.assert_array_equal(loaded["backbone"]["fc8"]["kernel"][0, 0], source["fc8_voc12/weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(loaded["backbone"]["conv2_1"]["kernel"],
                                np.einsum("oihw->hwio", source["conv2_1/weight"]))
  assert all(np.all(v == 7) for v in tree.flatten(loaded["fusion"]).values())  # the source has no attention head
  with caplog.at_level("INFO"):
    other = weights.load_init(str(V1), model_tree(classes=21), mean_rgb=CAFFE_MEAN_RGB)
  assert np.all(other["backbone"]["fc8"]["kernel"] == 7)
  assert "fc8 has 5 classes, the model 21; fc8 keeps its initialiser" in caplog.text
  np.testing.assert_array_equal(other["backbone"]["fc7"]["bias"], source["fc7/bias"])


def test_fusion_head_from_a_file_that_has_one(tmp_path, caplog):
  stored = model_tree(classes=5, fill=1.5)
  path = str(tmp_path / "run.npz")
  tree.save(path, stored)
  loaded = weights.load_init(path, model_tree(classes=5), mean_rgb=CAFFE_MEAN_RGB)
  assert all(np.all(v == 1.5) for v in tree.flatten(loaded).values())
  with caplog.at_level("WARNING"):  # another hidden width: the head does not fit and keeps its initialiser
    other = weights.load_init(path, model_tree(classes=5, hidden=4), mean_rgb=CAFFE_MEAN_RGB)
  assert all(np.all(v == 7) for v in tree.flatten(other["fusion"]).values())
  assert "fusion/hidden/kernel: model expects (3, 3, 32, 4), got (3, 3, 32, 3)" in caplog.text


def test_backbone_mismatches_are_all_reported():
  target = model_tree(classes=5)
  target["backbone"]["fc6"]["kernel"] = np.zeros((3, 3, 8, 32), np.float32)
  del target["backbone"]["conv5_3"]
  with pytest.raises(ValueError, match="largefov_v1_float.caffemodel does not fit the model") as e:
    weights.load_init(str(V1), target, mean_rgb=CAFFE_MEAN_RGB)
  assert "backbone/fc6/kernel: model expects (3, 3, 8, 32), got (3, 3, 8, 16)" in str(e.value)
  assert "backbone/conv5_3: the model's backbone has no such layer" in str(e.value)


def test_legacy_backbone_only_npz_still_reads(tmp_path):
  path = tmp_path / "old.npz"
  np.savez(path, **{"conv1_1/kernel": np.ones((3, 3, 3, 4), np.float32), "conv1_1/bias": np.ones(4, np.float32)})
  layout, params = weights.convert_file(str(path), mean_rgb=CAFFE_MEAN_RGB)
  assert layout == "scaleattn" and set(params) == {"backbone"}
  np.testing.assert_array_equal(params["backbone"]["conv1_1"]["bias"], np.ones(4))


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("SCALEATTN_WEIGHTS_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  return tmp_path / "cache"


@pytest.fixture
def served(monkeypatch):
  """'imagenet:test' served from a local file through the same download path: its name carries its SHA-256."""
  payload = (FIXTURES / "tiny_state_zip.pth").read_bytes()
  digest = hashlib.sha256(payload).hexdigest()
  source = named.NamedSource("imagenet:test", f"https://example.invalid/models/tiny-{digest[:8]}.pth", "a test file")
  monkeypatch.setitem(named._NAMED, source.name, source)
  calls = []

  def fetch(url, destination):
    calls.append(url)
    pathlib.Path(destination).write_bytes(payload)
  return source, fetch, calls, payload


def test_named_weights_are_fetched_once_and_verified(cache, served):
  source, fetch, calls, payload = served
  first = weights.resolve("imagenet:test", fetch=fetch)
  second = weights.resolve("imagenet:test", fetch=fetch)
  assert first == second == str(cache / source.filename) and calls == [source.url]
  assert pathlib.Path(first).read_bytes() == payload
  assert set(weights.read_any(first)) >= {"features.0.weight", "shared.b"}


def test_a_download_with_the_wrong_digest_is_not_kept(cache, served):
  source, _, _, _ = served
  bad = lambda url, destination: pathlib.Path(destination).write_bytes(b"not the file")
  with pytest.raises(ValueError, match=rf"imagenet:test: the download from {source.url} has SHA-256 .* expected it "
                     rf"to start with {source.sha256_prefix}; nothing was kept"):
    weights.resolve("imagenet:test", fetch=bad)
  assert not (cache / source.filename).exists() and list(cache.iterdir()) == []


def test_offline_says_what_to_download_and_where(cache, served):
  source, _, _, _ = served

  def offline(url, destination):
    raise OSError("Name or service not known")
  with pytest.raises(OSError, match=rf"could not download {source.url} .*put it at {cache / source.filename} .*"
                     rf"--config.init_from=/path/to/{source.filename}"):
    weights.resolve("imagenet:test", fetch=offline)


def test_a_copy_in_torch_hub_cache_is_used_in_place(cache, served, tmp_path):
  source, fetch, calls, payload = served
  hub = tmp_path / "torch" / "hub" / "checkpoints"
  hub.mkdir(parents=True)
  (hub / source.filename).write_bytes(payload)
  assert weights.resolve("imagenet:test", fetch=fetch) == str(hub / source.filename) and calls == []


def test_the_default_imagenet_source_is_torchvisions_vgg16():
  source = named._NAMED["imagenet:vgg16"]
  assert source.url == "https://download.pytorch.org/models/vgg16-397923af.pth" and source.sha256_prefix == "397923af"
