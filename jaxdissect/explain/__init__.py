"""Beyond single labels: compositional explanations, label significance and label metrics.

* :func:`compositional`: best formula of concepts per unit (beam search or exact).
* :class:`SparseMasks`: bit-packed, block-sparse masks the search runs on; :class:`ImageMasks`:
  bit-packed per image, non-empty (mask, image) pairs only (what a dissection collects).
* :mod:`~jaxdissect.explain.significance`: permutation p-values, BH, bootstrap intervals.
* :mod:`~jaxdissect.explain.metrics`: label metrics and their sanity checks.
* :mod:`~jaxdissect.explain.unit_metrics`: the same metrics streamed over a dissection
  (``dissect(..., label_metrics=True)``).
"""

from jaxdissect.explain import metrics, unit_metrics
from jaxdissect.explain.compositional import (Explanation, compositional, formula_image_masks, formula_mask,
                                              formula_text)
from jaxdissect.explain.packed import ImageMasks, SparseMasks, pack_bits
from jaxdissect.explain.significance import (benjamini_hochberg, bootstrap_iou, label_significance,
                                             mask_significance)

__all__ = ["Explanation", "ImageMasks", "SparseMasks", "benjamini_hochberg", "bootstrap_iou", "compositional",
           "formula_image_masks", "formula_mask", "formula_text", "label_significance", "mask_significance",
           "metrics", "pack_bits", "unit_metrics"]
