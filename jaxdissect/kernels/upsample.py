"""Mapping feature maps onto the segmentation grid (the original's geometry and a corrected one).

Every geometry here is separable bilinear sampling: target pixel ``t`` of an
axis reads the source at a continuous index ``x(t)`` and mixes the two
neighbours ``floor(x)`` and ``floor(x) + 1``. It is applied as two gathers
and a weighted sum per axis (:class:`Taps`), which gives the same value for
an image whatever the batch size or device split (no matmul blocking).

Geometries (per axis, source length ``ss``, target length ``ts``):

* ``'original'`` (the original's default): half-pixel centres,
  ``x = (t + 0.5) * ss / ts - 0.5``, and ZERO padding: a neighbour outside
  ``[0, ss - 1]`` counts as 0, so border pixels are attenuated (14 -> 56:
  ``t = 0`` gives ``0.625 * a[0]``, ``t = 1`` gives ``0.875 * a[0]``).
* ``'clamped'``: the same centres, with ``x`` clamped to ``[0, ss - 1]``
  (edge replication); equals ``jax.image.resize(..., 'bilinear')`` when
  upsampling and PyTorch ``interpolate(bilinear, align_corners=False)``
  in both directions. Corrects the border attenuation (quirk 4).
* receptive field (``convolutions`` given, the original's AlexNet mode): the
  centre of feature pixel ``i`` lies at image coordinate
  ``i * scale + offset``, composed over the layers; target ``t`` reads
  ``x = (t - offset) / scale`` with zero padding (see :func:`receptive_field`).

When ``ss > ts`` every geometry point-samples without antialiasing, as the
original does (224 -> 56 mixes source pixels ``4t + 1`` and ``4t + 2``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

GEOMETRIES = ("original", "clamped")


@dataclasses.dataclass(frozen=True)
class Taps:
    """Two-tap linear sampling of one axis: ``out[t] = w0[t] * a[i0[t]] + w1[t] * a[i1[t]]``."""

    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray

    def matrix(self, source: int) -> np.ndarray:
        """The same map as a dense ``[ts, ss]`` float64 matrix (for inspection and tests)."""
        m = np.zeros((len(self.i0), source))
        rows = np.arange(len(self.i0))
        np.add.at(m, (rows, self.i0), self.w0)
        np.add.at(m, (rows, self.i1), self.w1)
        return m


def taps_at(x: np.ndarray, source: int) -> Taps:
    """Bilinear taps for continuous source indices ``x`` with zero padding outside ``[0, source - 1]``."""
    x = np.asarray(x, np.float64)
    f = np.floor(x)
    w1 = x - f
    w0 = 1.0 - w1
    i0 = f.astype(np.int64)
    i1 = i0 + 1
    w0 = np.where((i0 >= 0) & (i0 < source), w0, 0.0)
    w1 = np.where((i1 >= 0) & (i1 < source), w1, 0.0)
    return Taps(np.clip(i0, 0, source - 1), np.clip(i1, 0, source - 1), w0, w1)


def axis_taps(source: int, target: int, geometry: str = "original") -> Taps:
    """Taps of one axis for the half-pixel geometries ``'original'`` and ``'clamped'``."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; use one of {GEOMETRIES} (or pass convolutions)")
    if source < 1 or target < 1:
        raise ValueError(f"axis lengths must be positive (source {source}, target {target})")
    x = (np.arange(target) + 0.5) * (source / target) - 0.5
    if geometry == "clamped":
        x = np.clip(x, 0, source - 1)
    return taps_at(x, source)


def conv_output_size(size: int, convolutions: Sequence[Sequence[int]]) -> int:
    """Spatial size after ``(kernel, stride, padding, dilation)`` layers: ``1 + (n + 2p - d(k-1) - 1) // s``."""
    for k, s, p, d in convolutions:
        size = 1 + (size + 2 * p - d * (k - 1) - 1) // s
    return size


def receptive_field(convolutions: Sequence[Sequence[int]]) -> tuple[float, float]:
    """``(scale, offset)``: feature pixel ``i`` is centred at input coordinate ``i * scale + offset``.

    ``convolutions`` lists ``(kernel, stride, padding, dilation)`` from the
    input to the layer; they are composed from the last one back
    (``offset = offset * s + (k - 1) * d / 2 - p``, ``scale *= s``).
    """
    scale, offset = 1.0, 0.0
    for k, s, p, d in reversed(list(convolutions)):
        offset = offset * s + (k - 1) * d / 2 - p
        scale *= s
    return scale, offset


def receptive_field_taps(source: int, target: int, convolutions, image_size: int | None = None) -> Taps:
    """Taps of one axis for the receptive-field mapping (zero padding).

    With ``image_size``, target coordinates are rescaled so the target spans
    the image (``scale`` and ``offset`` times ``(target - 1) / (image_size - 1)``),
    and the sampling grid is laid out for the map size the convolutions
    produce from ``image_size``; it is then applied to the actual ``source``
    length, exactly as the original's normalised grid. For AlexNet the
    original passes all layers up to pool5 whatever layer is dissected
    (quirk 3): pass the same list to reproduce it, or only the layers up to
    the dissected one to correct it.
    """
    scale, offset = receptive_field(convolutions)
    grid = source
    if image_size is not None:
        factor = (target - 1) / (image_size - 1)
        scale, offset = scale * factor, offset * factor
        grid = conv_output_size(image_size, convolutions)
    x = (np.arange(target) - offset) / scale
    if grid != source and grid > 1:
        x = x * (source - 1) / (grid - 1)
    return taps_at(x, source)


def make_taps(source_hw, size, geometry: str = "original", convolutions=None, image_size=None):
    """``(taps_h, taps_w)`` for a ``source_hw`` map and a target ``size``."""
    (sh, sw), (th, tw) = tuple(source_hw), tuple(size)
    if convolutions is not None:
        return (receptive_field_taps(sh, th, convolutions, image_size),
                receptive_field_taps(sw, tw, convolutions, image_size))
    return axis_taps(sh, th, geometry), axis_taps(sw, tw, geometry)


def apply_taps(acts, taps_h: Taps, taps_w: Taps):
    """Resample NHWC ``acts [B, h, w, U]`` with per-axis taps; float32 result."""
    a = jnp.asarray(acts, jnp.float32)

    def f32(v):
        return jnp.asarray(np.asarray(v, np.float32))

    a = (f32(taps_h.w0)[None, :, None, None] * a[:, taps_h.i0]
         + f32(taps_h.w1)[None, :, None, None] * a[:, taps_h.i1])
    return (f32(taps_w.w0)[None, None, :, None] * a[:, :, taps_w.i0]
            + f32(taps_w.w1)[None, None, :, None] * a[:, :, taps_w.i1])


def upsample(acts, size=(56, 56), geometry: str = "original", convolutions=None, image_size=None):
    """Resample activations ``[B, h, w, U]`` to ``[B, *size, U]`` (see the module docstring).

    ``geometry`` is ``'original'`` (zero-padded borders, faithful) or
    ``'clamped'`` (edge-clamped, corrected); ``convolutions`` (a list of
    ``(kernel, stride, padding, dilation)``) selects the receptive-field
    mapping instead, with ``image_size`` the input image side.
    """
    if jnp.ndim(acts) != 4:
        raise ValueError(f"upsample expects NHWC activations [B, h, w, U], got shape {jnp.shape(acts)}")
    th, tw = _pair(size)
    taps = make_taps(jnp.shape(acts)[1:3], (th, tw), geometry, convolutions, image_size)
    return apply_taps(acts, *taps)


def _pair(size):
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be an int or a pair of positive ints, got {size}")
    return size
