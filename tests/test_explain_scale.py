"""Explain at scale: per-image sparse masks (``ImageMasks``), a resumable pass 3, and the exact mode's pruning.

References: dense boolean masks and NumPy counts (the dense path of the
same functions, and direct NumPy), an uninterrupted dissection, brute-force
IoUs of every one-step extension (bound admissibility) and exhaustive
enumeration of all formulas (exact mode).
"""

import importlib
import json
import os

import numpy as np
import pytest
from helpers import combo_report, run_combo

from jaxdissect.explain import ImageMasks, SparseMasks, compositional
from jaxdissect.explain import significance as sig
from jaxdissect.explain.compositional import formula_image_masks, formula_mask
from jaxdissect.explain.pipeline import MaskCollector, concept_image_masks

IMAGES, POSITIONS = 24, 45            # 45 positions: images do not fill whole 32-bit words


def _masks(rng, count, p_image=0.3, p_pixel=0.3):
    """Boolean [count, IMAGES * POSITIONS]: each mask present in some images only."""
    present = rng.random((count, IMAGES, 1)) < p_image
    return (present & (rng.random((count, IMAGES, POSITIONS)) < p_pixel)).reshape(count, -1)


def test_image_masks_round_trip_sparse_layout_and_selection():
    rng = np.random.default_rng(0)
    dense = _masks(rng, 9)
    dense[3] = False                                                   # an empty mask
    m = ImageMasks.from_dense(dense, IMAGES)
    assert np.array_equal(m.to_dense(), dense)
    assert np.array_equal(m.counts, dense.sum(1))
    present = dense.reshape(9, IMAGES, POSITIONS).any(2)
    assert len(m.mask_ids) == present.sum()                           # only non-empty (mask, image) pairs
    rows = [4, 0, 4, 8]
    assert np.array_equal(m.take(rows).to_dense(), dense[rows])
    halves = [ImageMasks.from_dense(d.reshape(9, -1), k) for d, k in
              ((dense.reshape(9, IMAGES, -1)[:, :10], 10), (dense.reshape(9, IMAGES, -1)[:, 10:], IMAGES - 10))]
    assert np.array_equal(ImageMasks.concat_images(halves).to_dense(), dense)
    # Word-aligned images: the same set pixels as the dense masks padded to 64 positions per image.
    padded = np.zeros((9, IMAGES, 64), bool)
    padded[:, :, :POSITIONS] = dense.reshape(9, IMAGES, POSITIONS)
    s = m.to_sparse(block_words=3)
    assert np.array_equal(s.to_dense(), padded.reshape(9, -1))
    assert np.array_equal(s.counts, dense.sum(1))
    ref = SparseMasks.from_dense(padded.reshape(9, -1), 3)
    assert np.array_equal(s.keys, ref.keys) and np.array_equal(s.blocks, ref.blocks)
    with pytest.raises(ValueError, match="given twice"):
        ImageMasks.from_pairs([0, 0], [1, 1], np.ones((2, 2), np.uint32), 1, 2, 45)


@pytest.mark.parametrize("exact", [False, True])
def test_compositional_on_image_masks_equals_the_dense_path(exact):
    rng = np.random.default_rng(1)
    concepts = _masks(rng, 14, 0.5, 0.4)
    units = np.stack([concepts[0] | concepts[1], concepts[2] & ~concepts[3], _masks(rng, 1, 0.6, 0.2)[0],
                      concepts[4] & concepts[5] | (rng.random(concepts.shape[1]) < 0.02)])
    names = [f"c{i}" for i in range(14)]
    dense = compositional(units, concepts, names, length=3, exact=exact, block_words=2)
    sparse = compositional(ImageMasks.from_dense(units, IMAGES), ImageMasks.from_dense(concepts, IMAGES), names,
                           length=3, exact=exact, block_words=2)
    assert [(d.formula, d.iou, d.intersection, d.formula_pixels) for d in dense] == \
        [(s.formula, s.iou, s.intersection, s.formula_pixels) for s in sparse]
    fm = formula_image_masks(ImageMasks.from_dense(concepts, IMAGES), sparse)
    assert np.array_equal(fm.to_dense(), np.stack([formula_mask(concepts, e) for e in dense]))
    with pytest.raises(ValueError, match="both be ImageMasks"):
        compositional(ImageMasks.from_dense(units, IMAGES), concepts, names)


