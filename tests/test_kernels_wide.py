"""Statistics at thousands of units: the memory-bounded sparse passes stay exact (numpy.quantile bit for bit).

The sparse pass 1 keeps per unit two windows of 16-bit buckets (negative and
positive values, each reaching at least 28 octaves under its largest value) and counts of +0.0;
pass 2 keeps the keys in range (or a low-16-bit row) only for units whose level lies inside a bucket.
The cases here are the ones those shortcuts must get right: a negative level
under a positive maximum, levels exactly +0.0 (sparse codes), -0.0, tiny
positive levels, wide ranges, and per-device windows at different heights.
"""

import jax
import numpy as np
import pytest

from jaxdissect import statistics
from jaxdissect.kernels import quantile as quantile_k

H, S, L = 7, 28, 4


def hard_columns(rng, n):
    """``[n, H, H, 9]`` raw maps, one hard case per unit."""
    a = np.zeros((n, H, H, 9), np.float32)
    a[..., 0] = rng.standard_normal((n, H, H))                                  # signed, level > 0
    a[..., 1] = -1 - np.abs(rng.standard_normal((n, H, H)))                      # level < 0 < max
    a[rng.random((n, H, H)) < 0.004, 1] = 3.0
    a[..., 2] = np.where(rng.random((n, H, H)) < 0.002, rng.random((n, H, H)) + 0.5, 0)   # level +0.0
    a[..., 3] = np.where(rng.random((n, H, H)) < 0.05, rng.exponential(1, (n, H, H)), 0)  # small level > 0
    a[..., 4] = np.where(rng.random((n, H, H)) < 0.5, -0.0, 0.0)                  # signed zeros, a few values
    a[rng.random((n, H, H)) < 0.01, 4] = 1.0
    a[..., 5] = np.exp(rng.uniform(-7, 7, (n, H, H)))                            # 20 octaves of range
    a[..., 6] = 2.5                                                               # constant
    a[..., 7] = np.where(rng.random((n, H, H)) < 0.3, 1e-30, 0) * rng.random((n, H, H))  # tiny, 1e-30 scale
    a[..., 8] = -rng.exponential(1, (n, H, H))                                   # all negative
    return a


def _plan(units, quantile):
    return statistics.Plan(num_units=units, num_labels=L, source_hw=(H, H), resolution=(S, S), quantile=quantile)


def _levels(plan, parts, images, listed=True):
    """Pass 1 and pass 2 on each part (as separate devices would), merged on the host; pass 2 keeps a list of
    the keys in range (``listed``) or low-16-bit histogram rows."""
    def run(update, init, args):
        states = []
        for part in parts:
            state = jax.tree.map(np.array, init)   # the jitted updates donate their state
            for i in range(0, len(part), 5):
                state = update(plan, state, part[i:i + 5], *args(len(part[i:i + 5])))
            states.append(state)
        return jax.tree.map(lambda *s: np.stack([np.asarray(x) for x in s]), *states)

    ones = lambda b: (np.ones(b, bool),)  # noqa: E731
    first = run(statistics.pass1_update, jax.tree.map(np.asarray, plan.pass1_init(images)),
                lambda b: (np.ones(b, bool), np.arange(b, dtype=np.int32), np.zeros(b, np.int32)))
    selection, _ = plan.pass1_finish(first)
    second = run(statistics.pass2_update, jax.tree.map(np.asarray, quantile_k.low_init(selection, listed)), ones)
    return plan.pass2_finish(selection, second), first, second


@pytest.mark.parametrize("quantile,listed", [(0.05, True), pytest.param(0.005, True, marks=pytest.mark.slow),
                                             pytest.param(0.5, True, marks=pytest.mark.slow),
                                             pytest.param(0.05, False, marks=pytest.mark.slow)])
def test_hard_columns_equal_numpy_quantile(quantile, listed):
    rng = np.random.default_rng(0)
    acts = hard_columns(rng, 30)
    plan = _plan(acts.shape[-1], quantile)
    up = np.asarray(jax.jit(plan.upsample)(acts)).reshape(-1, acts.shape[-1])
    want = np.quantile(up, 1 - quantile, axis=0)
    # Two "devices": the second half's maxima are larger, so their windows sit higher.
    acts2 = acts.copy()
    acts2[15:] *= 4
    up2 = np.asarray(jax.jit(plan.upsample)(acts2)).reshape(-1, acts.shape[-1])
    for data, ref in ((acts, want), (acts2, np.quantile(up2, 1 - quantile, axis=0))):
        for parts, images in (([data], 30), ([data[:15], data[15:]], 30), ([data], None)):
            got, _, _ = _levels(plan, parts, images, listed)
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32),
                                          err_msg=f"{len(parts)} parts, images {images}")


def test_zero_levels_need_no_pass_two_rows():
    """A sparse code whose level is +0.0 is settled by pass 1's zero count; pass 2 keeps the values in range
    only for units whose level lies inside a bucket: as a list exactly as long as pass 1 counted, or as
    histogram rows with counts as narrow as the largest such range allows."""
    rng = np.random.default_rng(1)
    acts = hard_columns(rng, 30)
    plan = _plan(acts.shape[-1], 0.05)
    selection, _ = plan.pass1_finish(_levels(plan, [acts], 30)[1])
    _, _, second = _levels(plan, [acts], 30)
    row = second["row"][0]
    assert row[2] == -1                                        # level +0.0: nothing to resolve
    rowed = row >= 0
    assert 0 < rowed.sum() < acts.shape[-1]
    assert second["list_key"].shape[1] == selection["in_range"][rowed].sum()     # 8 bytes each, not 64 KiB rows
    assert second["list_key"].shape[1] * 8 < rowed.sum() * 65536
    _, _, rows = _levels(plan, [acts], 30, listed=False)
    assert (rows["row"][0] >= 0).sum() == rows["hist"].shape[1] == rowed.sum()
    assert rows["hist"].dtype in (np.uint8, np.uint16)


@pytest.mark.slow
def test_level_far_below_the_maximum_is_refused_with_the_fix():
    rng = np.random.default_rng(2)
    acts = np.full((10, H, H, 2), 1e-30, np.float32)
    acts[0, 3, 3] = 1e10                                       # 133 octaves above the level
    plan = _plan(2, 0.05)
    with pytest.raises(quantile_k.QuantileRangeError, match="sparse=False"):
        _levels(plan, [acts], 10)
    # The dense kernels have no such limit.
    seg = rng.integers(0, L, (10, 1, S, S)).astype(np.int32)
    dense = statistics.dissect_activations(lambda: iter([(acts, seg)]), L, 0.05, S, sparse=False, progress=False)
    up = np.asarray(jax.jit(plan.upsample)(acts)).reshape(-1, 2)
    np.testing.assert_array_equal(dense.thresholds, np.quantile(up, 0.95, axis=0))


def test_state_memory_per_unit_does_not_grow_with_units():
    """Pass-1 state per unit: two 4096-bucket windows (32 KiB) instead of a 65,536-bucket histogram (256 KiB)."""
    for units in (512, 4096):
        plan = _plan(units, 0.01)
        state = jax.eval_shape(lambda plan=plan: plan.pass1_init(1000)["quantile"])
        per_unit = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)) / units
        assert per_unit < 33 * 1024, per_unit
    dense = jax.eval_shape(lambda: quantile_k.high_init(512))
    assert sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(dense)) / 512 > 256 * 1024
