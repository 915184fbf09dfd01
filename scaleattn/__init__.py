"""scaleattn: Attention to Scale (Chen et al., CVPR 2016) in JAX/Flax."""
from scaleattn.models.fusion import ScaleFusion

__version__ = "0.1.0"
__all__ = ["ScaleFusion", "__version__"]
