"""Label metrics of every unit against its own label, streamed over a dissection's data.

The kernels of ``dissect(..., label_metrics=True)``'s extra pass. After pass 3
has chosen each unit's label ``l_u`` and threshold ``T_u``, the pass scores the
unit against its label with the sound metrics of :mod:`jaxdissect.explain.metrics`
(IoU, F1, AUPRC, Pearson correlation, cosine; recall and precision fail
NeuronEval's sanity checks and are not reported), at two levels:

* pixel level, on the segmentation grid with the activations upsampled as the
  IoU pass uses them: ``C`` = pixels carrying ``l_u`` (any channel of ``seg``,
  or an image-level label covering the image). IoU and F1 of ``act > T_u``
  from exact integer counts; Pearson and cosine of the continuous activation
  against the 0/1 indicator from sums (per image in float32 on the device,
  shifted by the unit's mean from pass 1, then added on the host in float64);
  AUPRC from per-unit histograms of the activation, positives and negatives
  apart: ``2 * bins`` equal bins over ``[-M_u, M_u]`` (``M_u`` = the unit's
  pass-1 maximum ``|act_max|``, 1 when it is 0; values outside clamp into the
  end bins, which keeps the order), and the average precision with each bin one
  tied step (as :func:`jaxdissect.explain.metrics.auprc` treats tied values).
  The same histogram gives bounds ``[lower, upper]`` that provably contain the
  exact average precision of the unbinned activations (:func:`binned_average_precision`).
* image level, exactly on the host: a unit's score for an image is the max of
  its raw (not upsampled) activation, the concept is "``l_u`` anywhere in the
  image", and the binary metrics use ``score > T_u``.

A unit with label 0 (no concept) gets no metrics (None).
:func:`init` / :func:`update` are pure, jit-friendly, static-shape kernels for
one device's state; :class:`HostSums` adds each batch's per-image outputs in
float64; :func:`finish` turns both into per-unit metrics.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Bins of each sign of the activation; 2 * AUPRC_BINS per unit and concept value.
AUPRC_BINS = 1024
METRIC_NAMES = ("iou", "f1", "auprc", "pearson", "cosine")


def init(thresholds, labels, act_mean, act_max, bins: int = AUPRC_BINS) -> dict:
    """One layer's device state: the unit's threshold, label, shift, bin scale, zero counts."""
    thresholds = np.asarray(thresholds, np.float32)
    u = thresholds.shape[0]
    scale = np.abs(np.asarray(act_max, np.float64))
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0).astype(np.float32)
    return {
        "threshold": thresholds,
        "label": np.asarray(labels, np.int32).reshape(u),
        "shift": np.nan_to_num(np.asarray(act_mean, np.float32).reshape(u)),
        "scale": scale,
        "intersection": np.zeros((u,), np.int32),
        "active": np.zeros((u,), np.int32),
        "concept": np.zeros((u,), np.int32),
        "pixels": np.zeros((), np.int32),
        "hist": np.zeros((u, 4 * bins), np.int32),   # [negatives' 2*bins | positives' 2*bins]
    }


def concept_mask(labels, seg, image_labels=None):
    """Bool ``[B, S, S, U]``: the pixel carries unit u's label (label 0 never)."""
    labels = jnp.asarray(labels, jnp.int32)
    seg = jnp.asarray(seg, jnp.int32)
    hit = jnp.zeros(seg.shape[:1] + seg.shape[2:] + labels.shape, bool)
    for k in range(seg.shape[1]):
        hit = hit | (seg[:, k, :, :, None] == labels)
    if image_labels is not None:
        img = jnp.asarray(image_labels, jnp.int32)
        present = (img[:, :, None] == labels).any(1)               # [B, U]
        hit = hit | present[:, None, None, :]
    return hit & (labels > 0)


def update(state, up, raw, seg, valid, image_labels=None):
    """Fold one batch; returns ``(state, per_image)``.

    ``up [B, S, S, U]``: activations upsampled to the segmentation grid;
    ``raw [B, h, w, U]``: the layer's activations; ``seg [B, K, S, S]``;
    ``valid [B]``. ``per_image`` (float32 ``[B, U]`` each, for the host):
    ``sum``, ``sum_sq``, ``sum_concept`` of the shifted upsampled activation
    over the image's pixels (all, all squared, those carrying the label),
    ``max`` of the raw activation and ``present`` (the label is in the image).
    """
    up = jnp.asarray(up, jnp.float32)
    _, s1, s2, u = up.shape
    concept = concept_mask(state["label"], seg, image_labels)
    vmask = jnp.asarray(valid, bool)[:, None, None, None]
    active = up > state["threshold"]
    cv = concept & vmask

    def count(m):
        return m.sum((0, 1, 2), dtype=jnp.int32)

    bins2 = state["hist"].shape[1] // 2
    half = bins2 // 2
    # Monotone in the activation: equal values share a bin, and a higher bin never holds a lower value.
    index = jnp.floor((up / state["scale"] + 1.0) * half)
    index = jnp.clip(index, 0, bins2 - 1).astype(jnp.int32) + jnp.where(concept, bins2, 0)
    rows = jnp.arange(u, dtype=jnp.int32) * (2 * bins2)
    flat = jnp.where(vmask, index + rows, u * 2 * bins2).reshape(-1)
    hist = state["hist"].reshape(-1).at[flat].add(1, mode="drop").reshape(u, 2 * bins2)
    d = jnp.where(vmask, up - state["shift"], 0.0)
    per_image = {
        "sum": d.sum((1, 2)),
        "sum_sq": (d * d).sum((1, 2)),
        "sum_concept": jnp.where(concept, d, 0.0).sum((1, 2)),
        "max": jnp.asarray(raw, jnp.float32).max((1, 2)),
        "present": concept.any((1, 2)),
    }
    new = dict(state)
    new.update(intersection=state["intersection"] + count(active & cv),
               active=state["active"] + count(active & vmask), concept=state["concept"] + count(cv),
               pixels=state["pixels"] + jnp.asarray(valid, bool).sum(dtype=jnp.int32) * (s1 * s2), hist=hist)
    return new, per_image


