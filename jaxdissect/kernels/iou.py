"""Exact integer counts for the dataset-wide IoU of thresholded units against labels.

For every pixel p of the segmentation grid, unit u is active when
``act_up[p, u] > threshold[u]`` (strict, as the original). Over the whole
stream the state counts

* ``pixels``: all pixels P;
* ``label_pixels [L]``: ``n_c``, pixels carrying label c in any channel (a
  pixel counts ONCE per label even when two channels carry it);
* ``active [U]``: ``a_u``;
* ``intersection [U, L]``: ``I[u, c]``, pixels carrying c where u is active.

Column 0 is the condition "every pixel" (``n_0 = P``, ``I[u, 0] = a_u``), as
the original's condition 0, so ``iou[:, 0]`` is the unit's activation rate
(quirk 7; :mod:`jaxdissect.kernels.labels` decides whether it competes).
``IoU = I / (a + n - I)``: the original's ratio of dataset sums, computed from
integers instead of float32 running means.

Segmentations are int32 ``[B, K, S, S]`` with labels in ``[0, L)`` (0 = no
label). Image-level labels ``[B, J]`` (Broden scene/texture: the label
covers the whole image; ``-1`` or ``0`` = none) are treated as extra
channels. Out-of-range labels are ignored and counted in ``bad_labels``
(with the first batch id), so the driver can raise naming the batch.

Two formulations, equal by test: ``'matmul'`` (one-hot label matrix times the
0/1 activity matrix, bf16 inputs with float32 accumulation, exact below
2**24 pixels per call, for GPU/TPU matrix units) and ``'segment'``
(segment sums per channel, for CPU). ``'auto'`` picks by backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NO_BATCH = np.iinfo(np.int32).max
_EXACT_F32 = 1 << 24


def default_method() -> str:
    """'matmul' on GPU/TPU (matrix units), 'segment' elsewhere."""
    return "matmul" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "segment"


def init(num_units: int, num_labels: int) -> dict:
    """Zero counts for ``num_units`` units and labels ``0 .. num_labels - 1``."""
    return {
        "pixels": jnp.zeros((), jnp.int32),
        "label_pixels": jnp.zeros((num_labels,), jnp.int32),
        "active": jnp.zeros((num_units,), jnp.int32),
        "intersection": jnp.zeros((num_units, num_labels), jnp.int32),
        "bad_labels": jnp.zeros((), jnp.int32),
        "first_bad_batch": jnp.full((), NO_BATCH, jnp.int32),
    }


def label_channels(seg, image_labels, num_labels, valid):
    """Per-pixel label channels ``[P, C]`` with ignored entries set to ``num_labels``; bad-label flags ``[B]``."""
    b, k, h, w = seg.shape
    seg = jnp.asarray(seg, jnp.int32)
    bad_img = ((seg < 0) | (seg >= num_labels)).reshape(b, -1).any(1)
    chans = jnp.transpose(seg, (0, 2, 3, 1)).reshape(b, h * w, k)
    if image_labels is not None:
        img = jnp.asarray(image_labels, jnp.int32)
        bad_img = bad_img | ((img < -1) | (img >= num_labels)).any(1)
        img = jnp.broadcast_to(img[:, None, :], (b, h * w, img.shape[1]))
        chans = jnp.concatenate([chans, img], axis=2)
    chans = chans.reshape(b * h * w, -1)
    pixel_valid = jnp.repeat(valid, h * w)
    ignore = (chans <= 0) | (chans >= num_labels) | ~pixel_valid[:, None]
    # A label repeated in a later channel of the same pixel is counted once.
    dup = [jnp.zeros(chans.shape[0], bool)]
    for j in range(1, chans.shape[1]):
        dup.append((chans[:, j : j + 1] == chans[:, :j]).any(1))
    ignore = ignore | jnp.stack(dup, 1)
    return jnp.where(ignore, num_labels, chans), bad_img & valid


def label_pixel_counts(chans, num_labels: int):
    """``[L]`` int32: pixels carrying each label in any channel, from :func:`label_channels` (column 0 unset)."""
    label_pixels = jnp.zeros((num_labels + 1,), jnp.int32)
    for j in range(chans.shape[1]):
        label_pixels = label_pixels.at[chans[:, j]].add(1)
    return label_pixels[:num_labels]


def add_counts(state: dict, pixels, label_pixels, active, intersection, bad_images, batch_id) -> dict:
    """``state`` plus one batch's counts (the one merge of the dense and the sparse passes).

    ``pixels`` (valid pixels), ``label_pixels [L]``, ``active [U]``,
    ``intersection [U, L]`` (None: already added to the state's): column 0 (the
    condition "every pixel") is set here from ``pixels`` and ``active``.
    ``bad_images [B]`` flags images with out-of-range labels; ``batch_id``
    (scalar or ``[B]``) the first is recorded.
    """
    batch_id = jnp.broadcast_to(jnp.asarray(batch_id, jnp.int32), bad_images.shape)
    inter = (state["intersection"].at[:, 0].add(active) if intersection is None else
             state["intersection"] + intersection.at[:, 0].set(active))
    return {
        "pixels": state["pixels"] + pixels,
        "label_pixels": state["label_pixels"] + label_pixels.at[0].set(pixels),
        "active": state["active"] + active,
        "intersection": inter,
        "bad_labels": state["bad_labels"] + bad_images.sum(dtype=jnp.int32),
        "first_bad_batch": jnp.minimum(state["first_bad_batch"], jnp.min(jnp.where(bad_images, batch_id, NO_BATCH))),
    }


def update(state: dict, act_up, thresholds, seg, valid=None, batch_id=0, image_labels=None,
           method: str = "auto") -> dict:
    """Fold one batch into the counts.

    ``act_up [B, S, S, U]`` are activations on the segmentation grid,
    ``thresholds [U]``, ``seg [B, K, S, S]`` int32, ``valid [B]`` marks real
    images (padding is ignored), ``batch_id`` (scalar or ``[B]``) is recorded
    when a label is out of range, ``image_labels [B, J]`` optional.
    """
    num_units, num_labels = state["intersection"].shape
    act_up = jnp.asarray(act_up)
    b, s1, s2, u = act_up.shape
    if u != num_units:
        raise ValueError(f"activations have {u} units but the IoU state was made for {num_units}")
    if tuple(seg.shape[:1]) + tuple(seg.shape[2:]) != (b, s1, s2):
        raise ValueError(f"segmentation shape {tuple(seg.shape)} does not match activations {act_up.shape} "
                         "([B, K, S, S] against [B, S, S, U])")
    valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
    chans, bad_img = label_channels(seg, image_labels, num_labels, valid)
    p = b * s1 * s2
    pixel_valid = jnp.repeat(valid, s1 * s2)
    act = (act_up.reshape(p, u) > jnp.asarray(thresholds, act_up.dtype)[None]) & pixel_valid[:, None]
    active = act.sum(0, dtype=jnp.int32)
    method = default_method() if method == "auto" else method
    if method == "matmul":
        if p > _EXACT_F32:
            raise ValueError(f"the matmul IoU formulation is exact up to 2**24 pixels per batch, got {p}; "
                             "use smaller batches or method='segment'")
        member = jax.nn.one_hot(chans, num_labels + 1, dtype=jnp.bfloat16).sum(1)[:, :num_labels]
        inter = jnp.einsum("pu,pl->ul", act.astype(jnp.bfloat16), member,
                           preferred_element_type=jnp.float32).astype(jnp.int32)
        label_pixels = member.astype(jnp.float32).sum(0).astype(jnp.int32)
    elif method == "segment":
        act_i = act.astype(jnp.int32)
        inter = jnp.zeros((num_labels + 1, u), jnp.int32)
        for j in range(chans.shape[1]):
            inter = inter + jax.ops.segment_sum(act_i, chans[:, j], num_segments=num_labels + 1)
        inter = inter[:num_labels].T
        label_pixels = label_pixel_counts(chans, num_labels)
    else:
        raise ValueError(f"unknown IoU method {method!r}; use 'auto', 'matmul' or 'segment'")
    return add_counts(state, pixel_valid.sum(dtype=jnp.int32), label_pixels, active, inter, bad_img, batch_id)


def merge(states: dict) -> dict:
    """Combine partial states stacked on a leading (device) axis; NumPy, counts as int64."""
    out = {k: np.asarray(v).sum(0, dtype=np.int64) for k, v in states.items() if k != "first_bad_batch"}
    out["first_bad_batch"] = np.asarray(states["first_bad_batch"]).min(0)
    return out


def iou(intersection, active, label_pixels) -> np.ndarray:
    """``IoU [U, L] = I / (a_u + n_c - I)`` in float64, 0 where the union is empty."""
    inter = np.array(intersection, np.float64)
    union = np.add.outer(np.asarray(active, np.float64), np.asarray(label_pixels, np.float64))
    union -= inter
    # In place (two [U, L] arrays, not five): an empty union has I = 0, which stays.
    return np.divide(inter, union, out=inter, where=union > 0)
