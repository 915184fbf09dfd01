"""The NNX front door: `from scaleattn.nnx import ScaleFusion` (the linen module is `scaleattn.ScaleFusion`)."""
from scaleattn.models.fusion_nnx import ScaleFusion

__all__ = ["ScaleFusion"]
