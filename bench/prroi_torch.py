"""Precise RoI pooling in plain PyTorch (CPU), standing in for the original's CUDA-only extension.

The original's unified-parsing decoder (``netdissect.upsegmodel``) imports
``PrRoIPool2D`` from a compiled CUDA module; ``bench/vs_original.py`` runs the
original on a CPU, so :func:`install` puts this module in its place in
``sys.modules`` before the original's decoder is built.

Definition (Jiang et al. 2018, "Acquisition of Localization Confidence"): the
feature map is the continuous bilinear interpolant of its pixels, pixel
``(i, j)`` sitting at the point ``(i, j)`` and the map being 0 beyond its
pixels; a RoI ``(batch, x0, y0, x1, y1)`` (scaled by ``spatial_scale``) is cut
into ``ph x pw`` equal bins and each output is the exact integral of the
interpolant over its bin divided by the bin's area (0 for an empty bin). The
interpolant is a sum of separable tent functions, so each RoI's result is
``Wy @ F @ Wx^T``, with ``W[p, i]`` the integral of pixel ``i``'s tent over
bin ``p`` divided by the bin's length.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn


def _tent_integral_to(u: torch.Tensor) -> torch.Tensor:
    """``integral_{-inf}^{u} max(0, 1 - |t|) dt`` (float64)."""
    u = u.clamp(-1.0, 1.0)
    return torch.where(u <= 0, 0.5 * (u + 1.0) ** 2, 1.0 - 0.5 * (1.0 - u) ** 2)


def bin_weights(start: float, end: float, bins: int, length: int) -> torch.Tensor:
    """``[bins, length]`` float64: bin ``p`` of ``[start, end]``'s mean of each pixel's tent."""
    size = max(end - start, 0.0) / bins
    if size <= 0:
        return torch.zeros(bins, length, dtype=torch.float64)
    edges = start + torch.arange(bins + 1, dtype=torch.float64) * size
    offsets = edges[:, None] - torch.arange(length, dtype=torch.float64)[None, :]
    cdf = _tent_integral_to(offsets)
    return (cdf[1:] - cdf[:-1]) / size


def prroi_pool2d(features: torch.Tensor, rois: torch.Tensor, pooled_height: int, pooled_width: int,
                 spatial_scale: float) -> torch.Tensor:
    """Pool NCHW ``features`` over ``rois`` ``[K, 5]`` (batch index, x0, y0, x1, y1) -> ``[K, C, ph, pw]``."""
    _, _, height, width = features.shape
    out = []
    for roi in rois.detach().to(torch.float64).cpu().tolist():
        b, x0, y0, x1, y1 = int(roi[0]), *(v * spatial_scale for v in roi[1:])
        wy = bin_weights(y0, y1, pooled_height, height).to(features.dtype)
        wx = bin_weights(x0, x1, pooled_width, width).to(features.dtype)
        out.append(torch.einsum("ph,chw,qw->cpq", wy, features[b], wx))
    return torch.stack(out) if out else features.new_zeros(0, features.shape[1], pooled_height, pooled_width)


class PrRoIPool2D(nn.Module):
    """Module with the original's constructor ``(pooled_height, pooled_width, spatial_scale)``."""

    def __init__(self, pooled_height: int, pooled_width: int, spatial_scale: float):
        super().__init__()
        self.pooled_height = int(pooled_height)
        self.pooled_width = int(pooled_width)
        self.spatial_scale = float(spatial_scale)

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return prroi_pool2d(features, rois, self.pooled_height, self.pooled_width, self.spatial_scale)


def install(package: str = "netdissect.upsegmodel") -> None:
    """Make ``<package>.prroi_pool`` resolve to this implementation (call before the decoder is built)."""
    module = types.ModuleType(f"{package}.prroi_pool")
    module.PrRoIPool2D = PrRoIPool2D
    module.prroi_pool2d = prroi_pool2d
    sys.modules[module.__name__] = module
