"""Weights named rather than given as a path ('imagenet:vgg16'), fetched once into a cache and verified.

A named source is a URL whose file name carries the first hex digits of the file's SHA-256, as torch.hub's files
do ('vgg16-397923af.pth'); a file whose digest does not start with them is refused and removed. The cache is
$SCALEATTN_WEIGHTS_DIR, else $XDG_CACHE_HOME/scaleattn/weights, else ~/.cache/scaleattn/weights; a copy already in
torch.hub's cache (~/.cache/torch/hub/checkpoints, or $TORCH_HOME/hub/checkpoints) is used in place. Offline, the
error names the file to download and where to put it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Callable

from absl import logging
from etils import epath

Fetcher = Callable[[str, str], None]  # (url, destination path) -> None; raises OSError when it cannot


@dataclasses.dataclass(frozen=True)
class NamedSource:
  name: str
  url: str
  description: str

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]

  @property
  def sha256_prefix(self) -> str:
    match = re.search(r"-([a-f0-9]{8,})\.", self.filename)
    if not match:
      raise ValueError(f"{self.name}: {self.filename} carries no SHA-256 prefix ('name-<hex>.ext')")
    return match.group(1)


_NAMED: dict[str, NamedSource] = {}


def register_named(source: NamedSource) -> NamedSource:
  if source.name in _NAMED:
    raise ValueError(f"named weights {source.name!r} are already registered")
  source.sha256_prefix  # noqa: B018 - checks the URL now, not at the first download
  _NAMED[source.name] = source
  return source


def is_named(source: str) -> bool:
  return source in _NAMED


VGG16 = register_named(NamedSource(
    "imagenet:vgg16", "https://download.pytorch.org/models/vgg16-397923af.pth",
    "torchvision's ImageNet VGG-16 (the weights DeepLab's init.caffemodel was cut from, as PyTorch stores them)"))


def cache_dir() -> epath.Path:
  if os.environ.get("SCALEATTN_WEIGHTS_DIR"):
    return epath.Path(os.environ["SCALEATTN_WEIGHTS_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return epath.Path(base) / "scaleattn" / "weights"


def _torch_hub_dir() -> epath.Path:
  home = os.environ.get("TORCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "torch")
  return epath.Path(home) / "hub" / "checkpoints"


def sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _urlopen_fetch(url: str, destination: str) -> None:
  with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as out:  # noqa: S310 - https
    shutil.copyfileobj(response, out, 1 << 22)


def resolve(name: str, *, fetch: Fetcher = _urlopen_fetch) -> str:
  """The local path of named weights, downloading and verifying them on first use."""
  if name not in _NAMED:
    raise ValueError(f"init_from={name!r}: unknown named weights; known: {', '.join(sorted(_NAMED))}, or a path")
  source = _NAMED[name]
  for folder in (cache_dir(), _torch_hub_dir()):
    path = folder / source.filename
    if path.exists():
      if sha256(path).startswith(source.sha256_prefix):
        return str(path)
      raise ValueError(f"{path}: its SHA-256 does not start with {source.sha256_prefix}, as its name says; "
                       f"remove it to download {name} again")
  target = cache_dir() / source.filename
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = os.path.join(tmp, source.filename)
    logging.info("Downloading %s (%s) from %s to %s", name, source.description, source.url, target)
    try:
      fetch(source.url, partial)
    except OSError as e:
      raise OSError(f"init_from={name}: could not download {source.url} ({e}). Download it where there is a network "
                    f"and put it at {target} (or set SCALEATTN_WEIGHTS_DIR to its folder), or pass the file's path: "
                    f"--config.init_from=/path/to/{source.filename}") from e
    digest = sha256(epath.Path(partial))
    if not digest.startswith(source.sha256_prefix):
      raise ValueError(f"init_from={name}: the download from {source.url} has SHA-256 {digest}, expected it to start "
                       f"with {source.sha256_prefix}; nothing was kept")
    os.replace(partial, target)
  return str(target)
RESNETS = [register_named(NamedSource(
    f"imagenet:resnet{depth}", f"https://download.pytorch.org/models/resnet{depth}-{digest}.pth",
    f"torchvision's ImageNet ResNet-{depth} (IMAGENET1K_V1; stride in the 3x3: stride_in_3x3=True)"))
    for depth, digest in ((50, "0676ba61"), (101, "63fe2227"), (152, "394f9c45"))]
