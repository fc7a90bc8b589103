"""Formulas and significance inside ``jaxdissect.dissect``, from the masks of its IoU pass.

:class:`MaskCollector` keeps, per batch of pass 3, each layer's unit masks
(``upsampled activation > exact threshold`` at the segmentation resolution)
and the concept masks of the labels, bit-packed on the host (``np.packbits``),
keyed by batch index. :func:`explain_layer` then runs
:func:`~jaxdissect.explain.compositional` and the significance tests on them.

Host memory: ``(units of all layers + labels) x images x S^2`` bits kept (S =
the segmentation resolution), e.g. 512 units x 10,000 images x 56^2 = 2 GB;
:meth:`MaskCollector.masks` unpacks one layer's units and every label to one
byte per pixel (8 times that) for the search and the tests.
"""

from __future__ import annotations

import numpy as np

from jaxdissect.explain.compositional import compositional, formula_mask
from jaxdissect.explain.significance import (benjamini_hochberg, bootstrap_iou, label_significance,
                                             mask_significance)


def concept_masks(seg, image_labels, num_labels: int) -> np.ndarray:
    """Boolean ``[B, L, S*S]``: pixel of image b carries label l (any channel of ``seg [B, K, S, S]``, or
    an image-level label of ``image_labels [B, J]``, which covers the whole image). Label 0 = none."""
    seg = np.asarray(seg)
    b, _, h, w = seg.shape
    out = np.zeros((b, num_labels + 1, h * w), bool)
    flat = np.clip(seg.reshape(b, seg.shape[1], h * w), 0, num_labels).astype(np.int64)
    rows = np.arange(b)[:, None]
    cols = np.arange(h * w)[None]
    for k in range(flat.shape[1]):
        out[rows, flat[:, k], cols] = True
    if image_labels is not None:
        img = np.clip(np.asarray(image_labels).astype(np.int64), 0, num_labels)
        for j in range(img.shape[1]):
            out[np.arange(b), img[:, j]] = True
    out[:, 0] = False
    return out[:, :num_labels]


class MaskCollector:
    """Bit-packed unit and concept masks per batch of a pass (``add``), in batch order (``masks``)."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.units: dict[int, dict[str, np.ndarray]] = {}
        self.concepts: dict[int, np.ndarray] = {}
        self.positions = None

    def add(self, batch: int, unit_masks: dict, seg, image_labels, valid) -> None:
        """``unit_masks {layer: bool [B, S, S, U]}``; only the ``valid`` images are kept."""
        valid = np.asarray(valid, bool)
        if not valid.any():
            return
        self.units[batch] = {n: np.packbits(np.moveaxis(np.asarray(m)[valid].reshape(valid.sum(), -1,
                                                                                   m.shape[-1]), -1, 0), axis=-1)
                             for n, m in unit_masks.items()}
        cm = concept_masks(np.asarray(seg)[valid], None if image_labels is None else
                           np.asarray(image_labels)[valid], self.num_labels)
        self.positions = cm.shape[-1]
        self.concepts[batch] = np.packbits(np.moveaxis(cm, 1, 0), axis=-1)     # [L, b, S*S/8]

    def masks(self, layer: str) -> tuple[np.ndarray, np.ndarray, int]:
        """``(unit_masks [U, N*P], concept_masks [L, N*P], N)`` boolean, images in batch order."""
        order = sorted(self.units)
        units = np.concatenate([self.units[b][layer] for b in order], 1)
        concepts = np.concatenate([self.concepts[b] for b in order], 1)
        n = units.shape[1]
        unpack = lambda x: np.unpackbits(x, axis=-1, count=self.positions).astype(bool).reshape(x.shape[0], -1)  # noqa: E731
        return unpack(units), unpack(concepts), n


def explain_layer(unit_masks, concept_masks_, label_names, num_images: int, *, length: int = 0,
                  exact: bool = False, beam: int = 5, permutations: int = 0, q: float = 0.05,
                  seed: int = 0) -> list[dict]:
    """Per unit: ``formula``, ``formula_iou`` (``length`` > 0) and ``p_value``, ``q_value``,
    ``significant``, ``iou_ci`` of its best label, ``formula_p_value``, ``formula_q_value``
    (``permutations`` > 0). Label 0 (no label) is never used; BH runs over every tested pair."""
    names = list(label_names)[1:]
    concepts = concept_masks_[1:]
    num_units = unit_masks.shape[0]
    out = [{} for _ in range(num_units)]
    found = None
    if length > 0:
        found = compositional(unit_masks, concepts, names, length=length, beam=beam, exact=exact)
        for u, e in enumerate(found):
            out[u].update(formula=e.formula, formula_iou=float(e.iou))
    if permutations > 0:
        sig = label_significance(unit_masks, concepts, num_images, permutations=permutations, seed=seed)
        best = concepts[sig["label"]]
        ci = bootstrap_iou(unit_masks, best, num_images, samples=permutations, seed=seed)
        p = [sig["p_value"]]
        if found is not None:
            fm = np.stack([formula_mask(concepts, e) for e in found])
            p.append(mask_significance(unit_masks, fm, num_images, permutations=permutations, seed=seed)["p_value"])
        significant, adjusted = benjamini_hochberg(np.concatenate(p), q)
        for u in range(num_units):
            out[u].update(p_value=float(sig["p_value"][u]), q_value=float(adjusted[u]),
                          significant=bool(significant[u]), iou_ci=[float(ci[u, 0]), float(ci[u, 1])])
            if found is not None:
                out[u].update(formula_p_value=float(p[1][u]), formula_q_value=float(adjusted[num_units + u]),
                              formula_significant=bool(significant[num_units + u]))
    return out
