"""Precise RoI pooling of a whole feature map, as two precomputed matrices (no custom op).

UPerNet's pyramid pooling uses PrRoIPool (Jiang et al. 2018, a CUDA kernel in
the original) with one RoI covering the whole map, ``[0, L]`` on each axis.
The map is read as the continuous bilinear interpolant with pixel centres at
integers ``0 .. L-1`` and value 0 outside, and each of the ``s`` bins returns
that surface's mean over the bin. The integral is separable and linear in the
map, so it is ``Wy @ F @ Wx^T`` with

    W[p, i] = (integral over t in [p*L/s, (p+1)*L/s] of max(0, 1 - |t - i|) dt) / (L / s).

Note the asymmetry this implies: the RoI covers half of pixel 0's tent but all
of pixel L-1's.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxdissect.segmentation.preprocess import apply_separable


def _tent_cdf(u: np.ndarray) -> np.ndarray:
    """Integral of ``max(0, 1 - |t|)`` from -inf to ``u``."""
    u = np.clip(u, -1.0, 1.0)
    return np.where(u <= 0, 0.5 * (u + 1.0) ** 2, 1.0 - 0.5 * (1.0 - u) ** 2)


@functools.lru_cache(maxsize=None)
def prroi_matrix(length: int, bins: int) -> np.ndarray:
    """``[bins, length]`` weights: bin ``p``'s mean of the interpolant of a length-``length`` signal."""
    if length < 1 or bins < 1:
        raise ValueError(f"precise RoI pooling needs a positive length and bin count; got {length}, {bins}")
    edges = np.arange(bins + 1, dtype=np.float64) * (length / bins)
    centres = np.arange(length, dtype=np.float64)
    cdf = _tent_cdf(edges[:, None] - centres[None, :])
    return ((cdf[1:] - cdf[:-1]) / (length / bins)).astype(np.float32)


def prroi_pool(x: jax.Array, bins: int) -> jax.Array:
    """Precise RoI pooling of NHWC ``x`` over the whole map ``[0, W] x [0, H]`` -> ``[N, bins, bins, C]``."""
    return apply_separable(x, prroi_matrix(x.shape[1], bins), prroi_matrix(x.shape[2], bins))
