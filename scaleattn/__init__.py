"""scaleattn: Attention to Scale (Chen et al., CVPR 2016) in JAX/Flax."""
