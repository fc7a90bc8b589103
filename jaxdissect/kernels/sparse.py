"""Statistics passes that upsample only the cells that can reach a unit's top quantile.

A two-tap bilinear upsample (:mod:`~jaxdissect.kernels.upsample`) reads, for
target pixel ``(t, s)``, the four source values at rows ``i0h[t], i1h[t]``
and columns ``i0w[s], i1w[s]`` with non-negative weights summing to at most
one. Target pixels sharing those four corners form a *cell* (14 -> 56: 15 x 15
cells of up to 4 x 4 pixels), and no value in a cell exceeds
``max(0, largest corner)`` (up to rounding, covered by a relative slack of
2**-16). So for a per-unit cut ``c``, only cells whose bound reaches ``c``
can hold values ``>= c``; the others are skipped without being upsampled.
Post-ReLU maps are mostly zero and the statistics look only at the top
quantile, so after the first batches a few percent of the cells are "hot".

The hot cells of a batch are counted once (a running count) and visited in
chunks of static size in a ``while_loop``, so a batch costs in proportion to
its hot cells and the histograms are updated in place (a ``lax.switch`` over
capacity tiers copied the 256 MiB pass-2 state on XLA:CPU). NaN/Inf corners
make a cell hot, so non-finite values are counted as by the dense kernels.
Hot-cell values are computed with exactly the dense upsample's arithmetic
(rows, then columns, the same expression per tap pair), so both paths see
bit-identical values; tests compare them.

The three passes:

* pass 1: the quantile's high-16-bit histogram only for values whose bucket
  is at or above a running per-unit *floor* ``b*``: the highest bucket such
  that at least ``K = n - floor((n - 1) * level)`` values seen so far lie at
  or above it, where ``n`` is an upper bound on the final number of values
  (from the number of images). ``K`` values ``>= c`` guarantee the final
  level ``>= c``, so every bucket the level can fall in is counted fully;
  values below the floor are only counted (``count``), and
  :func:`jaxdissect.kernels.quantile.select` puts that count into bucket 0,
  which no finite value uses.
* pass 2: the low-16-bit histogram of the two selected buckets; hot cells
  are those whose bound reaches the lower edge of the first bucket.
* pass 3: active pixels ``value > T_u`` exist only in cells whose bound
  exceeds ``T_u``; intersections are scattered from those pixels only, and
  the unit-independent counts (pixels, label pixels) come from the labels.
  When more than 1/16 of the cells are hot (e.g. a negative level), the
  dense IoU kernel runs instead (``lax.cond``; this state is small).

Every path gives exactly the same results as the dense kernels (tested).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.kernels import iou as iou_k
from jaxdissect.kernels import quantile as quantile_k
from jaxdissect.kernels.upsample import Taps

SLACK = 2.0 ** -16
CHUNK = 64                   # hot cells are visited 1/64 of a batch's cells at a time
DENSE_IOU = 16               # pass 3 takes the dense kernel when more than 1/16 of the cells are hot
_COARSE = 256                # the floor search: 256 coarse buckets of 256 fine ones
_FIRST_FINITE = 0x0080       # smallest high-16-bit key bucket of a finite float32 (-FLT_MAX)


@dataclasses.dataclass(frozen=True)
class AxisCells:
    """One axis: cell ``c`` reads source indices ``i0[c], i1[c]``; its members are target pixels.

    ``members [C, M]`` (-1 = padding), ``w0``/``w1 [C, M]`` their tap weights.
    """

    i0: np.ndarray
    i1: np.ndarray
    members: np.ndarray
    w0: np.ndarray
    w1: np.ndarray


def axis_cells(taps: Taps) -> AxisCells:
    """Group the target pixels of one axis by the source pair they read."""
    pairs = {}
    for t, key in enumerate(zip(np.asarray(taps.i0).tolist(), np.asarray(taps.i1).tolist())):
        pairs.setdefault(key, []).append(t)
    width = max(len(v) for v in pairs.values())
    members = np.full((len(pairs), width), -1, np.int32)
    for c, ts in enumerate(pairs.values()):
        members[c, :len(ts)] = ts
    safe = np.maximum(members, 0)
    w0 = np.where(members >= 0, np.asarray(taps.w0, np.float32)[safe], 0).astype(np.float32)
    w1 = np.where(members >= 0, np.asarray(taps.w1, np.float32)[safe], 0).astype(np.float32)
    keys = np.array(list(pairs), np.int32).reshape(-1, 2)
    return AxisCells(keys[:, 0], keys[:, 1], members, w0, w1)


def _lerp(w0, a, w1, b):
    """One tap pair, written exactly as :func:`jaxdissect.kernels.upsample.apply_taps` writes it."""
    return w0 * a + w1 * b


def cell_bounds(acts, ch: AxisCells, cw: AxisCells):
    """``[B, Ch, Cw, U]``: no upsampled value of a cell exceeds this (``max(0, corners)`` plus slack).

    NaN where a corner is NaN or infinite, so such cells are always visited.
    """
    a = jnp.asarray(acts, jnp.float32)
    a = jnp.where(jnp.isfinite(a), a, jnp.nan)
    rows = jnp.maximum(a[:, ch.i0], a[:, ch.i1])
    m = jnp.maximum(jnp.maximum(rows[:, :, cw.i0], rows[:, :, cw.i1]), 0.0)
    return m + m * SLACK


def _hot(bounds, cut, valid):
    """Cells to visit: bound reaches ``cut [U]`` (or is NaN), of real images only."""
    return ((bounds >= cut) | jnp.isnan(bounds)) & valid[:, None, None, None]


def _values(acts, entries, ch: AxisCells, cw: AxisCells):
    """Upsampled values ``[E, Mh, Mw]`` of the cells ``entries`` (flat ``[B, Ch, Cw, U]`` indices)."""
    b, _, w, u = acts.shape
    nch, ncw = len(ch.i0), len(cw.i0)
    unit = entries % u
    cwi = (entries // u) % ncw
    chi = (entries // (u * ncw)) % nch
    img = entries // (u * ncw * nch)
    flat = jnp.asarray(acts, jnp.float32).reshape(-1)

    def corner(hi, wi):
        return flat[((img * acts.shape[1] + hi[chi]) * w + wi[cwi]) * u + unit]

    i0h, i1h, i0w, i1w = (jnp.asarray(x) for x in (ch.i0, ch.i1, cw.i0, cw.i1))
    a00, a10, a01, a11 = corner(i0h, i0w), corner(i1h, i0w), corner(i0h, i1w), corner(i1h, i1w)
    wh0, wh1 = jnp.asarray(ch.w0)[chi][:, :, None], jnp.asarray(ch.w1)[chi][:, :, None]   # [E, Mh, 1]
    r0 = _lerp(wh0, a00[:, None, None], wh1, a10[:, None, None])                         # column i0w
    r1 = _lerp(wh0, a01[:, None, None], wh1, a11[:, None, None])                         # column i1w
    ww0, ww1 = jnp.asarray(cw.w0)[cwi][:, None, :], jnp.asarray(cw.w1)[cwi][:, None, :]   # [E, 1, Mw]
    values = _lerp(ww0, r0, ww1, r1)
    ty = jnp.asarray(ch.members)[chi][:, :, None]
    tx = jnp.asarray(cw.members)[cwi][:, None, :]
    inside = (ty >= 0) & (tx >= 0)
    return values, unit, img, jnp.maximum(ty, 0), jnp.maximum(tx, 0), inside


def _prefix_count(flat):
    """Inclusive running count of ``flat`` (bool) as int32: a cumsum along rows of 256, plus row offsets.

    A quarter of the time of ``jnp.nonzero``'s compaction on XLA:CPU, which
    sums over the whole array and then scatters every index.
    """
    r = 256
    rows = jnp.pad(flat, (0, (-flat.size) % r)).reshape(-1, r)
    within = jnp.cumsum(rows, axis=1, dtype=jnp.int32)
    offsets = jnp.cumsum(within[:, -1]) - within[:, -1]
    return (within + offsets[:, None]).reshape(-1)[:flat.size]


def _foreach_hot(hot, fn, carry):
    """Fold ``fn(entries, ok, carry)`` over the hot cells, ``CHUNK``-th of the cells at a time.

    A running count of the hot cells is made once; each step of a
    ``while_loop`` finds its chunk of (static size) hot cells in it by binary
    search, in increasing order, so a batch costs in proportion to its hot
    cells and the (large) histogram state is updated in place.
    """
    total = hot.size
    cap = max(1, total // CHUNK)
    prefix = _prefix_count(hot.reshape(-1))
    n = prefix[-1]
    offsets = jnp.arange(1, cap + 1, dtype=jnp.int32)

    def body(c):
        k, carry = c
        # The j-th hot cell is the first whose running count reaches j + 1; past the last, ``total``.
        entries = jnp.searchsorted(prefix, k * cap + offsets, side="left").astype(jnp.int32)
        return k + 1, fn(jnp.minimum(entries, total - 1), entries < total, carry)

    return jax.lax.while_loop(lambda c: c[0] * cap < n, body, (jnp.int32(0), carry))[1]


# --------------------------------------------------------------------------
# Pass 1.


def floor_target(images: int | None, pixels: int, level: float) -> int:
    """``K``: values at or above a cut that prove the final level is at or above it (0 = no floor).

    ``images`` is an upper bound on the images of the whole stream (``K`` only
    grows with ``n``, so an upper bound is safe).
    """
    if not images:
        return 0
    n = int(images) * int(pixels)
    return int(n - np.floor((n - 1) * float(level)))


def pass1_init(num_units: int, target: int) -> dict:
    state = quantile_k.high_init(num_units)
    state.update({"coarse": jnp.zeros((num_units, _COARSE), jnp.int32),
                  "count": jnp.zeros((num_units,), jnp.int32),
                  "floor": jnp.zeros((num_units,), jnp.int32),
                  "target": jnp.full((), target, jnp.int32)})
    return state


def _bucket_floats(buckets):
    """Smallest float32 of each high-16-bit key bucket (device side of ``keys_to_floats``)."""
    keys = buckets.astype(jnp.uint32) << 16
    bits = jnp.where(keys >> 31 == 1, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _new_floor(state):
    """Raise each unit's floor to the highest bucket with at least ``target`` counted values above it."""
    hist, coarse, target = state["hist"], state["coarse"], state["target"]
    u = hist.shape[0]
    top = jnp.cumsum(coarse[:, ::-1], axis=1)[:, ::-1]                       # values in coarse >= c
    idx = jnp.arange(_COARSE, dtype=jnp.int32)
    cb = jnp.max(jnp.where(top >= target, idx, -1), axis=1)
    above = jnp.where(cb + 1 < _COARSE, jnp.take_along_axis(top, jnp.minimum(cb + 1, _COARSE - 1)[:, None], 1)[:, 0], 0)
    fine = jnp.take_along_axis(hist.reshape(u, _COARSE, _COARSE), jnp.maximum(cb, 0)[:, None, None], 1)[:, 0]
    ftop = jnp.cumsum(fine[:, ::-1], axis=1)[:, ::-1] + above[:, None]
    fb = jnp.max(jnp.where(ftop >= target, idx, -1), axis=1)
    found = (target > 0) & (cb >= 0) & (fb >= 0)
    return jnp.maximum(state["floor"], jnp.where(found, cb * _COARSE + fb, 0))


