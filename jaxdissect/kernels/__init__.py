"""Pure, jit-friendly kernels of the dissection statistics (state in, state out).

* :mod:`~jaxdissect.kernels.upsample`: feature map -> segmentation grid geometry.
* :mod:`~jaxdissect.kernels.quantile`: exact per-unit quantiles (two radix passes).
* :mod:`~jaxdissect.kernels.iou`: exact integer IoU counts against segmentations.
* :mod:`~jaxdissect.kernels.topk`: per-unit top-k images, exact mean, max.
* :mod:`~jaxdissect.kernels.labels`: best label per unit.

Every statistic is ``init -> update(state, batch) -> state`` using only its own
data, so per-device states are independent partial results merged once.
"""

from jaxdissect.kernels import iou, labels, quantile, topk, upsample

__all__ = ["iou", "labels", "quantile", "topk", "upsample"]
