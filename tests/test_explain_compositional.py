"""Compositional explanations against an independent NumPy enumeration, planted formulas and the labeller."""

import jax
import numpy as np
import pytest

from helpers import enumerate_best, np_iou
from jaxdissect.explain import SparseMasks, compositional, formula_mask
from jaxdissect.kernels import iou as ik
from jaxdissect.kernels import labels as kl


def _parse(text, masks, names):
    """Tiny recursive-descent evaluator of ``name | (F AND F) | (F OR F) | (F AND NOT F)``."""
    index = {n: i for i, n in enumerate(names)}
    tokens = text.replace("(", " ( ").replace(")", " ) ").split()
    pos = 0

    def term():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok != "(":
            return masks[index[tok]]
        left = term()
        op = tokens[pos]
        pos += 1
        if op == "AND" and tokens[pos] == "NOT":
            pos += 1
            op = "AND NOT"
        right = term()
        assert tokens[pos] == ")"
        pos += 1
        return {"AND": left & right, "OR": left | right, "AND NOT": left & ~right}[op]

    out = term()
    assert pos == len(tokens), text
    return out


def _planted(rng, num_units, num_concepts, pixels):
    c = rng.random((num_concepts, pixels)) < rng.uniform(0.05, 0.4, (num_concepts, 1))
    units = []
    for _ in range(num_units):
        k = rng.integers(1, 4)
        idx = rng.choice(num_concepts, k, replace=False)
        f = c[idx[0]]
        for j in idx[1:]:
            f = [f | c[j], f & c[j], f & ~c[j]][rng.integers(3)]
        units.append(f)
    return np.stack(units), c


def test_exact_recovers_planted_formulas_at_iou_one():
    rng = np.random.default_rng(0)
    u, c = _planted(rng, 12, 16, 4000)
    names = [f"k{i}" for i in range(16)]
    res = compositional(u, c, names, exact=True, block_words=4)
    for r, mask in zip(res, u):
        if mask.any():
            assert r.iou == 1.0, r
            np.testing.assert_array_equal(_parse(r.formula, c, names), mask)


def test_exact_equals_exhaustive_enumeration_and_beam_is_not_better():
    rng = np.random.default_rng(1)
    c = rng.random((6, 1500)) < np.array([0.1, 0.2, 0.3, 0.15, 0.5, 0.05])[:, None]
    noise = rng.random((8, 1500))
    u = np.stack([(c[0] | c[1]) ^ (noise[0] < 0.05), (c[2] & ~c[4]) | (noise[1] < 0.03),
                  ((c[1] & c[3]) | c[5]) & (noise[2] > 0.1), noise[3] < 0.2, noise[4] < 0.01,
                  c[4] & (noise[5] < 0.5), (c[0] | c[2] | c[3]) & ~c[5], np.zeros(1500, bool)])
    names = [f"n{i}" for i in range(6)]
    exact = compositional(u, c, names, exact=True, block_words=2)
    for beam in (1, 3):
        approx = compositional(u, c, names, beam=beam, block_words=2)
        for e, a in zip(exact, approx):
            assert a.iou <= e.iou
    for length in (1, 2, 3):
        got = compositional(u, c, names, length=length, exact=True, block_words=2)
        for k, r in enumerate(got):
            assert r.iou == enumerate_best(u[k], c, length), (length, k, r)
            assert r.iou == np_iou(_parse(r.formula, c, names), u[k])


def test_reported_iou_is_the_iou_of_the_formula_mask():
    rng = np.random.default_rng(2)
    u, c = _planted(rng, 10, 12, 2500)
    u = u ^ (rng.random(u.shape) < 0.05)
    names = [f"w{i}" for i in range(12)]
    for exact in (False, True):
        for r, mask in zip(compositional(u, c, names, exact=exact, block_words=4), u):
            f = _parse(r.formula, c, names)
            np.testing.assert_array_equal(formula_mask(c, r), f)
            assert r.iou == np_iou(f, mask)
            assert (r.intersection, r.formula_pixels, r.unit_pixels) == (
                np.count_nonzero(f & mask), np.count_nonzero(f), np.count_nonzero(mask))


def test_beam_width_one_misses_a_decoy_that_exact_finds():
    # Unit = (a AND b) OR d; the decoy e covers the unit's pixels well alone but leads nowhere.
    p = np.arange(1200)
    a, b, d = p < 400, (p >= 200) & (p < 600), (p >= 900) & (p < 1000)
    e = (p >= 150) & (p < 420) | ((p >= 900) & (p < 960))
    c = np.stack([a, b, d, e])
    u = ((a & b) | d)[None]
    names = ["a", "b", "d", "e"]
    beam1 = compositional(u, c, names, beam=1, block_words=2)[0]
    exact = compositional(u, c, names, exact=True, block_words=2)[0]
    assert exact.iou == 1.0 and beam1.iou < 1.0
    assert beam1.formula.startswith("(e ") or beam1.formula == "e"


