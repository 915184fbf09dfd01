"""Models: the DeepLab-LargeFOV backbone, the share-net over scales and the scale-fusion module."""
from scaleattn.models.backbone import DeepLabLargeFOV
from scaleattn.models.fusion import ScaleFusion
from scaleattn.models.multiscale import MultiScaleNet, MultiScaleOutput, build_model
from scaleattn.models.resize import output_size, scaled_size

__all__ = ["DeepLabLargeFOV", "MultiScaleNet", "MultiScaleOutput", "ScaleFusion", "build_model", "output_size",
           "scaled_size"]