class HostSums:
    """Per-image outputs of :func:`update`, added on the host: float64 sums and the image-level table.

    ``state`` (a dict of NumPy arrays, checkpointed with the pass) holds
    ``sum``, ``sum_sq``, ``sum_concept`` float64 ``[U]`` and the per-image
    ``image_max`` float32 ``[N, U]``, ``image_present`` bool ``[N, U]`` and
    ``image_seen`` bool ``[N]``.
    """

    @staticmethod
    def init(num_images: int, num_units: int) -> dict:
        return {"sum": np.zeros(num_units), "sum_sq": np.zeros(num_units), "sum_concept": np.zeros(num_units),
                "image_max": np.zeros((num_images, num_units), np.float32),
                "image_present": np.zeros((num_images, num_units), bool),
                "image_seen": np.zeros((num_images,), bool)}

    @staticmethod
    def add(state: dict, per_image: dict, index, valid) -> dict:
        """Add one batch (``index``/``valid`` ``[B]``); the image rows are written in place."""
        valid = np.asarray(valid, bool)
        index = np.asarray(index)[valid]
        out = dict(state)
        for k in ("sum", "sum_sq", "sum_concept"):
            out[k] = state[k] + np.asarray(per_image[k], np.float64)[valid].sum(0)
        out["image_max"][index] = np.asarray(per_image["max"])[valid]
        out["image_present"][index] = np.asarray(per_image["present"])[valid]
        out["image_seen"][index] = True
        return out


def _ratio(num, den):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def binned_average_precision(negatives, positives):
    """Average precision from per-bin counts ``[U, nb]`` (bins in ascending activation order).

    Returns ``(ap, lower, upper)`` ``[U]``: ``ap`` treats each bin as one tied
    step (precision at the bin's end credited to each of its positives, as
    tied activations are); ``lower``/``upper`` bound the exact average precision
    (same step convention for tied values) of ANY activations that fall into
    these bins: within a bin, the j-th of its ``t`` positives (``n`` items,
    after ``a`` positives of ``b`` items in higher bins) is credited a precision
    between ``(a + j) / (b + n - t + j)`` and ``(a + t) / (b + t)``.
    """
    from scipy.special import digamma

    neg = np.asarray(negatives, np.float64)[:, ::-1]
    pos = np.asarray(positives, np.float64)[:, ::-1]
    n = neg + pos
    a = np.cumsum(pos, 1) - pos          # positives in higher bins
    b = np.cumsum(n, 1) - n              # items in higher bins
    total = pos.sum(1)
    ap = _ratio((pos * _ratio(a + pos, b + n)).sum(1), total)
    upper = _ratio((pos * _ratio(a + pos, b + pos)).sum(1), total)
    # sum_{j=1..t} (a + j) / (c + j) = t - (c - a) (psi(c + t + 1) - psi(c + 1)), c = b + n - t
    c = b + neg
    with np.errstate(invalid="ignore"):
        low = pos - (c - a) * (digamma(c + pos + 1) - digamma(c + 1))
    low = np.where(pos > 0, low, 0.0)
    lower = _ratio(low.sum(1), total)
    return ap, np.minimum(lower, ap), np.maximum(upper, ap)


