"""Segmentation networks that label image pixels with concepts (objects, parts, materials, colours).

* :class:`UnifiedParsing`: ResNet-50 + UPerNet unified perceptual parser.
* :class:`ColorSegmenter`: dilated ResNet-18 + pyramid pooling colour segmenter.
* Preprocessing and PyTorch-exact resizing in :mod:`jaxdissect.segmenters.preprocess`.
* The merged label space and quadrant split in :mod:`~jaxdissect.segmenters.labels` and
  :mod:`~jaxdissect.segmenters.quad`; the whole labelling is :func:`jaxdissect.segment`.

Convert the published PyTorch checkpoints with ``python -m converters.segmenter``.
"""

from jaxdissect.segmenters.ppm import ColorSegmenter
from jaxdissect.segmenters.preprocess import (
    adaptive_avg_pool,
    color_preprocess,
    resize_bilinear,
    upp_preprocess,
)
from jaxdissect.segmenters.prroi import prroi_pool
from jaxdissect.segmenters.upernet import UnifiedParsing

__all__ = [
    "ColorSegmenter",
    "UnifiedParsing",
    "adaptive_avg_pool",
    "color_preprocess",
    "prroi_pool",
    "resize_bilinear",
    "upp_preprocess",
]
