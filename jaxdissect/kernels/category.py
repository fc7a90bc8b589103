"""Category-conditioned activation counts: the 2017 NetDissect denominator term.

NetDissect (``makeresult.count_act_with_labelcat``) counts a unit's active
pixels only on images that carry some label of the category being scored, so
a scene unit is not penalised for firing on images that have no scene label.
Per batch this is

    A[u, c] += sum over valid images x with category c present of |M_u(x)|

where ``M_u(x) = act_up(x)[..., u] > T_u`` and category c is present on x
when any pixel channel or image-level label of x is a label whose primary
category is c (``label_category[label] == c``; label 0 and labels without a
category, ``-1``, make no category present). It is an int32 matmul of the
per-image active counts ``[B, U]`` with the per-image presence ``[B, C]``.
"""

from __future__ import annotations

import jax.numpy as jnp


def init(num_units: int, num_categories: int):
    """Zero ``[U, C]`` counts."""
    return jnp.zeros((num_units, num_categories), jnp.int32)


def presence(seg, image_labels, label_category, num_categories: int, valid=None):
    """``[B, C]`` bool: image b carries a label whose primary category is c.

    ``seg [B, K, S, S]`` int labels, ``image_labels [B, J]`` or None,
    ``label_category [L]`` int32 (-1 = no category). Out-of-range labels are
    ignored (the IoU kernel reports them).
    """
    label_category = jnp.asarray(label_category, jnp.int32)
    num_labels = label_category.shape[0]
    b = seg.shape[0]
    flat = jnp.asarray(seg, jnp.int32).reshape(b, -1)
    if image_labels is not None:
        flat = jnp.concatenate([flat, jnp.asarray(image_labels, jnp.int32).reshape(b, -1)], axis=1)
    ok = (flat > 0) & (flat < num_labels)
    cats = jnp.where(ok, label_category[jnp.clip(flat, 0, num_labels - 1)], -1)
    out = jnp.stack([(cats == c).any(axis=1) for c in range(num_categories)], axis=1)
    if valid is not None:
        out = out & jnp.asarray(valid, bool)[:, None]
    return out


def update(state, act_up, thresholds, seg, valid, image_labels, label_category):
    """Fold one batch: ``act_up [B, S, S, U]`` on the segmentation grid, ``thresholds [U]``."""
    num_units, num_categories = state.shape
    b = act_up.shape[0]
    valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
    active = (act_up > jnp.asarray(thresholds, act_up.dtype)).reshape(b, -1, num_units)
    per_image = active.sum(axis=1, dtype=jnp.int32) * valid[:, None]
    present = presence(seg, image_labels, label_category, num_categories, valid).astype(jnp.int32)
    return state + jnp.einsum("bu,bc->uc", per_image, present, preferred_element_type=jnp.int32)