def pass1_update(state, acts, valid, batch_id, ch, cw):
    """Pass-1 quantile state after one batch of raw ``acts [B, h, w, U]`` (see the module doc)."""
    b, _, _, u = acts.shape
    pixels = int((ch.members >= 0).sum()) * int((cw.members >= 0).sum())
    acts = jnp.asarray(acts, jnp.float32)
    valid = jnp.asarray(valid, bool)
    batch_id = jnp.broadcast_to(jnp.asarray(batch_id, jnp.int32), (b,))
    cut = jnp.where(state["floor"] >= _FIRST_FINITE, _bucket_floats(state["floor"]), -jnp.inf)
    hot = _hot(cell_bounds(acts, ch, cw), cut, valid)
    nb = quantile_k.NUM_BUCKETS

    def visit(entries, ok, state):
        values, unit, img, _, _, inside = _values(acts, entries, ch, cw)
        seen = ok[:, None, None] & inside
        finite = jnp.isfinite(values)
        bad = seen & ~finite
        high = (quantile_k.float_keys(values) >> 16).astype(jnp.int32)
        keep = seen & finite & (high >= state["floor"][unit][:, None, None])
        units = jnp.broadcast_to(unit[:, None, None], values.shape)
        fine = state["hist"].reshape(-1).at[jnp.where(keep, units * nb + high, u * nb).reshape(-1)].add(
            1, mode="drop").reshape(u, nb)
        coarse = state["coarse"].reshape(-1).at[jnp.where(keep, units * _COARSE + (high >> 8), u * _COARSE)
                                                .reshape(-1)].add(1, mode="drop").reshape(u, _COARSE)
        nonfinite = state["nonfinite"].at[jnp.where(bad, units, u).reshape(-1)].add(1, mode="drop")
        first = state["first_bad_batch"].at[jnp.where(bad, units, u).reshape(-1)].min(
            jnp.broadcast_to(batch_id[img][:, None, None], values.shape).reshape(-1), mode="drop")
        return {**state, "hist": fine, "coarse": coarse, "nonfinite": nonfinite, "first_bad_batch": first}

    new = _foreach_hot(hot, visit, state)
    count = state["count"] + valid.sum(dtype=jnp.int32) * pixels - (new["nonfinite"] - state["nonfinite"])
    new = {**new, "count": count}
    return {**new, "floor": _new_floor(new)}


