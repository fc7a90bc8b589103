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
  the key, ``[U, 65536]`` int32. :func:`select` (host) finds, for both ranks,
  the bucket holding it and the rank inside that bucket.
* Pass 2 (:func:`low_update`): per unit, histograms of the low 16 bits of
  the values that fall in those (at most 2) buckets, ``[U, 2, 65536]``
  (one increment per value in either bucket).
  :func:`finish` (host) reads the two exact values and interpolates exactly
  as numpy does (float32 arithmetic).

Memory: 256 KiB per unit in pass 1 and 512 KiB in pass 2 (128 MiB and
256 MiB for 512 units), per device. Cost: each pass reads every value once
and does at most one histogram increment (a scatter-add) per value.

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

NUM_BUCKETS = 1 << 16
NO_BATCH = np.iinfo(np.int32).max  # "no non-finite value seen yet"
MAX_COUNT = np.iinfo(np.int32).max


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


def high_init(num_units: int) -> dict:
    """Pass-1 state: high-16-bit histograms and non-finite bookkeeping."""
    return {
        "hist": jnp.zeros((num_units, NUM_BUCKETS), jnp.int32),
        "nonfinite": jnp.zeros((num_units,), jnp.int32),
        "first_bad_batch": jnp.full((num_units,), NO_BATCH, jnp.int32),
    }


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
    """For histograms ``counts [D, U, B]`` (summed over D) and ``ranks [U, R]``: bucket and rank inside it.

    Works on 64 units at a time, so the int64 copy stays small.
    """
    buckets = np.zeros(ranks.shape, np.int64)
    inside = np.zeros(ranks.shape, np.int64)
    for start in range(0, counts.shape[1], 64):
        part = slice(start, start + 64)
        c = counts[:, part].sum(0, dtype=np.int64)
        cum = np.cumsum(c, axis=1)
        r = ranks[part]
        b = np.stack([np.searchsorted(row, rr, side="right") for row, rr in zip(cum, r)])
        b = np.minimum(b, counts.shape[2] - 1)
        buckets[part] = b
        inside[part] = r - np.take_along_axis(cum, b, 1) + np.take_along_axis(c, b, 1)
    return buckets, inside


def select(high_state: dict, level: float) -> dict:
    """Host step between the passes: where the two order statistics of each unit lie.

    ``high_state`` may carry a leading device axis (partial states are
    summed). Returns NumPy arrays: ``count [U]`` (finite values), ``gamma [U]``
    (interpolation weight), ``bucket [U, 2]``, ``inside [U, 2]``.
    """
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"quantile level must lie in [0, 1], got {level}")
    hist = np.asarray(high_state["hist"])
    hist = hist[None] if hist.ndim == 2 else hist
    if "count" in high_state:  # values below a floor were counted, not histogrammed: bucket 0 (no finite value)
        below = np.asarray(high_state["count"]).reshape(hist.shape[:2]).astype(np.int64) - hist.sum(2, dtype=np.int64)
        if (below < 0).any():
            raise ValueError("quantile state: more histogrammed values than counted ones (damaged state)")
        hist = hist.copy()
        hist[:, :, 0] += below.astype(hist.dtype)
    count = hist.sum(axis=(0, 2), dtype=np.int64)
    prev, nxt, gamma = _ranks(count, level)
    bucket, inside = _locate(hist, np.maximum(np.stack([prev, nxt], 1), 0))
    return {"count": count, "gamma": gamma, "bucket": bucket, "inside": inside}


def low_init(selection: dict) -> dict:
    """Pass-2 state: low-16-bit histograms of the two selected buckets of every unit."""
    bucket = jnp.asarray(np.asarray(selection["bucket"], np.int32))
    u = bucket.shape[0]
    return {"bucket": bucket, "hist": jnp.zeros((u, 2, NUM_BUCKETS), jnp.int32)}


def low_update(state: dict, values, valid=None, method: str = "scatter") -> dict:
    """Fold ``values [P, U]`` (rows where ``valid [P]``) into the pass-2 state."""
    values = jnp.asarray(values, jnp.float32)
    p = values.shape[0]
    valid = jnp.ones((p,), bool) if valid is None else jnp.asarray(valid, bool)
    keys = float_keys(values)
    high = (keys >> 16).astype(jnp.int32)
    low = (keys & jnp.uint32(0xFFFF)).astype(jnp.int32)
    ok = jnp.isfinite(values) & valid[:, None]
    u = values.shape[1]
    b0, b1 = state["bucket"][None, :, 0], state["bucket"][None, :, 1]
    # One histogram increment per value: slot 1 only when the second bucket differs from the first
    # (otherwise :func:`finish` reads slot 0 for both order statistics).
    second = (high == b1) & (b1 != b0)
    mask = ok & ((high == b0) | second)
    slot = low + jnp.where(second, NUM_BUCKETS, 0)
    hist = accumulate(state["hist"].reshape(u, 2 * NUM_BUCKETS), slot, mask, method=method)
    return {"bucket": state["bucket"], "hist": hist.reshape(u, 2, NUM_BUCKETS)}


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


def finish(selection: dict, low_state: dict) -> np.ndarray:
    """Exact levels ``[U]`` float32 from the selection and the pass-2 state (device axis allowed).

    Units without any finite value get NaN.
    """
    hist = np.asarray(low_state["hist"])
    hist = hist[None] if hist.ndim == 3 else hist
    u = hist.shape[1]
    values = np.zeros((u, 2), np.float32)
    same = selection["bucket"][:, 0] == selection["bucket"][:, 1]
    for j in range(2):
        counts = np.where(same[None, :, None], hist[:, :, 0], hist[:, :, j])
        low, _ = _locate(counts, selection["inside"][:, j : j + 1])
        keys = (selection["bucket"][:, j].astype(np.uint64) << 16) | low[:, 0].astype(np.uint64)
        values[:, j] = keys_to_floats(keys.astype(np.uint32))
    out = lerp(values[:, 0], values[:, 1], selection["gamma"])
    out[selection["count"] == 0] = np.nan
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
