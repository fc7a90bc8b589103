"""Unit image strips: masked thumbnails of a unit's top images (spec 2.6).

A thumbnail shows the image where the unit's upsampled activation exceeds its
level, the rest dimmed to half brightness, and a one-pixel yellow border just
outside the active region with a one-pixel black border outside that: yellow
shows on dark pixels, black on bright ones (a yellow object), so the outline
is visible on any colour. A unit's strip is its top-k thumbnails side by side
with white gaps. These are a handful of small images per unit, so NumPy is
used throughout.
"""

from __future__ import annotations

import functools
import os
from typing import Mapping, Sequence

import numpy as np

from jaxdissect import fileio
from jaxdissect.kernels.upsample import axis_taps

BORDER_COLOR = (255, 255, 0)
OUTER_BORDER_COLOR = (0, 0, 0)
GAP = 5
JPEG_QUALITY = 95


@functools.lru_cache(maxsize=64)
def interpolation_matrix(source: int, target: int) -> np.ndarray:
    """``[target, source]`` bilinear weights of the default upsampling geometry (spec 2.2).

    The dense form of :func:`jaxdissect.kernels.upsample.axis_taps` (zero padding,
    borders attenuated as in the original ``grid_sample`` call), so thumbnails and
    statistics threshold the same upsampled maps.
    """
    m = axis_taps(source, target, "original").matrix(source)
    m.setflags(write=False)
    return m


def upsample(act: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear, zero-padded upsampling of one ``[h, w]`` map to ``size`` (spec 2.2 geometry)."""
    th, tw = (size, size) if np.isscalar(size) else size
    act = np.asarray(act, np.float64)
    if act.ndim != 2:
        raise ValueError(f"expected a single unit's activation map [h, w], got shape {act.shape}")
    return interpolation_matrix(act.shape[0], th) @ act @ interpolation_matrix(act.shape[1], tw).T


def nearest_resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize with PyTorch's default index rule ``floor(t * in / out)``."""
    th, tw = (size, size) if np.isscalar(size) else size
    h, w = image.shape[:2]
    rows = (np.arange(th) * h) // th
    cols = (np.arange(tw) * w) // tw
    return image[rows][:, cols]


def outside_border(mask: np.ndarray) -> np.ndarray:
    """Pixels outside ``mask`` with at least one of their 8 neighbours inside it."""
    mask = np.asarray(mask, bool)
    padded = np.pad(mask, 1)
    h, w = mask.shape
    touch = np.zeros_like(mask)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                touch |= padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    return touch & ~mask


def masked_thumbnail(image_uint8: np.ndarray, act: np.ndarray, level: float, thumb: int = 100,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """One unit's thumbnail ``uint8 [thumb, thumb, 3]`` of one image (spec 2.6).

    ``image_uint8`` is the ``[H, W, 3]`` image the model saw, ``act`` the unit's raw
    ``[h, w]`` feature map and ``level`` its threshold (the 99th percentile of the
    upsampled activations over the dataset). ``mask``: the region above ``level``
    already upsampled by the dissection's own geometry (boolean ``[s, s]``, e.g.
    the receptive-field grid of AlexNet), nearest-resized to the thumbnail
    instead of thresholding the default bilinear upsampling of ``act``. The
    outline: yellow just outside the region, black outside the yellow.
    """
    image = np.asarray(image_uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 display image, got {image.dtype}; pass the source's 'display' array")
    act = np.asarray(act, np.float64)
    if not np.all(np.isfinite(act)):
        raise ValueError("activation map contains NaN or infinity; check the model and its input")
    small = nearest_resize(image, thumb).astype(np.float64)
    if mask is None:
        mask = upsample(act, thumb) > level
    else:
        mask = nearest_resize(np.asarray(mask, bool), thumb)
    border = outside_border(mask)
    out = np.where(mask[..., None], small, 0.5 * small)
    out[outside_border(mask | border)] = OUTER_BORDER_COLOR
    out[border] = BORDER_COLOR
    # The original truncates to bytes (0.5 * 255 -> 127).
    return np.clip(out, 0, 255).astype(np.uint8)


def unit_strip(thumbs: Sequence[np.ndarray]) -> np.ndarray:
    """Thumbnails side by side with 5-pixel white gaps: ``uint8 [t, k*t + (k-1)*5, 3]``."""
    thumbs = [np.asarray(t, np.uint8) for t in thumbs]
    if not thumbs:
        raise ValueError("a unit strip needs at least one thumbnail")
    shape = thumbs[0].shape
    if any(t.shape != shape for t in thumbs):
        raise ValueError(f"thumbnails differ in shape: {sorted({t.shape for t in thumbs})}")
    gap = np.full((shape[0], GAP, 3), 255, np.uint8)
    pieces = []
    for i, t in enumerate(thumbs):
        if i:
            pieces.append(gap)
        pieces.append(t)
    return np.concatenate(pieces, axis=1)


def strip_path(unit: int) -> str:
    """Path of a unit's strip relative to the layer's results directory."""
    return f"image/unit{int(unit)}.jpg"


def save_strips(directory: str, strips: Mapping[int, np.ndarray]) -> list[str]:
    """Write each strip to ``directory/image/unit<u>.jpg`` (JPEG quality 95); returns the paths."""
    from PIL import Image

    os.makedirs(os.path.join(directory, "image"), exist_ok=True)
    paths = []
    for unit, strip in strips.items():
        path = os.path.join(directory, strip_path(unit))
        with fileio.atomic_file(path) as f:
            Image.fromarray(np.asarray(strip, np.uint8)).save(f, format="JPEG", quality=JPEG_QUALITY)
        paths.append(path)
    return paths