# --------------------------------------------------------------------------
# Pass 2.


def pass2_update(state, acts, valid, ch, cw):
    """Pass-2 low-bit histograms, upsampling only cells that can reach the selected buckets."""
    u = acts.shape[-1]
    acts = jnp.asarray(acts, jnp.float32)
    valid = jnp.asarray(valid, bool)
    first = jnp.minimum(state["bucket"][:, 0], state["bucket"][:, 1])
    cut = jnp.where(first >= _FIRST_FINITE, _bucket_floats(first), -jnp.inf)
    hot = _hot(cell_bounds(acts, ch, cw), cut, valid)
    nb = quantile_k.NUM_BUCKETS

    def visit(entries, ok, state):
        values, unit, _, _, _, inside = _values(acts, entries, ch, cw)
        keys = quantile_k.float_keys(values)
        high = (keys >> 16).astype(jnp.int32)
        low = (keys & jnp.uint32(0xFFFF)).astype(jnp.int32)
        b0 = state["bucket"][unit, 0][:, None, None]
        b1 = state["bucket"][unit, 1][:, None, None]
        # As quantile.low_update: slot 1 only when the second bucket differs from the first.
        second = (high == b1) & (b1 != b0)
        keep = ok[:, None, None] & inside & jnp.isfinite(values) & ((high == b0) | second)
        slot = unit[:, None, None] * 2 * nb + low + jnp.where(second, nb, 0)
        hist = state["hist"].reshape(-1).at[jnp.where(keep, slot, u * 2 * nb).reshape(-1)].add(
            1, mode="drop").reshape(u, 2, nb)
        return {"bucket": state["bucket"], "hist": hist}

    return _foreach_hot(hot, visit, state)


