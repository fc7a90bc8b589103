"""Exact per-unit quantiles of a stream, in two passes of radix selection.

The original dissection estimates each unit's top-quantile level with a KLL
style sketch (rank error about 1e-3, unseeded random compactions). Here the
level is EXACT: ``threshold[u] == numpy.quantile(values[:, u], level)``
(linear interpolation, float32 result, bit for bit), with memory independent
of the number of values.

Method. A float32 ``x`` maps to an order-preserving uint32 key (flip all bits
of negatives, set the sign bit of positives), so ranks of keys are ranks of
values. numpy's linear quantile needs the order statistics of rank
``floor(h)`` and ``floor(h) + 1`` with ``h = (n - 1) * level``.

* Pass 1 (:func:`high_update`): per unit, a histogram of the high 16 bits of
  the key, ``[U, 65536]`` int32. :func:`select` (host) finds the key range
  (a bucket, or the single key of +0.0) holding the lower order statistic
  and the ranks of both statistics inside it.
* Pass 2 (:func:`low_update`): for the bucket holding the lower order
  statistic, a histogram of the low 16 bits of its values, one row
  ``[65536]`` per unit that needs it (:func:`low_init`: not for a level of
  +0.0 or a level that is the smallest value of its bucket), with counts as
  narrow as the bucket's count allows (uint8, uint16, int32); the upper
  statistic is in the same bucket or is the smallest value above it (a
  per-unit minimum). :func:`finish` (host) reads the two exact values and
  interpolates exactly as numpy does (float32 arithmetic).

Memory: 256 KiB per unit in pass 1 and at most 256 KiB per unit in pass 2,
per device; the sparse pass 1 (:mod:`~jaxdissect.kernels.sparse`) keeps
32 KiB per unit. Cost: each pass reads every value once and does at most one
histogram increment (a scatter-add) per value.

Counts are int32 per device state: at most 2**31 - 1 values per unit and
device (the driver checks this up front); merges on the host use int64. Non-finite values are not histogrammed; they are
counted per unit, with the first batch id they occurred in, so the driver can
name the unit and the batch instead of returning a silently wrong level.

States are pure arrays; updates use only their own data, so per-device
partial states merge by summing (functions here accept an optional leading
device axis when merging).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.errors import JaxDissectError

NUM_BUCKETS = 1 << 16
NO_BATCH = np.iinfo(np.int32).max  # "no non-finite value seen yet"
MAX_COUNT = np.iinfo(np.int32).max
NO_KEY = 0xFFFFFFFF                # "no value seen" for the per-unit key minima of pass 2 (a NaN's key)
ZERO_KEY = 0x80000000              # the key of +0.0
WINDOW_OCTAVES = 32                # the sparse pass 1's windows span this many octaves (128 buckets each)
HEADROOM_OCTAVES = 4               # ... and reach this far above the largest value when they move


def float_keys(x):
    """Order-preserving uint32 keys of float32 values (-0.0 sorts just before +0.0)."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def keys_to_floats(keys) -> np.ndarray:
    """Inverse of :func:`float_keys`, on the host."""
    keys = np.asarray(keys, np.uint32)
    bits = np.where(keys >> 31 == 1, keys & np.uint32(0x7FFFFFFF), ~keys)
    return bits.astype(np.uint32).view(np.float32)


def default_method() -> str:
    """Histogram formulation for the default backend: scatter-add everywhere.

    Scatter-add is atomic and fast on GPU and TPU too; 'sort' (sort per unit,
    then binary searches) is the alternative for backends with slow atomics.
    """
    return "scatter"


