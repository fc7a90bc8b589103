"""Best label per unit from the IoU matrix.

Column 0 of the IoU matrix is the condition "every pixel", i.e. the unit's
activation rate. The original takes the maximum over all columns including
that one (quirk 7), so a unit whose best real IoU is below its activation
rate (about ``quantile``) gets label 0 (``'-'``). By default here only real
labels ``1 .. L-1`` compete; ``row0_competes=True`` reproduces the original.
A unit is interpretable when its IoU is strictly above ``miniou`` (the
original's labelling rule; its report reader used ``>=``, quirk 10).
Ties go to the lowest label index.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def best_labels(iou, miniou: float = 0.04, row0_competes: bool = False):
    """``(label [U], iou [U], interpretable [U])`` from ``iou [U, L]``.

    Jit-friendly on JAX arrays; NumPy inputs stay NumPy (and float64).
    """
    xp = np if isinstance(iou, np.ndarray) else jnp
    iou = xp.asarray(iou)
    start = 0 if row0_competes else 1
    if iou.ndim != 2 or iou.shape[1] <= start:
        raise ValueError(f"IoU matrix of shape {iou.shape} has no label columns to choose from")
    label = xp.argmax(iou[:, start:], axis=1) + start
    best = xp.take_along_axis(iou, label[:, None], 1)[:, 0]
    return label, best, (best > miniou) & (label > 0)


def describe(label, label_names=None, categories=None) -> list[tuple[str, str]]:
    """Host helper: ``(name, category)`` per unit; ``'-'`` for label 0, the label index when names are missing."""
    out = []
    for c in np.asarray(label).tolist():
        name = "-" if c <= 0 else (label_names[c] if label_names is not None else str(c))
        cat = categories[c] if categories is not None and c > 0 else "-"
        out.append((str(name), str(cat)))
    return out
