"""Sparse codes (jaxdissect.kernels.codes): the statistics read an SAE's TopK codes as (indices, values) and
give exactly what their dense map gives, and what NumPy gives."""

from fractions import Fraction

import jax
import numpy as np
import pytest

from jaxdissect import statistics
from jaxdissect.kernels import sparse as sparse_k
from jaxdissect.kernels import upsample as upsample_k
from jaxdissect.kernels.codes import SparseCodes

L = 6


def random_codes(rng, n, h, units, k, signed=False):
    """``k`` distinct units per position; values mostly positive with exact +0.0 and -0.0 among them
    (a TopK code keeps zeros when fewer than ``k`` features fire), or signed."""
    idx = np.argsort(rng.random((n, h, h, units)), -1)[..., :k].astype(np.int32)
    if signed:
        val = rng.standard_normal((n, h, h, k)) - 0.8
    else:
        val = rng.exponential(1.0, (n, h, h, k)) * (rng.random((n, h, h, k)) < 0.7)
        val[rng.random((n, h, h, k)) < 0.05] = -0.0
    return SparseCodes(idx, val.astype(np.float32), units)


def dense_of(codes):
    """The dense map by NumPy (independent of SparseCodes.dense)."""
    idx, val = np.asarray(codes.indices), np.asarray(codes.values)
    out = np.zeros(idx.shape[:-1] + (codes.num_units,), np.float32)
    np.put_along_axis(out, idx, val, -1)
    return out


def test_dense_map_is_the_listed_values_scattered():
    codes = random_codes(np.random.default_rng(0), 3, 5, 11, 4)
    assert codes.shape == (3, 5, 5, 11) and len(codes) == 3
    assert np.asarray(jax.jit(SparseCodes.dense)(codes)).tobytes() == dense_of(codes).tobytes()