def accumulate(counts, buckets, mask, rows=None, method: str = "scatter"):
    """Add to histograms ``counts [R, nb]`` int32 the ``buckets [P, U]`` where ``mask [P, U]``.

    Column u of ``buckets`` goes to histogram row ``rows[u]`` (default u).
    'scatter' adds in place into ``counts`` (no temporary of the histogram's
    size); 'sort' sorts each unit's buckets and binary-searches the edges.
    """
    counts = jnp.asarray(counts)
    r, num_buckets = counts.shape
    u = buckets.shape[1]
    rows = jnp.arange(u, dtype=jnp.int32) if rows is None else jnp.asarray(rows, jnp.int32)
    buckets = buckets.astype(jnp.int32)
    if method == "scatter":
        flat = jnp.where(mask, buckets + rows * num_buckets, r * num_buckets)
        return counts.reshape(-1).at[flat.reshape(-1)].add(1, mode="drop").reshape(r, num_buckets)
    if method == "sort":
        keyed = jnp.sort(jnp.where(mask, buckets, num_buckets).T, axis=1)
        edges = jnp.arange(num_buckets + 1, dtype=jnp.int32)
        pos = jax.vmap(lambda row: jnp.searchsorted(row, edges, side="left", method="sort"))(keyed)
        return counts.at[rows].add(jnp.diff(pos, axis=1).astype(jnp.int32))
    raise ValueError(f"unknown histogram method {method!r}; use 'scatter' or 'sort'")


def _as_rows(batch_id, p):
    batch_id = jnp.asarray(batch_id, jnp.int32)
    return jnp.broadcast_to(batch_id, (p,)) if batch_id.ndim == 0 else batch_id


def nonfinite_init(num_units: int) -> dict:
    """Per-unit count of NaN/Inf values and the first batch that had one."""
    return {"nonfinite": jnp.zeros((num_units,), jnp.int32),
            "first_bad_batch": jnp.full((num_units,), NO_BATCH, jnp.int32)}


def high_init(num_units: int) -> dict:
    """Pass-1 state: high-16-bit histograms and non-finite bookkeeping."""
    return {"hist": jnp.zeros((num_units, NUM_BUCKETS), jnp.int32), **nonfinite_init(num_units)}


def high_update(state: dict, values, valid=None, batch_id=0, method: str = "scatter") -> dict:
    """Fold ``values [P, U]`` (rows where ``valid [P]``) into the pass-1 state.

    ``batch_id`` (scalar or ``[P]``) is recorded for units that see a NaN/Inf.
    """
    values = jnp.asarray(values, jnp.float32)
    p = values.shape[0]
    valid = jnp.ones((p,), bool) if valid is None else jnp.asarray(valid, bool)
    finite = jnp.isfinite(values)
    bad = ~finite & valid[:, None]
    high = (float_keys(values) >> 16).astype(jnp.int32)
    first = jnp.min(jnp.where(bad, _as_rows(batch_id, p)[:, None], NO_BATCH), axis=0)
    return {
        "hist": accumulate(state["hist"], high, finite & valid[:, None], method=method),
        "nonfinite": state["nonfinite"] + bad.sum(0, dtype=jnp.int32),
        "first_bad_batch": jnp.minimum(state["first_bad_batch"], first),
    }


def _ranks(n: np.ndarray, level: float):
    """numpy's linear-method neighbours and weight for ``n`` values per unit at ``level``."""
    virtual = (n.astype(np.float64) - 1) * float(level)
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1
    prev[above] = n[above] - 1
    nxt[above] = n[above] - 1
    below = virtual < 0
    prev[below] = 0
    nxt[below] = 0
    gamma = virtual - prev
    return prev.astype(np.int64), nxt.astype(np.int64), gamma


