"""Fully connected CRF post-processing: batched, jitted mean-field inference (Kraehenbuehl & Koltun 2011).

The model (the paper's Eq. 1-4): unary psi_u(l) = -log softmax(scores)(l); Potts pairwise terms
mu(l, l') = [l != l'] weighted by two Gaussian kernels over all pixel pairs i != j,

  k_bilateral(i, j) = exp(-|p_i - p_j|^2 / (2 bilateral_xy_std^2) - |I_i - I_j|^2 / (2 bilateral_rgb_std^2))
  k_gaussian(i, j)  = exp(-|p_i - p_j|^2 / (2 gaussian_xy_std^2))

(p: pixel position (x = column, y = row), I: RGB in 0..255). One parallel mean-field update is

  Q_i(l) = softmax_l(-psi_u_i(l) + m_i(l)),   m_i(l) = sum_k w_k sum_{j != i} k(i, j) Q_j(l),

which equals the paper's exp(-psi_u_i(l) - sum_{l'} mu(l, l') m_i(l')) / Z_i: under Potts the other labels'
message is sum_{l'} m_i(l') - m_i(l), and the sum over l' is the same for every l so it cancels in the softmax.
The exclusion j != i subtracts the self-contribution k(i, i) Q_i = Q_i: k(i, i) = 1 for the exact kernels, and the
bilateral grid is rescaled to make its own self-weight exactly 1 too. Q starts at softmax(scores).

`normalize=True` (the default) is the convention of Kraehenbuehl's released densecrf code (PottsPotential with
NORMALIZE_AFTER, which the CRF of DeepLab's release, `run_densecrf.sh`, is built on): each kernel's message is
divided by the kernel's row sum, self included,
m_i(l) = sum_k w_k sum_j k(i, j) Q_j(l) / sum_j k(i, j), so a message is at most w_k. DeepLab's weights were tuned
for that normalized message: with the paper's unnormalized kernels (normalize=False) the message grows with the
number of similar pixels (up to 2 pi 121^2 ~ 9e4 times w in a uniform region at xy std 121), so the same weights
make a much stronger CRF. The normalized update is not a mean-field step of a symmetric pairwise energy.

Parameters (defaults): DeepLab-LargeFOV's released PASCAL VOC CRF settings, bi_w=4, bi_xy_std=121, bi_rgb_std=5,
pos_w=3, pos_xy_std=3, 10 mean-field iterations (DeepLab v1, Chen et al. 2015, released `run_densecrf.sh`). The
Attention-to-Scale paper's text (Chen et al. 2016) quotes bilateral w=4, xy 49, rgb 5; Gaussian w=3, xy 3: it
gives 49 where DeepLab-LargeFOV's release uses 121.

Filtering (`filter`):
- 'lattice' (the default): both kernels on permutohedral lattices (lattice.py), d = 5 for the appearance kernel and
  d = 2 for the position kernel, as densecrf does. Each lattice is built once per image and reused by every
  iteration and every class. The lattice approximates the Gaussian up to a scale that depends on the data, which
  the normalized messages divide out: normalize=True only.
- 'grid': the appearance kernel on a 5-D bilateral grid (grid.py), the position kernel exactly (separable).
- 'exact': all pixel pairs (O(N^2) memory and time: small images, tests, measurement).

Padding: pixels where `valid` is False are absent: their Q is zeroed before every filtering (they send nothing),
they are not counted in the normalization, and their output is softmax(scores) unchanged.
"""
from scaleattn.crf.filters import COLOUR_MAX, gaussian_filter_exact, pixel_features, spatial_filter
from scaleattn.crf.grid import bilateral_filter
from scaleattn.crf.lattice import permutohedral_filter
from scaleattn.crf.mean_field import FILTERS, dense_crf

__all__ = ["COLOUR_MAX", "FILTERS", "bilateral_filter", "dense_crf", "gaussian_filter_exact", "permutohedral_filter",
           "pixel_features", "spatial_filter"]