# --------------------------------------------------------------------------
# Pass 3.


def pass3_update(counts, acts, thresholds, seg, valid, batch_id, image_labels, upsample, ch, cw,
                 method="auto"):
    """IoU counts after one batch, upsampling only cells that can exceed the thresholds.

    ``upsample`` is the dense fallback's (used when many cells are hot).
    """
    u = acts.shape[-1]
    num_labels = counts["intersection"].shape[1]
    acts = jnp.asarray(acts, jnp.float32)
    valid = jnp.asarray(valid, bool)
    thresholds = jnp.asarray(thresholds, jnp.float32)
    bounds = cell_bounds(acts, ch, cw)
    hot = ((bounds > thresholds) | jnp.isnan(bounds)) & valid[:, None, None, None]

    def dense(counts, acts):
        return iou_k.update(counts, upsample(acts), thresholds, seg, valid, batch_id, image_labels, method=method)

    def sparse(counts, acts):
        chans, bad_img = iou_k.label_channels(seg, image_labels, num_labels, valid)    # [B*S*S, C]
        s1, s2 = seg.shape[2], seg.shape[3]
        cols = num_labels + 1

        def visit(entries, ok, c):
            inter, act_n = c
            values, unit, img, ty, tx, inside = _values(acts, entries, ch, cw)
            active = ok[:, None, None] & inside & (values > thresholds[unit][:, None, None])
            pix = (img[:, None, None] * s1 + ty) * s2 + tx                          # [E, Mh, Mw]
            labs = chans[pix]                                                        # [E, Mh, Mw, C]
            slot = jnp.where(active[..., None], unit[:, None, None, None] * cols + labs, u * cols)
            inter = inter.at[slot.reshape(-1)].add(1, mode="drop")
            act_n = act_n.at[jnp.where(active, unit[:, None, None], u).reshape(-1)].add(1, mode="drop")
            return inter, act_n

        # Zeros made from the state, so they carry its device-varying type under shard_map.
        start = (jnp.pad(jnp.zeros_like(counts["intersection"]), ((0, 0), (0, 1))).reshape(-1),
                 jnp.zeros_like(counts["active"]))
        inter, act_n = _foreach_hot(hot, visit, start)
        inter = inter.reshape(u, cols)[:, :num_labels]
        npix = valid.sum(dtype=jnp.int32) * (s1 * s2)
        return iou_k.add_counts(counts, npix, iou_k.label_pixel_counts(chans, num_labels), act_n, inter, bad_img,
                                batch_id)

    many = hot.sum(dtype=jnp.int32) > hot.size // DENSE_IOU
    return jax.lax.cond(many, dense, sparse, counts, acts)
