"""Exact quantile kernel against numpy.quantile (bit for bit), histogram variants, NaN reporting."""

import functools

import jax
import numpy as np
import pytest

from jaxdissect.kernels import quantile as qk


def _data(rng, n=2999):
    """Columns covering the hard cases: ties, zeros, constants, negatives, signed zeros, extremes."""
    x = rng.standard_normal((n, 24)).astype(np.float32)
    x[:, 1] *= 1e-3
    x[:, 2] = 0.0
    x[:, 3] = 2.5
    x[:, 4] = np.round(x[:, 4])                      # heavy ties
    x[:, 5] = -np.abs(x[:, 5]) - 10                   # all negative
    x[::2, 6] = -0.0                                  # signed zeros
    x[:, 7] = rng.integers(0, 3, n)                   # three values
    x[:, 8] = np.exp(rng.uniform(-80, 80, n)).astype(np.float32)  # wide range incl. subnormals
    x[:, 9] = np.where(rng.random(n) < 0.995, 0.0, 1.0)  # sparse, like ReLU units
    x[: n // 2, 10] = np.float32(3e38)
    return x


_HIGH = jax.jit(qk.high_update, static_argnames="method")
_LOW = jax.jit(qk.low_update, static_argnames="method")


def _run(x, chunk=1000, method="scatter"):
    """Pass 1 over ``x`` in equal-sized padded chunks (one compilation per shape); state, padded x, mask."""
    n, u = x.shape
    pad = -n % chunk
    xp = np.concatenate([x, np.zeros((pad, u), np.float32)])
    valid = np.arange(n + pad) < n
    hi = functools.partial(_HIGH, method=method)
    state = qk.high_init(u)
    for i, start in enumerate(range(0, n + pad, chunk)):
        state = hi(state, xp[start:start + chunk], valid[start:start + chunk], i)
    return state, xp, valid


def _low_pass(low, x, chunk=1000, method="scatter"):
    n, u = x.shape
    pad = -n % chunk
    xp = np.concatenate([x, np.zeros((pad, u), np.float32)])
    valid = np.arange(n + pad) < n
    for start in range(0, n + pad, chunk):
        low = _LOW(low, xp[start:start + chunk], valid[start:start + chunk], method=method)
    return low


def _finish(state, x, level, chunk=1000, method="scatter"):
    sel = qk.select(state, level)
    return qk.finish(sel, _low_pass(qk.low_init(sel), x, chunk, method))


def test_thresholds_equal_numpy_quantile_bit_for_bit():
    x = _data(np.random.default_rng(0))
    state, _, _ = _run(x)
    for q in (0.01, 0.005, 0.5, 0.0, 1.0):
        got = _finish(state, x, 1 - q)
        want = np.array([np.quantile(x[:, u], 1 - q) for u in range(x.shape[1])])
        assert want.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"q={q}")
        np.testing.assert_array_equal(got, np.quantile(x, 1 - q, axis=0))


def test_partial_states_merge_to_the_whole():
    x = _data(np.random.default_rng(1), n=2000)
    whole, _, _ = _run(x)
    a, _, _ = _run(x[:700])
    b, _, _ = _run(x[700:])
    stacked = jax.tree.map(lambda *s: np.stack([np.asarray(v) for v in s]), a, b)
    np.testing.assert_array_equal(np.asarray(stacked["hist"]).sum(0), np.asarray(whole["hist"]))
    sel = qk.select(stacked, 0.99)
    low = qk.low_init(sel)
    parts = [_low_pass(low, x[:700]), _low_pass(low, x[700:])]
    low2 = jax.tree.map(lambda *s: np.stack([np.asarray(v) for v in s]), *parts)
    np.testing.assert_array_equal(qk.finish(sel, low2), np.quantile(x, 0.99, axis=0))


def test_histogram_formulations_agree_with_bincount():
    rng = np.random.default_rng(2)
    buckets = rng.integers(0, 64, (300, 5)).astype(np.int32)
    buckets[:, 1] = 7
    mask = rng.random((300, 5)) < 0.8
    want = np.stack([np.bincount(buckets[mask[:, u], u], minlength=64) for u in range(5)])
    start = np.arange(5 * 64, dtype=np.int32).reshape(5, 64)
    for method in ("scatter", "sort"):
        got = jax.jit(lambda c, b, m: qk.accumulate(c, b, m, method=method))(start, buckets, mask)
        np.testing.assert_array_equal(np.asarray(got), want + start, err_msg=method)
    rows = np.array([4, 2, 0, 1, 3])
    got = qk.accumulate(np.zeros((5, 64), np.int32), buckets, mask, rows=rows)
    np.testing.assert_array_equal(np.asarray(got)[rows], want)


def test_keys_preserve_order_and_round_trip():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-40, 38, 500),
                        [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38, -3.4e38]]).astype(np.float32)
    keys = np.asarray(qk.float_keys(x))
    order = np.argsort(keys, kind="stable")
    assert np.all(np.diff(x[order].astype(np.float64)) >= 0)
    np.testing.assert_array_equal(qk.keys_to_floats(keys).view(np.uint32), x.view(np.uint32))


def test_nonfinite_values_are_counted_with_their_batch():
    x = _data(np.random.default_rng(5), n=3000)
    x[1500, 3] = np.nan
    x[2500, 3] = np.inf
    x[2100, 11] = -np.inf
    state, _, _ = _run(x)
    bad = np.asarray(state["nonfinite"])
    assert bad[3] == 2 and bad[11] == 1 and bad.sum() == 3
    first = np.asarray(state["first_bad_batch"])
    assert first[3] == 1 and first[11] == 2 and first[0] == qk.NO_BATCH
    with pytest.raises(ValueError, match="unit 3 has 2 NaN/Inf"):
        qk.exact_quantile(x, 0.99)


def test_padding_rows_are_ignored():
    x = _data(np.random.default_rng(6), n=700)
    junk = np.full((300, 24), np.nan, np.float32)
    valid = np.r_[np.ones(700, bool), np.zeros(300, bool)]
    state = _HIGH(qk.high_init(24), np.concatenate([x, junk]), valid)
    assert not np.asarray(state["nonfinite"]).any()
    sel = qk.select(state, 0.9)
    low = _LOW(qk.low_init(sel), np.concatenate([x, junk]), valid)
    np.testing.assert_array_equal(qk.finish(sel, low), np.quantile(x, 0.9, axis=0))
