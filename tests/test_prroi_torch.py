"""bench/prroi_torch.py (the pure-PyTorch precise RoI pooling the original is run with) vs independent references.

References: a brute-force midpoint-rule integral of the bilinear interpolant
(NumPy, any RoI, partly outside the map included), the cell-by-cell reference
in torch_segmenter_reference.py, and this package's JAX ``prroi_pool``.
"""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench.prroi_torch import PrRoIPool2D, install  # noqa: E402


def interpolant(fmap, y, x):
    """Bilinear interpolant of ``fmap`` [C, H, W] at points (y, x), pixel (i, j) at (i, j), 0 beyond the map."""
    c, h, w = fmap.shape
    padded = np.zeros((c, h + 2, w + 2))
    padded[:, 1:-1, 1:-1] = fmap
    y, x = np.clip(y, -1.0, h), np.clip(x, -1.0, w)
    i0, j0 = np.floor(y).astype(int), np.floor(x).astype(int)
    a, b = y - i0, x - j0
    g = lambda i, j: padded[:, np.clip(i + 1, 0, h + 1), np.clip(j + 1, 0, w + 1)]  # noqa: E731
    return (g(i0, j0) * (1 - a) * (1 - b) + g(i0 + 1, j0) * a * (1 - b) + g(i0, j0 + 1) * (1 - a) * b
            + g(i0 + 1, j0 + 1) * a * b)


def brute_force(fmap, roi, ph, pw, n=48):
    """Midpoint-rule mean of the interpolant over each bin (``n x n`` points per bin)."""
    _, x0, y0, x1, y1 = roi
    out = np.zeros((fmap.shape[0], ph, pw))
    bh, bw = (y1 - y0) / ph, (x1 - x0) / pw
    t = (np.arange(n) + 0.5) / n
    for p in range(ph):
        for q in range(pw):
            yy, xx = np.meshgrid(y0 + (p + t) * bh, x0 + (q + t) * bw, indexing="ij")
            out[:, p, q] = interpolant(fmap, yy.ravel(), xx.ravel()).mean(axis=1)
    return out


def test_matches_brute_force_integral_on_arbitrary_rois():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 3, 7, 9))
    rois = [(0, 0.0, 0.0, 9.0, 7.0), (1, -1.3, 0.6, 4.2, 8.1), (0, 2.25, 1.5, 8.6, 3.9), (1, 5.0, 5.0, 11.0, 9.5)]
    pool = PrRoIPool2D(3, 2, 1.0)
    got = pool(torch.tensor(feats, dtype=torch.float64), torch.tensor(rois, dtype=torch.float64)).numpy()
    for k, roi in enumerate(rois):
        want = brute_force(feats[int(roi[0])], roi, 3, 2)
        np.testing.assert_allclose(got[k], want, atol=2e-3, rtol=0)


def test_spatial_scale_and_empty_roi():
    rng = np.random.default_rng(1)
    feats = torch.tensor(rng.standard_normal((1, 2, 6, 6)))
    rois = torch.tensor([[0, 0.0, 0.0, 12.0, 12.0], [0, 4.0, 4.0, 4.0, 8.0]], dtype=torch.float64)
    got = PrRoIPool2D(2, 2, 0.5)(feats, rois)
    want = PrRoIPool2D(2, 2, 1.0)(feats, torch.tensor([[0, 0.0, 0.0, 6.0, 6.0]], dtype=torch.float64))
    torch.testing.assert_close(got[0], want[0])
    assert torch.count_nonzero(got[1]) == 0          # zero-width RoI: empty bins give 0


@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_whole_map_matches_cell_reference_and_jax(bins):
    import torch_segmenter_reference as R

    from jaxdissect.segmentation.prroi import prroi_pool

    rng = np.random.default_rng(bins)
    x = rng.standard_normal((2, 4, 8, 11)).astype(np.float32)
    n, _, h, w = x.shape
    rois = torch.tensor([[i, 0, 0, w, h] for i in range(n)], dtype=torch.float32)
    got = PrRoIPool2D(bins, bins, 1.0)(torch.from_numpy(x), rois).numpy()
    np.testing.assert_allclose(got, R.prroi_pool_reference(torch.from_numpy(x), bins).numpy(), atol=1e-5)
    jax_out = np.asarray(prroi_pool(x.transpose(0, 2, 3, 1), bins)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, jax_out, atol=1e-5)


def test_install_replaces_the_cuda_module():
    install("fakepkg_for_test")
    from fakepkg_for_test.prroi_pool import PrRoIPool2D as installed

    assert installed is PrRoIPool2D
    sys.modules.pop("fakepkg_for_test.prroi_pool")