def test_significance_on_image_masks_equals_the_dense_path():
    rng = np.random.default_rng(2)
    concepts = _masks(rng, 10)
    units = np.stack([concepts[0] & (rng.random(concepts.shape[1]) < 0.8), _masks(rng, 1)[0]])
    su, sc = ImageMasks.from_dense(units, IMAGES), ImageMasks.from_dense(concepts, IMAGES)
    a = sig.label_significance(units, concepts, IMAGES, permutations=63, seed=3)
    b = sig.label_significance(su, sc, IMAGES, permutations=63, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    a = sig.mask_significance(units, concepts[:2], IMAGES, permutations=31)
    b = sig.mask_significance(su, sc.take([0, 1]), IMAGES, permutations=31)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # Per-image counts against NumPy, then the bootstrap on them.
    u3, m3 = units.reshape(2, IMAGES, -1), concepts[:2].reshape(2, IMAGES, -1)
    ref = np.stack([(u3 & m3).sum(2), u3.sum(2), m3.sum(2)], -1)
    assert np.array_equal(sig.image_counts(su, sc.take([0, 1]), IMAGES), ref)
    assert np.array_equal(sig.bootstrap_iou(units, concepts[:2], IMAGES, samples=50),
                          sig.bootstrap_iou(su, sc.take([0, 1]), IMAGES, samples=50))


def test_concept_image_masks_match_numpy():
    rng = np.random.default_rng(4)
    seg = rng.integers(0, 7, (5, 2, 4, 6)) * (rng.random((5, 2, 4, 6)) < 0.3)     # labels 0..6, 7 = out of range
    seg[0, 0, 0, 0] = 7
    image_labels = np.array([[0, 3], [6, 0], [0, 0], [2, 5], [0, 0]])
    got = concept_image_masks(seg, image_labels, 7).to_dense().reshape(7, 5, 24)
    want = np.zeros((7, 5, 24), bool)
    for b in range(5):
        for lab in range(1, 7):
            want[lab, b] = (seg[b] == lab).any(0).reshape(-1) | (lab in image_labels[b])
    assert np.array_equal(got, want)


def test_collector_files_and_missing_batches(tmp_path):
    rng = np.random.default_rng(5)
    c = MaskCollector(str(tmp_path / "m"), ["a", "b"], 5, 2)
    seg = rng.integers(0, 5, (3, 1, 4, 4))
    ua, ub = rng.random((3, 4, 4, 2)) < 0.2, rng.random((3, 4, 4, 3)) < 0.2
    valid = np.array([True, False, True])
    c.add(0, {"a": ua, "b": ub}, seg, None, valid)
    with pytest.raises(FileNotFoundError, match="1 of 2 batches"):
        c.masks("a")
    c.add(1, {"a": ua[:0], "b": ub[:0]}, seg[:0], None, valid[:0])      # a batch without valid images
    units, concepts, n = c.masks("b")
    assert n == 2 and np.array_equal(units.to_dense(), np.moveaxis(ub[valid].reshape(2, 16, 3), -1, 0).reshape(3, -1))
    assert np.array_equal(concepts.to_dense().reshape(5, 2, 16)[2], (seg[valid, 0] == 2).reshape(2, 16))


@pytest.mark.slow
def test_killed_pass3_resumes_with_identical_results(tmp_path, monkeypatch):
    """Pass 3 stopped by an exception after 4 of 5 batches (checkpoint after 2), rerun: the same report."""
    kw = {"formulas": 3, "significance": True, "permutations": 50, "checkpoint_every": 2}
    _, whole = run_combo(tmp_path, "whole", **kw)
    added = []
    original = MaskCollector.add

    def add(self, batch, *args):
        added.append(batch)
        if len(added) == 4:
            raise RuntimeError("killed")
        return original(self, batch, *args)

    monkeypatch.setattr(MaskCollector, "add", add)
    with pytest.raises(RuntimeError, match="killed"):
        run_combo(tmp_path, "killed", **kw)
    assert added == [0, 1, 2, 3]
    added.clear()
    _, out = run_combo(tmp_path, "killed", **kw)
    assert added == [2, 3, 4]                           # resumed after the checkpoint of batch 2, not restarted
    assert combo_report(out) == combo_report(whole)
    for name in ("whole", "killed"):
        assert os.path.exists(os.path.join(tmp_path, name, "work", "pass3", "masks", "batch-000004.npz"))
    explained = []
    for name in ("whole", "killed"):
        with open(os.path.join(tmp_path, name, "work", "results", "explain-combo.json")) as f:
            explained.append(json.load(f))
    assert explained[0] == explained[1] and "formula_p_value" in explained[0][0]


# -- exact mode: the pair join and the bounds it prunes with -----------------------------------------------

def _structured(rng, num_units, num_concepts, pixels):
    """Concepts of mixed frequency (some nested or disjoint) and noisy formula units."""
    c = rng.random((num_concepts, pixels)) < rng.uniform(0.03, 0.5, (num_concepts, 1))
    c[1] &= c[0]                                                      # nested
    c[2] &= ~c[0]                                                     # disjoint
    u = np.stack([(c[0] | c[3]) & (rng.random(pixels) < 0.85), (c[4] & ~c[-1]) | (rng.random(pixels) < 0.02),
                  c[0] & (rng.random(pixels) < 0.7), rng.random(pixels) < 0.1][:num_units])
    return u, c


def test_pair_join_counts_match_numpy():
    from jaxdissect.explain.compositional import _Pairs

    rng = np.random.default_rng(7)
    u, c = _structured(rng, 4, 9, 1000)
    pairs = _Pairs(SparseMasks.from_dense(u, 2), SparseMasks.from_dense(c, 2), entries=64)
    assert np.array_equal(pairs.all, (c[:, None] & c[None]).sum(-1))
    for k in range(len(u)):
        assert np.array_equal(pairs.unit(k), (c[:, None] & c[None] & u[k]).sum(-1))


def _np_iou_counts(m, unit):
    union = np.count_nonzero(m | unit)
    return np.count_nonzero(m & unit) / union if union else 0.0


def test_new_bounds_are_admissible_by_brute_force():
    """Every bound on a length-2 prefix H >= the IoU of every H op x (NumPy, all x and op)."""
    cm = importlib.import_module("jaxdissect.explain.compositional")     # the module, not the function

    rng = np.random.default_rng(8)
    for trial in range(3):
        units, c = _structured(rng, 4, 7, 600 + 100 * trial)
        num = len(c)
        n = c.sum(1).astype(np.int64)
        pair_f = (c[:, None] & c[None]).sum(-1).astype(np.int64)
        for unit in units:
            us = int(unit.sum())
            if us == 0:
                continue
            cu = (c & unit).sum(1).astype(np.int64)
            pair_i = (c[:, None] & c[None] & unit).sum(-1).astype(np.int64)
            f2, i2 = cm._children(n, cu, pair_f, pair_i, n, cu)
            frontier = cm._frontier(n, cu)
            topsum = np.concatenate([[0], np.cumsum(np.sort(cu)[::-1])]).astype(np.float64)
            a, c2, o = (x.reshape(-1) for x in np.meshgrid(np.arange(num), np.arange(num), np.arange(3),
                                                               indexing="ij"))
            ops = np.asarray(cm._CHILD_OPS)[o]
            g, gu = f2[a, c2, o], i2[a, c2, o]
            bounds = {
                "pair": cm._pair_bound(a, ops, c2, g, gu, pair_i, pair_f, n, cu, us),
                "cheap": cm._bound(g, gu, 1, us, frontier, topsum),
                "quick": cm._quick_bound(g, gu, us, frontier),
            }
            assert np.all(bounds["quick"] >= bounds["cheap"] - 1e-12)
            true = np.empty(len(a))
            for k in range(len(a)):
                h = [c[a[k]] | c[c2[k]], c[a[k]] & c[c2[k]], c[a[k]] & ~c[c2[k]]][o[k]]
                assert (np.count_nonzero(h), np.count_nonzero(h & unit)) == (g[k], gu[k])
                true[k] = max(_np_iou_counts(m, unit) for x in c for m in (h | x, h & x, h & ~x))
                for name, b in bounds.items():
                    assert b[k] >= true[k] - 1e-12, (name, trial, a[k], ops[k], c2[k], b[k], true[k])
            # The delta test never drops a prefix with an extension above the incumbent, at any incumbent
            # (just below each prefix's best extension included), and does drop some.
            dropped = 0
            for best in np.concatenate([np.quantile(true, [0.1, 0.5, 0.9]), np.nextafter(true[::3], -1)]):
                if best <= 0:
                    continue
                keep = cm._delta_keep(a, ops, c2, g, gu, cm._delta_thresholds(f2, i2, us, best), n, cu)
                assert keep[true > best].all(), (trial, best)
                dropped += int((~keep).sum())
            assert dropped > 0


@pytest.mark.parametrize("length", [3, 4])
def test_exact_equals_enumeration_on_nested_and_disjoint_concepts(length):
    from helpers import enumerate_best

    rng = np.random.default_rng(9)
    u, c = _structured(rng, 4 if length == 3 else 2, 7 if length == 3 else 5, 700 if length == 3 else 300)
    names = [f"q{i}" for i in range(len(c))]
    want = [enumerate_best(x, c, length) for x in u]
    for beam in (1, 5) if length == 3 else (1,):           # beam 1: a weak first incumbent
        got = compositional(u, c, names, length=length, exact=True, beam=beam, block_words=2)
        assert [r.iou for r in got] == want, (length, beam)