def _locate(counts: np.ndarray, ranks: np.ndarray):
    """For histograms ``counts [D, R, 65536]`` (summed over D) and ``ranks [R, K]``: bucket and rank inside
    it ``[R, K]``, and each histogram's total ``[R]``.

    Coarse to fine (256 blocks of 256 buckets), 64 histograms at a time, so
    the int64 copies stay small.
    """
    d, r, nb = counts.shape
    side = 256
    buckets = np.zeros(ranks.shape, np.int64)
    inside = np.zeros(ranks.shape, np.int64)
    totals = np.zeros(r, np.int64)
    for start in range(0, r, 64):
        part = slice(start, start + 64)
        c = counts[:, part].reshape(d, -1, nb // side, side)
        rk = ranks[part]
        rows = np.arange(c.shape[1])[:, None]
        coarse = c.sum((0, 3), dtype=np.int64)
        cum = np.cumsum(coarse, 1)
        cb = np.minimum((cum[:, None, :] <= rk[:, :, None]).sum(2), nb // side - 1)
        before = cum[rows, cb] - coarse[rows, cb]
        fine = c[:, rows, cb].sum(0, dtype=np.int64)                         # [r, K, side]
        fcum = np.cumsum(fine, -1)
        fb = np.minimum((fcum <= (rk - before)[..., None]).sum(-1), side - 1)
        buckets[part] = cb * side + fb
        inside[part] = rk - before - np.take_along_axis(fcum - fine, fb[..., None], -1)[..., 0]
        totals[part] = cum[:, -1]
    return buckets, inside, totals


class QuantileRangeError(JaxDissectError, ValueError):
    """A unit's level lies where the compact pass-1 state kept no fine counts; the message names the fix."""


def _segments_dense(high_state: dict):
    """The dense state as descending segments: every 16-bit bucket, high to low (all resolved)."""
    hist = np.asarray(high_state["hist"])
    hist = hist[None] if hist.ndim == 2 else hist
    count = hist.sum(axis=(0, 2), dtype=np.int64)

    def desc(part):
        return hist[:, part, ::-1].sum(0, dtype=np.int64)

    def ranges(seg):
        bucket = (NUM_BUCKETS - 1 - seg).astype(np.uint32)
        return bucket << 16, (bucket << 16) | np.uint32(0xFFFF), np.ones(seg.shape, bool)

    return count, desc, ranges


def _segments_window(high_state: dict):
    """The windowed state (see :mod:`~jaxdissect.kernels.sparse`) as the parts of its descending segments
    (positive window, values below it (unresolved), exact +0.0, negative window, the rest (unresolved)),
    which :func:`_find_window` searches.

    Per-device windows (leading axis) are aligned on the highest base, as one
    device would have moved them when its maximum rose: a lower window's
    lowest buckets drop out (positive ones into the values below it).
    """
    hs = {k: np.asarray(high_state[k]) for k in ("window", "base", "zeros", "below_pos", "count")}
    if hs["window"].ndim == 3:
        hs = {k: v[None] for k, v in hs.items()}
    window, base = hs["window"], hs["base"].astype(np.int64)
    width = window.shape[-1]
    top = base.max(0)
    shift = top[None] - base                                                   # [D, U, 2]
    count = hs["count"].astype(np.int64).sum(0)
    zeros = hs["zeros"].astype(np.int64).sum(0)
    idx = np.arange(width)

    def parts(part):
        """``(windows [n, 2, W], below [n], zeros [n], count [n])`` of units ``part``, devices merged."""
        w = window[:, part]
        below = hs["below_pos"][:, part].astype(np.int64).sum(0)
        sh = shift[:, part]
        if sh.any():
            src = idx + sh[..., None]
            below = below + np.where(idx < sh[..., 1, None], w[:, :, 1], 0).sum((0, 2), dtype=np.int64)
            w = np.where(src < width, np.take_along_axis(w, np.minimum(src, width - 1), 3), 0)
        return (w[0] if w.shape[0] == 1 else w.sum(0, dtype=np.int64)), below, zeros[part], count[part]

    def ranges(seg, units):
        pos, neg = seg < width, (seg > width + 1) & (seg < 2 * width + 2)
        bucket = np.where(pos, top[units, 1] + width - 1 - seg, top[units, 0] + 2 * width + 1 - seg)
        bucket = np.clip(bucket, 0, NUM_BUCKETS - 1).astype(np.uint32)
        lo = np.where(pos | neg, bucket << 16, np.uint32(ZERO_KEY)).astype(np.uint32)
        hi = np.where(pos | neg, (bucket << 16) | np.uint32(0xFFFF), np.uint32(ZERO_KEY)).astype(np.uint32)
        lo = np.where(pos & (bucket == ZERO_KEY >> 16), np.uint32(ZERO_KEY + 1), lo)  # +0.0 has its own count
        return lo, hi, pos | neg | (seg == width + 1)

    return count, parts, ranges


def _find_window(w, below, zeros, count, t):
    """The descending segment holding rank ``t [n]`` (0 = the largest value) of windowed counts, its size and
    the values above it: ``(seg, size, before)``, with segments numbered as in :func:`_segments_window`
    (the positive window's buckets high to low, the values below it, +0.0, the negative window's, the rest).

    Coarse to fine: blocks of 256 buckets first, then the buckets of the one block that holds the rank.
    """
    n, _, width = w.shape
    side = 256
    nb = width // side
    blocks = w.reshape(n, 2, nb, side).sum(-1, dtype=np.int64)
    rest = count - blocks.sum((1, 2)) - zeros - below
    if (rest < 0).any():
        raise ValueError("quantile state: more histogrammed values than counted ones (damaged state)")
    coarse = np.concatenate([blocks[:, 1, ::-1], below[:, None], zeros[:, None], blocks[:, 0, ::-1],
                             rest[:, None]], 1)
    cum = np.cumsum(coarse, 1)
    r = np.arange(n)
    c = np.minimum((cum <= t[:, None]).sum(1), coarse.shape[1] - 1)
    before = cum[r, c] - coarse[r, c]
    pos, neg = c < nb, (c >= nb + 2) & (c < 2 * nb + 2)
    block = np.clip(np.where(pos, nb - 1 - c, 2 * nb + 1 - c), 0, nb - 1)
    fine = w[r[:, None], np.where(pos, 1, 0)[:, None], block[:, None] * side + np.arange(side)][:, ::-1]
    fine = fine.astype(np.int64)
    fcum = np.cumsum(fine, 1) + before[:, None]
    f = np.minimum((fcum <= t[:, None]).sum(1), side - 1)
    inblock = pos | neg
    seg = np.where(pos, c * side + f, np.where(neg, width + 2 + (c - nb - 2) * side + f,
                                               np.where(c == nb, width, np.where(c == nb + 1, width + 1,
                                                                                  2 * width + 2))))
    size = np.where(inblock, fine[r, f], coarse[r, c])
    return seg, size, np.where(inblock, fcum[r, f] - fine[r, f], before)


def select(high_state: dict, level: float) -> dict:
    """Host step between the passes: the key range that holds each unit's order statistics.

    ``high_state`` (dense, or the windowed state of the sparse pass 1) may
    carry a leading device axis (partial states are merged). Returns NumPy
    arrays: ``count [U]`` (finite values), ``gamma [U]`` (interpolation
    weight), ``lo``/``hi [U]`` (uint32 key range, inclusive: a 16-bit bucket,
    or the single key of +0.0), ``in_range [U]`` (values in it) and
    ``inside [U, 2]``: the ranks of the two order statistics among those
    values, ``-1`` when the upper one is the smallest value above the range.
    Raises :class:`QuantileRangeError` when a level lies where a windowed
    state kept no fine counts.
    """
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"quantile level must lie in [0, 1], got {level}")
    windowed = "window" in high_state
    count, segments, ranges = (_segments_window if windowed else _segments_dense)(high_state)
    u = count.shape[0]
    prev, nxt, gamma = _ranks(count, level)
    out = {"count": count, "gamma": gamma, "lo": np.zeros(u, np.uint32), "hi": np.zeros(u, np.uint32),
           "in_range": np.zeros(u, np.int64), "inside": np.zeros((u, 2), np.int64)}
    chunk = 512 if windowed else 64
    for start in range(0, u, chunk):
        units = np.arange(start, min(start + chunk, u))
        t = count[units] - 1 - prev[units]                           # rank of the lower statistic from the top
        if windowed:
            seg, size, before = _find_window(*segments(slice(start, start + chunk)), t)
        else:
            d = segments(slice(start, start + chunk))
            cum = np.cumsum(d, axis=1)
            seg = np.minimum((cum <= t[:, None]).sum(1), d.shape[1] - 1)
            r = np.arange(len(units))
            size = d[r, seg]
            before = cum[r, seg] - size
        lo, hi, resolved = ranges(seg, units) if windowed else ranges(seg)
        has = count[units] > 0
        if windowed and (has & ~resolved).any():
            bad = units[has & ~resolved]
            raise QuantileRangeError(
                f"unit {int(bad[0])} ({len(bad)} units): its level lies more than "
                f"{WINDOW_OCTAVES - HEADROOM_OCTAVES} octaves below its largest value (or of another sign), where the "
                "memory-bounded pass 1 keeps no fine counts; dissect this layer with sparse=False")
        inside0 = size - 1 - (t - before)
        step = nxt[units] - prev[units]
        inside1 = np.where(step == 0, inside0, np.where(inside0 + 1 < size, inside0 + 1, -1))
        out["lo"][units] = np.where(has, lo, 0)
        out["hi"][units] = np.where(has, hi, 0)
        out["in_range"][units] = np.where(has, size, 0)
        out["inside"][units] = np.where(has[:, None], np.stack([inside0, inside1], 1), 0)
    return out


def low_init(selection: dict, listed: bool = False) -> dict:
    """Pass-2 state: the values of each unit's selected range, for units whose statistics lie inside a bucket.

    A unit whose range is one key (+0.0) needs nothing; one whose statistics
    are the smallest value in its range or the smallest above it needs only
    those minima (``min_in``, ``min_above``). The others get a low-16-bit
    histogram row, whose integer type is the narrowest that holds the
    largest count in a selected range (a row's counts never exceed it), so
    small streams use 1- or 2-byte counts; or, with ``listed`` and when it
    takes less memory, a list of the keys themselves: pass 1 counted exactly
    how many values each range holds (``in_range``), so the list's length is
    known, and the ranks are read after sorting it (a sparse code's ranges
    hold a few values each: a few bytes per unit instead of a 64 KiB row).
    Sorting needs only the count of +0.0 values, not their positions:
    ``zeros_in`` counts those added without listing them.
    """
    lo = np.asarray(selection["lo"], np.uint32)
    hi = np.asarray(selection["hi"], np.uint32)
    inside = np.asarray(selection["inside"])
    single = lo == hi
    rowed = ~single & (inside > 0).any(1)
    row = np.where(rowed, np.cumsum(rowed) - 1, -1).astype(np.int32)
    need = rowed | ~single | (inside[:, 1] < 0)
    in_range = np.asarray(selection["in_range"])[rowed]
    most = int(in_range.max(initial=0))
    dtype = jnp.uint8 if most <= 0xFF else jnp.uint16 if most <= 0xFFFF else jnp.int32
    rows = max(int(rowed.sum()), 1)
    state = {"lo": jnp.asarray(lo), "hi": jnp.asarray(hi), "row": jnp.asarray(row), "need": jnp.asarray(need),
             "min_in": jnp.full(lo.shape, NO_KEY, jnp.uint32), "min_above": jnp.full(lo.shape, NO_KEY, jnp.uint32)}
    total = int(in_range.sum())
    if listed and total * 8 < rows * NUM_BUCKETS * np.dtype(dtype).itemsize and total < MAX_COUNT:
        state.update({"list_key": jnp.zeros((max(total, 1),), jnp.uint32),
                      "list_row": jnp.zeros((max(total, 1),), jnp.int32),
                      "fill": jnp.zeros((), jnp.int32), "zeros_in": jnp.zeros(lo.shape, jnp.int32)})
    else:
        state["hist"] = jnp.zeros((rows, NUM_BUCKETS), dtype)
    return state


def low_fold(state: dict, keys, unit, ok) -> dict:
    """Fold keys ``[E, ...]`` of units ``unit [E]`` (where ``ok``) into the pass-2 state.

    One scatter per key into the rows (or the list: each key in range goes
    to the next free place, numbered by a cumulative sum); the minima are
    taken over each entry's keys first, so they cost one scatter per entry.
    """
    extra = (None,) * (keys.ndim - 1)
    lo, hi, row = (state[k][unit][(slice(None),) + extra] for k in ("lo", "hi", "row"))
    inside = ok & (keys >= lo) & (keys <= hi)
    above = ok & (keys > hi)
    if "list_key" in state:
        take = (inside & (row >= 0)).reshape(-1)
        cap = state["list_key"].shape[0]
        place = jnp.where(take, state["fill"] + jnp.cumsum(take, dtype=jnp.int32) - 1, cap)
        listed = {"list_key": state["list_key"].at[place].set(keys.reshape(-1), mode="drop"),
                  "list_row": state["list_row"].at[place].set(jnp.broadcast_to(row, keys.shape).reshape(-1),
                                                              mode="drop"),
                  "fill": state["fill"] + take.sum(dtype=jnp.int32)}
    else:
        rows = state["hist"].shape[0]
        slot = jnp.where(inside & (row >= 0), row * NUM_BUCKETS + (keys & jnp.uint32(0xFFFF)).astype(jnp.int32),
                         rows * NUM_BUCKETS)
        listed = {"hist": state["hist"].reshape(-1).at[slot.reshape(-1)].add(1, mode="drop")
                  .reshape(rows, NUM_BUCKETS)}
    axes = tuple(range(1, keys.ndim))
    no = jnp.uint32(NO_KEY)
    min_in = state["min_in"].at[unit].min(jnp.where(inside, keys, no).min(axes), mode="drop")
    min_above = state["min_above"].at[unit].min(jnp.where(above, keys, no).min(axes), mode="drop")
    return {**state, **listed, "min_in": min_in, "min_above": min_above}


def add_zeros(state: dict, zeros, in_range) -> dict:
    """Add ``zeros [U]`` values +0.0 (key ``ZERO_KEY``) to the units where ``in_range [U]`` (their rows)."""
    if "list_key" in state:
        return {**state, "zeros_in": state["zeros_in"] + jnp.where(in_range & (state["row"] >= 0), zeros, 0)}
    rows = state["hist"].shape[0]
    return {**state, "hist": state["hist"].at[jnp.where(in_range & (state["row"] >= 0), state["row"], rows), 0].add(
        zeros.astype(state["hist"].dtype), mode="drop")}


def low_update(state: dict, values, valid=None, method: str = "scatter") -> dict:
    """Fold ``values [P, U]`` (rows where ``valid [P]``) into the pass-2 state.

    ``method`` is accepted for symmetry with :func:`high_update`; pass 2 is
    one scatter into the (few) rows and two per-unit minima.
    """
    values = jnp.asarray(values, jnp.float32)
    p, u = values.shape
    valid = jnp.ones((p,), bool) if valid is None else jnp.asarray(valid, bool)
    ok = jnp.isfinite(values) & valid[:, None] & state["need"][None]
    return low_fold(state, float_keys(values).T, jnp.arange(u, dtype=jnp.int32), ok.T)


def lerp(a: np.ndarray, b: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """numpy.quantile's interpolation for a scalar level, reproduced bit for bit.

    numpy keeps the weight ``gamma`` as a float64 "weak" scalar: ``gamma`` and
    ``1 - gamma`` are formed in float64 and rounded to float32 when they meet
    the float32 values.
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    gamma = np.asarray(gamma, np.float64)
    diff = b - a
    lower = a + diff * gamma.astype(np.float32)
    upper = b - diff * (1.0 - gamma).astype(np.float32)
    return np.where(gamma >= 0.5, upper, lower).astype(np.float32)


def _listed(low_state: dict, rowed: np.ndarray, ranks: np.ndarray):
    """Keys of ranks ``[R, K]`` (0 = smallest) in each row's listed keys, and each row's count ``[R]``."""
    fill = np.asarray(low_state["fill"]).reshape(-1)
    keys = np.asarray(low_state["list_key"]).reshape(fill.size, -1)
    rows = np.asarray(low_state["list_row"]).reshape(fill.size, -1)
    if (fill > keys.shape[1]).any():
        raise ValueError("pass 2 saw more values in the selected ranges than pass 1 counted; both passes must "
                         "read the same data")
    k = np.concatenate([keys[d, :f] for d, f in enumerate(fill)])
    r = np.concatenate([rows[d, :f] for d, f in enumerate(fill)])
    zeros = np.asarray(low_state["zeros_in"]).reshape(fill.size, -1).astype(np.int64).sum(0)[rowed]
    k = np.concatenate([k, np.full(int(zeros.sum()), ZERO_KEY, np.uint32)])
    r = np.concatenate([r, np.repeat(np.arange(rowed.size, dtype=np.int32), zeros)])
    seen = np.bincount(r, minlength=rowed.size)[:rowed.size]
    order = np.lexsort((k, r))
    start = np.cumsum(seen) - seen
    at = np.minimum(start[:, None] + ranks, max(k.size - 1, 0))
    return (k[order][at] if k.size else np.zeros(ranks.shape, np.uint32)), seen


def finish(selection: dict, low_state: dict) -> np.ndarray:
    """Exact levels ``[U]`` float32 from the selection and the pass-2 state (device axis allowed).

    Units without any finite value get NaN. Raises ``ValueError`` when pass 2
    saw other values than pass 1 in a selected range (another data stream).
    """
    lo = np.asarray(selection["lo"], np.uint32)
    hi = np.asarray(selection["hi"], np.uint32)
    inside = np.asarray(selection["inside"])
    count = np.asarray(selection["count"])
    row = np.asarray(low_state["row"])
    row = row[0] if row.ndim == 2 else row
    min_in = np.asarray(low_state["min_in"]).reshape(-1, lo.shape[0]).min(0)
    min_above = np.asarray(low_state["min_above"]).reshape(-1, lo.shape[0]).min(0)
    rowed = np.flatnonzero(row >= 0)                          # rows are numbered in unit order
    keys = np.where(lo == hi, lo, min_in)[:, None].repeat(2, 1)
    if rowed.size:
        ranks = np.maximum(inside[rowed], 0)
        if "list_key" in low_state:
            found, seen = _listed(low_state, rowed, ranks)
        else:
            hist = np.asarray(low_state["hist"])
            hist = hist[None] if hist.ndim == 2 else hist
            low, _, seen = _locate(hist[:, :rowed.size], ranks)
            found = (lo[rowed, None] & np.uint32(0xFFFF0000)) | low.astype(np.uint32)
        wrong = seen != np.asarray(selection["in_range"])[rowed]
        if wrong.any():
            raise ValueError(f"unit {int(rowed[np.flatnonzero(wrong)[0]])}: pass 2 saw other values than pass 1 "
                             "in its selected range; both passes must read the same data")
        keys[rowed] = found
    keys = np.where(inside < 0, min_above[:, None], keys).astype(np.uint32)
    missing = (count > 0) & (keys == NO_KEY).any(1)
    if missing.any():
        raise ValueError(f"unit {int(np.flatnonzero(missing)[0])}: pass 2 did not see the values pass 1 "
                         "selected; both passes must read the same data")
    out = lerp(keys_to_floats(keys[:, 0]), keys_to_floats(keys[:, 1]), selection["gamma"])
    out[count == 0] = np.nan
    return out


def exact_quantile(values, level: float, chunk: int = 1 << 16, method: str = "scatter") -> np.ndarray:
    """Exact ``numpy.quantile(values, level, axis=0)`` of an in-memory ``[N, U]`` array, in chunks.

    Convenience for research code and tests; raises on non-finite values.
    """
    values = np.asarray(values, np.float32)
    n, u = values.shape
    hi = jax.jit(lambda s, x: high_update(s, x, method=method))
    lo = jax.jit(lambda s, x: low_update(s, x, method=method))
    state = high_init(u)
    for start in range(0, n, chunk):
        state = hi(state, values[start : start + chunk])
    bad = np.asarray(state["nonfinite"])
    if bad.any():
        unit = int(np.flatnonzero(bad)[0])
        raise ValueError(f"unit {unit} has {int(bad[unit])} NaN/Inf values; quantiles need finite data")
    selection = select(state, level)
    low = low_init(selection)
    for start in range(0, n, chunk):
        low = lo(low, values[start : start + chunk])
    return finish(selection, low)
