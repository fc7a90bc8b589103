"""Semantic photo editing with a GAN prior (GANPaint; Bau et al., SIGGRAPH 2019).

* :mod:`~jaxdissect.editing.strokes`: concept brushes from a dissection,
  :class:`Stroke`, :func:`apply_strokes`, :func:`paint`, :func:`erase`.
* :mod:`~jaxdissect.editing.inversion`: :func:`invert` a photo into the edit
  layer (encoder start, residuals on the layers below, pixel + perceptual L1).
* :mod:`~jaxdissect.editing.adaptation`: :func:`adapt` the generator to one
  image with multiplicative maps from a small noise network.
"""

from jaxdissect.editing.adaptation import Adaptation, NoiseMaps, adapt, keep_mask
from jaxdissect.editing.inversion import Inversion, invert
from jaxdissect.editing.optimize import psnr

from jaxdissect.editing.strokes import (Brushes, EditError, Stroke, apply_strokes, compose, erase, paint,
                                        pool_mask, stroke_arrays)

__all__ = ["Adaptation", "Inversion", "NoiseMaps", "adapt", "invert", "keep_mask", "psnr", "Brushes", "EditError", "Stroke", "apply_strokes", "compose", "erase", "paint", "pool_mask",
           "stroke_arrays"]
