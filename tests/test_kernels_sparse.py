"""Hot-cell statistics (jaxdissect.kernels.sparse) give exactly the dense kernels' results."""

import jax
import numpy as np
import pytest

from jaxdissect import statistics
from jaxdissect.kernels import sparse as sparse_k
from jaxdissect.kernels import upsample as upsample_k

U, L = 8, 6


def blobby(rng, n, h, units=U):
    """Sparse, smooth post-ReLU maps: some (image, unit) pairs carry one blob, plus weak noise."""
    y = np.arange(h)[:, None]
    cy, cx = rng.uniform(0, h, (2, n, units))
    amp = rng.standard_exponential((n, units)) * 3 * (rng.random((n, units)) < 0.4)
    d = ((y[None, None] - cy[..., None, None]) ** 2 + (y.T[None, None] - cx[..., None, None]) ** 2) / 4.0
    m = amp[..., None, None] * np.exp(-d) + 0.3 * rng.standard_normal((n, units, h, h)) - 0.4
    return np.maximum(m, 0).transpose(0, 2, 3, 1).astype(np.float32)


def batches_of(*arrays, size=5):
    def batches():
        for i in range(0, len(arrays[0]), size):
            yield tuple(a[i:i + size] for a in arrays)
    return batches


@pytest.mark.parametrize("source,target,kw", [
    (7, 28, {"geometry": "original"}),
    (7, 28, {"geometry": "clamped"}),
    (8, 20, {"geometry": "original"}),
    (12, 6, {"geometry": "original"}),          # downsampling: one pixel per cell
    (9, 28, {"convolutions": ((3, 2, 1, 1), (3, 2, 1, 1)), "image_size": 33}),
])
def test_hot_cell_values_equal_the_dense_upsample_bit_for_bit(source, target, kw):
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((3, source, source, 4)).astype(np.float32)
    taps = upsample_k.make_taps((source, source), (target, target), kw.get("geometry", "original"),
                                kw.get("convolutions"), kw.get("image_size"))
    dense = np.asarray(jax.jit(lambda a: upsample_k.apply_taps(a, *taps))(acts))
    ch, cw = sparse_k.axis_cells(taps[0]), sparse_k.axis_cells(taps[1])
    cells = 3 * len(ch.i0) * len(cw.i0) * 4
    values, unit, img, ty, tx, inside = (np.asarray(x) for x in jax.jit(
        lambda a, e: sparse_k.DenseGrid(a, ch, cw).values(e))(acts, np.arange(cells, dtype=np.int32)))
    seen = np.zeros(dense.shape, int)
    for e in range(cells):
        m = inside[e]
        y, x = np.broadcast_to(ty[e], m.shape)[m], np.broadcast_to(tx[e], m.shape)[m]
        assert values[e][m].tobytes() == dense[img[e], y, x, unit[e]].tobytes()
        np.add.at(seen, (img[e], y, x, unit[e]), 1)
    assert (seen == 1).all()  # the cells partition the target grid
    # No value of a cell exceeds its bound.
    bounds = np.asarray(sparse_k.cell_bounds(acts, ch, cw)).reshape(-1)
    assert all((values[e][inside[e]] <= bounds[e]).all() for e in range(cells))


def _dissect(acts, seg, sparse, **kw):
    return statistics.dissect_activations(batches_of(acts, seg), L, 0.05, seg.shape[-1], topk=4,
                                          sparse=sparse, **kw)


@pytest.mark.parametrize("data", ["blobs", "signed", "constant"])
def test_sparse_and_dense_passes_agree_exactly(data):
    rng = np.random.default_rng(1)
    n, h, s = 23, 7, 28
    acts = {"blobs": lambda: blobby(rng, n, h),
            "signed": lambda: rng.standard_normal((n, h, h, U)).astype(np.float32),   # level may be <= 0
            "constant": lambda: np.zeros((n, h, h, U), np.float32)}[data]()
    seg = rng.integers(0, L, (n, 2, s, s)).astype(np.int32)
    sparse = _dissect(acts, seg, True, num_batches=5)
    dense = _dissect(acts, seg, False)
    for key in ("thresholds", "intersection", "active", "label_pixels", "top_index", "top_values", "act_mean"):
        assert getattr(sparse, key).tobytes() == getattr(dense, key).tobytes(), key
    # Independent check: the level is numpy.quantile of the upsampled values, the counts NumPy's.
    plan = statistics.Plan(num_units=U, num_labels=L, source_hw=(h, h), resolution=(s, s))
    up = np.asarray(jax.jit(plan.upsample)(acts)).reshape(-1, U)
    np.testing.assert_array_equal(sparse.thresholds, np.quantile(up, 0.95, axis=0))
    np.testing.assert_array_equal(sparse.active, (up > sparse.thresholds).sum(0))
    labels = seg.transpose(0, 2, 3, 1).reshape(-1, 2)
    for c in range(1, L):
        has = (labels == c).any(1)
        np.testing.assert_array_equal(sparse.intersection[:, c], ((up > sparse.thresholds) & has[:, None]).sum(0))


@pytest.mark.slow
def test_image_count_bound_may_exceed_the_real_count():
    """The floor needs only an upper bound on the images (unreadable ones drop out)."""
    rng = np.random.default_rng(2)
    acts, seg = blobby(rng, 20, 7), rng.integers(0, L, (20, 1, 28, 28)).astype(np.int32)
    exact = _dissect(acts, seg, False)
    plan = statistics.Plan(num_units=U, num_labels=L, source_hw=(7, 7), resolution=(28, 28), quantile=0.05)
    floors = {}
    for images in (20, 21, 400):
        state = plan.pass1_init(images)
        for i in range(0, 20, 5):
            state = statistics.pass1_update(plan, state, acts[i:i + 5], np.ones(5, bool),
                                            np.arange(i, i + 5, dtype=np.int32), np.zeros(5, np.int32))
        selection, _ = plan.pass1_finish(jax.tree.map(lambda x: np.asarray(x)[None], state))
        low = statistics.pass2_update(plan, plan.pass2_init(selection), acts, np.ones(20, bool))
        levels = plan.pass2_finish(selection, jax.tree.map(lambda x: np.asarray(x)[None], low))
        np.testing.assert_array_equal(levels, exact.thresholds)
        floors[images] = np.asarray(state["quantile"]["floor"])
    assert (floors[20] >= 0x8000).all()   # the floor was used (at a positive value) ...
    assert (floors[400] == 0).all()       # ... and not with a bound too loose to prove one


def test_floor_target_grows_with_the_number_of_values():
    targets = [sparse_k.floor_target(n, 16, 0.99) for n in range(1, 300)]
    assert all(b >= a for a, b in zip(targets, targets[1:]))
    assert sparse_k.floor_target(None, 16, 0.99) == 0
    n = 100 * 16
    assert sparse_k.floor_target(100, 16, 0.99) == n - int(np.floor((n - 1) * 0.99))