def test_length_one_equals_the_dissection_labels():
    rng = np.random.default_rng(3)
    b, k, s, units, labels = 6, 2, 8, 7, 9
    seg = rng.integers(0, labels, (b, k, s, s)).astype(np.int32)
    act = rng.standard_normal((b, s, s, units)).astype(np.float32)
    thr = np.quantile(act.reshape(-1, units), 0.8, axis=0).astype(np.float32)
    state = ik.update(ik.init(units, labels), act, thr, seg, method="segment")
    state = ik.merge(jax.tree.map(lambda x: np.asarray(x)[None], state))
    table = ik.iou(state["intersection"], state["active"], state["label_pixels"])
    label, best, _ = kl.best_labels(table)
    unit_masks = (act > thr).reshape(-1, units).T
    flat = np.transpose(seg, (0, 2, 3, 1)).reshape(-1, k)
    concept_masks = np.stack([(flat == c).any(1) for c in range(1, labels)])
    names = [f"label{c}" for c in range(1, labels)]
    res = compositional(unit_masks, concept_masks, names, length=1)
    assert [r.formula for r in res] == [f"label{c}" for c in label]
    np.testing.assert_array_equal([r.iou for r in res], best)


def test_sparse_masks_round_trip_and_store_only_non_zero_blocks():
    rng = np.random.default_rng(4)
    m = np.zeros((5, 10_000), bool)
    m[0, 100:140] = True
    m[3] = rng.random(10_000) < 0.3
    sm = SparseMasks.from_dense(m, block_words=8)
    np.testing.assert_array_equal(sm.to_dense(), m)
    assert sm.blocks.shape[0] == 1 + sm.num_blocks          # mask 0 touches one block, mask 3 all of them
    np.testing.assert_array_equal(sm.counts, m.sum(1))


def test_bad_inputs_are_named():
    c = np.zeros((2, 10), bool)
    with pytest.raises(ValueError, match="one name per concept"):
        compositional(np.zeros((1, 10), bool), c, ["x"])
    with pytest.raises(ValueError, match="same images"):
        compositional(np.zeros((1, 11), bool), c, ["x", "y"])
    with pytest.raises(ValueError, match="boolean"):
        compositional(np.zeros((1, 10)), c, ["x", "y"])


def test_exact_with_a_weak_starting_incumbent_still_equals_enumeration():
    # beam=1 seeds the branch and bound with a poor incumbent, so the bounds do the pruning.
    rng = np.random.default_rng(5)
    u, c = _planted(rng, 12, 7, 1200)
    u = u ^ (rng.random(u.shape) < 0.08)
    names = [f"z{i}" for i in range(7)]
    for k, r in enumerate(compositional(u, c, names, exact=True, beam=1, block_words=2)):
        assert r.iou == enumerate_best(u[k], c, 3), (k, r)


def _paper_beam(u, c, beam, length=3):
    """The paper's beam search on dense NumPy masks (dict + Counter order, as compexp's compute_best_iou)."""
    from collections import Counter
    masks = {}

    def score(key, m):
        masks[key] = m
        return np_iou(m, u)

    ious = Counter({k: v for k in range(len(c)) if (v := score(k, c[k])) > 0})
    if not ious:
        return 0.0
    formulas = dict(ious.most_common(beam))
    for _ in range(length - 1):
        new = {}
        for f in formulas:
            for k in range(len(c)):
                for op, g in (("or", masks[f] | c[k]), ("and", masks[f] & c[k]), ("andnot", masks[f] & ~c[k])):
                    new[(f, op, k)] = score((f, op, k), g)
        formulas.update(new)
        formulas = dict(Counter(formulas).most_common(beam))
    return Counter(formulas).most_common(1)[0][1]


@pytest.mark.parametrize("beam", [1, 5])
def test_beam_equals_the_papers_beam_search(beam):
    rng = np.random.default_rng(6)
    u, c = _planted(rng, 10, 9, 1000)
    u = u ^ (rng.random(u.shape) < 0.1)
    names = [f"p{i}" for i in range(9)]
    for k, r in enumerate(compositional(u, c, names, beam=beam, block_words=2)):
        assert r.iou == _paper_beam(u[k], c, beam), (k, r)
