"""Segmenter input preparation and PyTorch-exact resizing, as small interpolation matrices.

The original segmenters resize with ``torch.nn.AdaptiveAvgPool2d`` (inputs) and
``F.interpolate(mode='bilinear', align_corners=False)`` (features and logits).
``jax.image.resize`` follows neither exactly (it antialiases when shrinking and
has no adaptive pooling), so both are written here as separable matrices built
once per static shape: a resize is two small matmuls, jit-friendly and exact.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

UPP_BGR_MEAN = (102.9801, 115.9465, 122.7717)
_HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=None)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of PyTorch 1-D linear interpolation with ``align_corners=False``.

    Source coordinate ``(dst + 0.5) * n_in / n_out - 0.5``, clamped below at 0;
    the upper neighbour is clamped to ``n_in - 1``. No antialiasing. Computed in
    float64 (PyTorch rounds coordinates to float32, a relative difference of
    about 1e-5 at most).
    """
    dst = np.arange(n_out, dtype=np.float64)
    src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


@functools.lru_cache(maxsize=None)
def adaptive_avg_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of PyTorch adaptive average pooling along one axis.

    Output bin ``i`` averages input indices ``floor(i * n_in / n_out)`` to
    ``ceil((i + 1) * n_in / n_out) - 1`` (bins overlap when ``n_out`` does not divide ``n_in``).
    """
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        stop = -((-(i + 1) * n_in) // n_out)
        m[i, start:stop] = 1.0 / (stop - start)
    return m.astype(np.float32)


def apply_separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """``rows @ x @ cols^T`` over the spatial axes of NHWC ``x``."""
    rows = jnp.asarray(rows, x.dtype)
    cols = jnp.asarray(cols, x.dtype)
    x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=_HIGHEST)
    return jnp.einsum("pw,nowc->nopc", cols, x, precision=_HIGHEST)


def _size2(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize_bilinear(x: jax.Array, size) -> jax.Array:
    """Resize NHWC ``x`` to ``size`` (int or ``(h, w)``) like PyTorch bilinear, ``align_corners=False``."""
    h, w = _size2(size)
    if x.shape[1:3] == (h, w):
        return x
    return apply_separable(x, bilinear_matrix(x.shape[1], h), bilinear_matrix(x.shape[2], w))


def adaptive_avg_pool(x: jax.Array, size) -> jax.Array:
    """PyTorch ``AdaptiveAvgPool2d(size)`` of NHWC ``x``."""
    h, w = _size2(size)
    return apply_separable(x, adaptive_avg_matrix(x.shape[1], h), adaptive_avg_matrix(x.shape[2], w))


def _check_images(images: jax.Array) -> jax.Array:
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"segmenter input must be NHWC RGB images [N, H, W, 3] scaled to [-1, 1]; got shape "
            f"{tuple(images.shape)} (for NCHW arrays transpose with x.transpose(0, 2, 3, 1))"
        )
    return images.astype(jnp.float32)


def upp_preprocess(images_zc: jax.Array, size: int = 256) -> jax.Array:
    """Unified-parsing input: [-1, 1] RGB -> 0..255 BGR minus the BGR means, pooled to ``size``.

    No division by a standard deviation (the network was trained that way).
    Images that are not ``size x size`` are resized by adaptive average pooling,
    as the original does.
    """
    x = _check_images(images_zc)
    x = (x + 1.0) / 2.0 * 255.0
    x = x[..., ::-1] - jnp.asarray(UPP_BGR_MEAN, jnp.float32)
    if x.shape[1:3] != (size, size):
        x = adaptive_avg_pool(x, size)
    return x


def color_preprocess(images_zc: jax.Array, imageformat: Mapping, size: int = 256) -> jax.Array:
    """Colour-segmenter input from ``labels.json``'s ``imageformat``: byte order, then ``(x01 - mean) / stdev``.

    ``imageformat`` has ``byteorder`` ('RGB' or 'BGR'), ``mean`` and ``stdev``
    (3 numbers each, in that byte order, for [0, 1] images).
    """
    try:
        order = imageformat["byteorder"]
        mean = np.asarray(imageformat["mean"], np.float32)
        stdev = np.asarray(imageformat["stdev"], np.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"imageformat must be a dict with 'byteorder', 'mean' and 'stdev'; got {imageformat!r}"
        ) from e
    if order not in ("RGB", "BGR") or mean.shape != (3,) or stdev.shape != (3,) or not np.all(stdev > 0):
        raise ValueError(
            "imageformat needs byteorder 'RGB' or 'BGR', 3 means and 3 positive stdevs; "
            f"got {imageformat!r}"
        )
    x = _check_images(images_zc)
    if order == "BGR":
        x = x[..., ::-1]
    x = ((x + 1.0) / 2.0 - mean) / stdev
    if x.shape[1:3] != (size, size):
        x = adaptive_avg_pool(x, size)
    return x

