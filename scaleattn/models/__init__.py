"""Models: the share-net over scales, its backbones and fusion modules, and the registry that builds them."""
from scaleattn.models.fusion import ScaleFusion
from scaleattn.models.largefov import DeepLabLargeFOV
from scaleattn.models.multiscale import MultiScaleNet, MultiScaleOutput
from scaleattn.models.registry import build_model
from scaleattn.models.resize import output_size, scaled_size

__all__ = ["DeepLabLargeFOV", "MultiScaleNet", "MultiScaleOutput", "ScaleFusion", "build_model", "output_size",
           "scaled_size"]
