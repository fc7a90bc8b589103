"""Segmentation: label image pixels with concepts (objects, parts, materials, colours).

* :func:`load_segmenter`, :func:`segment`, :func:`segmenter_from_spec`: the
  whole labelling (:mod:`~jaxdissect.segmentation.segmenter`).
* :class:`UnifiedParsing`: ResNet-50 + UPerNet unified perceptual parser
  (:mod:`~jaxdissect.segmentation.upernet`).
* :class:`ColorSegmenter`: dilated ResNet-18 + pyramid pooling colour segmenter
  (:mod:`~jaxdissect.segmentation.ppm`).
* Preprocessing and PyTorch-exact resizing in :mod:`jaxdissect.segmentation.preprocess`.
* The merged label space and quadrant split in :mod:`~jaxdissect.segmentation.labels` and
  :mod:`~jaxdissect.segmentation.quad`.
* The on-disk cache of label maps shared by every dissection of a dataset:
  :mod:`~jaxdissect.segmentation.cache`.

Convert the published PyTorch checkpoints with ``python -m converters.segmenter``.
"""

from jaxdissect.segmentation.cache import SegmentationCache, open_segmentation_cache
from jaxdissect.segmentation.ppm import ColorSegmenter
from jaxdissect.segmentation.preprocess import (
    adaptive_avg_pool,
    color_preprocess,
    resize_bilinear,
    upp_preprocess,
)
from jaxdissect.segmentation.prroi import prroi_pool
from jaxdissect.segmentation.segmenter import (
    Segmenter,
    SegmenterError,
    load_segmenter,
    segment,
    segmenter_from_spec,
)
from jaxdissect.segmentation.upernet import UnifiedParsing

__all__ = [
    "ColorSegmenter",
    "SegmentationCache",
    "Segmenter",
    "SegmenterError",
    "UnifiedParsing",
    "adaptive_avg_pool",
    "color_preprocess",
    "load_segmenter",
    "open_segmentation_cache",
    "prroi_pool",
    "resize_bilinear",
    "segment",
    "segmenter_from_spec",
    "upp_preprocess",
]