@pytest.mark.parametrize("source,target,kw", [
    (7, 28, {"geometry": "original"}),
    pytest.param(7, 28, {"geometry": "clamped"}, marks=pytest.mark.slow),
    pytest.param(12, 6, {"geometry": "original"}, marks=pytest.mark.slow),   # downsampling: one pixel per cell
    (9, 28, {"convolutions": ((3, 2, 1, 1), (3, 2, 1, 1)), "image_size": 33}),
])
def test_code_grid_lists_every_nonzero_cell_once_with_the_dense_values(source, target, kw):
    rng = np.random.default_rng(1)
    codes = random_codes(rng, 2, source, 9, 3)
    dense = dense_of(codes)
    taps = upsample_k.make_taps((source, source), (target, target), kw.get("geometry", "original"),
                                kw.get("convolutions"), kw.get("image_size"))
    up = np.asarray(jax.jit(lambda a: upsample_k.apply_taps(a, *taps))(dense))
    ch, cw = sparse_k.axis_cells(taps[0]), sparse_k.axis_cells(taps[1])

    def table(c):
        g = sparse_k.CodeGrid(c, ch, cw)
        n = g.unit.size
        return (g.values(np.arange(n, dtype=np.int32)), g.skip(), g.repeat(), g.bounds())

    (values, unit, img, ty, tx, inside), skip, repeat, bounds = jax.tree.map(np.asarray, jax.jit(table)(codes))
    skip, repeat, bounds = skip.reshape(-1), repeat.reshape(-1), bounds.reshape(-1)
    zero_cells = np.asarray(jax.jit(lambda a: sparse_k.DenseGrid(a, ch, cw).skip())(dense))   # [B, Ch, Cw, U]
    listed = np.zeros(zero_cells.shape, int)
    cells, n = len(ch.i0) * len(cw.i0), 4 * codes.k
    for e in np.flatnonzero(~repeat):
        m = inside[e]
        y, x = np.broadcast_to(ty[e], m.shape)[m], np.broadcast_to(tx[e], m.shape)[m]
        assert values[e][m].tobytes() == up[img[e], y, x, unit[e]].tobytes()
        assert (values[e][m] <= bounds[e]).all()
        cell = (e // n) % cells
        listed[img[e], cell // len(cw.i0), cell % len(cw.i0), unit[e]] += 1
        assert skip[e] == zero_cells[img[e], cell // len(cw.i0), cell % len(cw.i0), unit[e]]
    # Every cell with a corner that is not +0.0 is listed exactly once (a listed +0.0 is skipped, as above).
    assert (listed[~zero_cells] == 1).all() and listed.max() == 1


def _dissect(acts, seg, quantile, size=4, labels=None):
    n = seg.shape[0]

    def batches():
        for i in range(0, n, size):
            a = (SparseCodes(acts.indices[i:i + size], acts.values[i:i + size], acts.num_units)
                 if isinstance(acts, SparseCodes) else acts[i:i + size])
            yield (a, seg[i:i + size]) if labels is None else (a, seg[i:i + size], labels[i:i + size])

    return statistics.dissect_activations(batches, L, quantile, seg.shape[-1], topk=3, num_batches=-(-n // size),
                                          progress=False)


FIELDS = ("thresholds", "active", "intersection", "label_pixels", "top_values", "top_index", "act_mean", "act_max")


def _data(signed):
    """11 images (batches of 4: one padded), 13 units, 3 listed per position, 2 label channels, 2 image labels."""
    rng = np.random.default_rng(2)
    n, h, s, units = 11, 7, 28, 13
    codes = random_codes(rng, n, h, units, 3, signed)
    seg = rng.integers(0, L, (n, 2, s, s)).astype(np.int32)
    labels = rng.integers(-1, L, (n, 2)).astype(np.int32)
    return codes, seg, labels


@pytest.mark.parametrize("signed,quantile", [(False, 0.05), pytest.param(False, 0.3, marks=pytest.mark.slow),
                                             pytest.param(True, 0.5, marks=pytest.mark.slow)])
def test_codes_dissect_as_numpy_computes_it(signed, quantile):
    """Levels numpy.quantile's of the upsampled dense map (made by NumPy), and active counts, intersections,
    top images, exact means and maxima NumPy's.

    Signed codes at quantile 0.5 have negative levels: their all-+0.0 cells are active and pass 3 takes
    the dense kernel."""
    codes, seg, labels = _data(signed)
    n, h, _, units = codes.shape
    s = seg.shape[-1]
    dense = dense_of(codes)
    got = _dissect(codes, seg, quantile, labels=labels)
    plan = statistics.Plan(num_units=units, num_labels=L, source_hw=(h, h), resolution=(s, s))
    up = np.asarray(jax.jit(plan.upsample)(dense)).reshape(-1, units)
    np.testing.assert_array_equal(got.thresholds.view(np.uint32),
                                  np.quantile(up, 1 - quantile, axis=0).astype(np.float32).view(np.uint32))
    active = up > got.thresholds
    np.testing.assert_array_equal(got.active, active.sum(0))
    assert (got.thresholds < 0).any() == signed
    pixel_labels = np.concatenate([seg.transpose(0, 2, 3, 1).reshape(-1, 2),
                                   np.repeat(labels, s * s, axis=0)], 1)                  # [N*S*S, 4]
    for c in range(1, L):
        has = (pixel_labels == c).any(1)
        np.testing.assert_array_equal(got.intersection[:, c], (active & has[:, None]).sum(0))
    score = dense.max((1, 2))                                                             # [N, U]
    order = np.lexsort((np.broadcast_to(np.arange(n)[:, None], score.shape), -score), axis=0)[:3].T
    np.testing.assert_array_equal(got.top_index, order)
    np.testing.assert_array_equal(got.top_values, np.take_along_axis(score.T, order, 1))
    exact = [float(sum(Fraction(float(x)) for x in dense[..., u].ravel()) / dense[..., u].size) for u in range(units)]
    np.testing.assert_array_equal(got.act_mean, exact)
    np.testing.assert_array_equal(got.act_max, dense.max((0, 1, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("signed,quantile", [(False, 0.05), (True, 0.5)])
def test_codes_dissect_exactly_as_their_dense_map(signed, quantile):
    """Every result array bit-identical to the dense map's (whose kernels tests/test_kernels_sparse.py checks)."""
    codes, seg, labels = _data(signed)
    got = _dissect(codes, seg, quantile, labels=labels)
    ref = _dissect(dense_of(codes), seg, quantile, labels=labels)
    for key in FIELDS:
        assert np.asarray(getattr(got, key)).tobytes() == np.asarray(getattr(ref, key)).tobytes(), key


def test_topk_sae_codes_are_its_dense_encoding():
    from jaxdissect.bases.sae import TopKSAE

    rng = np.random.default_rng(3)
    c, u, k = 6, 20, 4
    params = {"w_enc": rng.standard_normal((c, u)).astype(np.float32), "b_enc": rng.standard_normal(u).astype(
        np.float32), "w_dec": rng.standard_normal((u, c)).astype(np.float32), "b_dec": np.zeros(c, np.float32)}
    acts = rng.standard_normal((2, 3, 3, c)).astype(np.float32)
    basis = TopKSAE(k=k)
    codes = jax.tree.map(np.asarray, jax.jit(basis.codes)(params, acts))
    assert isinstance(codes, SparseCodes) and codes.indices.shape == (2, 3, 3, k)
    np.testing.assert_array_equal(dense_of(codes), np.asarray(jax.jit(basis.encode)(params, acts)))


@pytest.mark.parametrize("bad,message", [
    (lambda i, v: (np.where(i == i[..., :1], i[..., 1:2], i), v), "listed twice"),
    (lambda i, v: (i + 100, v), r"lie in \[0, 13\)"),
    (lambda i, v: (i, np.where(i == 2, np.nan, v)), "unit 2 has NaN/Inf"),
])
def test_bad_codes_are_refused_with_the_problem_named(bad, message):
    rng = np.random.default_rng(4)
    codes = random_codes(rng, 4, 5, 13, 3)
    idx, val = bad(codes.indices, codes.values)
    seg = rng.integers(0, L, (4, 1, 10, 10)).astype(np.int32)
    with pytest.raises(statistics.DissectionError, match=message):
        _dissect(SparseCodes(idx, val.astype(np.float32), 13), seg, 0.05)
