"""Semantic photo editing with a GAN prior (GANPaint; Bau et al., SIGGRAPH 2019).

* :mod:`~jaxdissect.editing.strokes`: concept brushes from a dissection,
  :class:`Stroke`, :func:`apply_strokes`, :func:`paint`, :func:`erase`.
"""

from jaxdissect.editing.strokes import (Brushes, EditError, Stroke, apply_strokes, compose, erase, paint,
                                        pool_mask, stroke_arrays)

__all__ = ["Brushes", "EditError", "Stroke", "apply_strokes", "compose", "erase", "paint", "pool_mask",
           "stroke_arrays"]