def average_precision(scores, labels):
    """Exact average precision per column of ``scores [N, U]`` for ``labels [N, U]`` (ties as one step)."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    out = np.zeros(scores.shape[1])
    for u in range(scores.shape[1]):
        s, y = scores[:, u], labels[:, u]
        if not y.any():
            continue
        order = np.argsort(-s, kind="stable")
        s, y = s[order], y[order]
        end = np.r_[s[1:] != s[:-1], True]
        tp = np.cumsum(y)[end]
        k = np.flatnonzero(end) + 1.0
        gain = np.diff(np.r_[0, tp])
        out[u] = (gain * tp / k).sum() / y.sum()
    return out


def _pearson_cosine(n, s1, s2, sc, c, shift):
    """Pearson and cosine from shifted sums: ``s1 = sum d``, ``s2 = sum d^2``, ``sc = sum_{concept} d``,
    ``c`` = concept count, ``d = a - shift``, over ``n`` samples."""
    n = np.asarray(n, np.float64)
    shift = np.asarray(shift, np.float64)
    cov = sc - s1 * _ratio(c, n)
    var_a = np.maximum(s2 - s1 * _ratio(s1, n), 0.0)
    var_c = c * (n - c) / np.where(n > 0, n, 1.0)
    pearson = _ratio(cov, np.sqrt(var_a * var_c))
    dot = sc + shift * c
    sq = np.maximum(s2 + 2 * shift * s1 + n * shift * shift, 0.0)
    cosine = _ratio(dot, np.sqrt(sq * c))
    return pearson, cosine


def image_metrics(scores, present, thresholds) -> dict:
    """The five metrics at image level, exactly (float64): ``scores``/``present`` ``[N, U]``."""
    scores = np.asarray(scores, np.float64)
    present = np.asarray(present, bool)
    active = scores > np.asarray(thresholds, np.float64)[None]
    inter = (active & present).sum(0)
    a, c = active.sum(0), present.sum(0)
    n = scores.shape[0]
    pearson, cosine = _pearson_cosine(np.full(scores.shape[1], n), scores.sum(0), (scores * scores).sum(0),
                                      (scores * present).sum(0), c, 0.0)
    return {"iou": _ratio(inter, a + c - inter), "f1": _ratio(2 * inter, a + c),
            "auprc": average_precision(scores, present), "pearson": pearson, "cosine": cosine}


def finish(device: dict, host: dict) -> dict:
    """Per-unit metrics ``{'pixel': {name: [U]}, 'image': {...}, 'auprc_bounds': [U, 2]}``.

    ``device``: the states of :func:`update` with a leading device axis
    (counts summed over it); ``host``: the :class:`HostSums` state.
    """
    dev = {k: np.asarray(v) for k, v in device.items()}
    counts = {k: dev[k].astype(np.int64).sum(0) for k in ("intersection", "active", "concept", "pixels", "hist")}
    first = {k: dev[k][0] for k in ("threshold", "label", "shift")}
    inter, act, conc, n = counts["intersection"], counts["active"], counts["concept"], counts["pixels"]
    bins2 = counts["hist"].shape[1] // 2
    ap, lower, upper = binned_average_precision(counts["hist"][:, :bins2], counts["hist"][:, bins2:])
    pearson, cosine = _pearson_cosine(np.full(inter.shape, n), host["sum"], host["sum_sq"], host["sum_concept"],
                                      conc.astype(np.float64), first["shift"])
    pixel = {"iou": _ratio(inter, act + conc - inter), "f1": _ratio(2 * inter, act + conc), "auprc": ap,
             "pearson": pearson, "cosine": cosine}
    seen = np.asarray(host["image_seen"], bool)
    image = image_metrics(np.asarray(host["image_max"])[seen], np.asarray(host["image_present"])[seen],
                          first["threshold"])
    return {"pixel": pixel, "image": image, "auprc_bounds": np.stack([lower, upper], 1),
            "label": first["label"], "counts": {"intersection": inter, "active": act, "concept": conc,
                                                "pixels": int(n), "images": int(seen.sum())}}


def unit_entries(metrics: dict) -> list:
    """``report.json`` entries per unit: ``{'pixel': {...}, 'image': {...}}`` (None for label 0)."""
    out = []
    for u, label in enumerate(np.asarray(metrics["label"]).tolist()):
        if label <= 0:
            out.append(None)
            continue
        entry = {lvl: {m: float(metrics[lvl][m][u]) for m in METRIC_NAMES} for lvl in ("pixel", "image")}
        entry["pixel"]["auprc_bounds"] = [float(v) for v in metrics["auprc_bounds"][u]]
        out.append(entry)
    return out



def medians(entries) -> dict:
    """Per-layer medians ``{'median_pixel_iou': ..., 'median_image_cosine': ...}`` over units with a label."""
    scored = [e for e in entries if e]
    return {f"median_{lvl}_{m}": round(float(np.median([e[lvl][m] for e in scored])), 4) if scored else float("nan")
            for lvl in ("pixel", "image") for m in METRIC_NAMES}


def describe(bins: int = AUPRC_BINS) -> str:
    """The settings line of a report: what is measured and how AUPRC is binned."""
    return (f"IoU and F1 (activation > the unit's threshold), AUPRC, Pearson r and cosine of each unit against "
            f"its label; pixel level: upsampled activations on the segmentation grid, AUPRC over {2 * bins} "
            "equal bins per unit on [-max, max] (|pass-1 maximum|), a bin counted as tied values, with bounds "
            "on the exact value in report.json; image level: each image's max raw activation vs the label "
            "anywhere in the image, exact")


# NeuronEval's sanity checks on the metrics of jaxdissect.explain.metrics, as metrics.sanity_report()
# finds them (asserted in tests/test_explain_metrics.py): why recall and precision are left out.
SANITY = ("iou, f1, auprc, pearson, cosine pass the missing- and extra-labels checks "
          "(jaxdissect.explain.metrics.sanity_report); recall not reported: fails the extra-labels check; "
          "precision not reported: fails the missing-labels check")
