"""Permutation p-values, BH and bootstrap intervals against planted ground truth and SciPy."""

import numpy as np
import pytest
from scipy import stats

from jaxdissect.explain import significance as sig

N, POS = 2000, 16          # images x positions per image
PC = 0.2                   # concept pixel density
# A weak unit: on concept pixels with prob ALPHA, elsewhere BETA; IoU = PC*ALPHA / (PC + (1-PC)*BETA) = 0.08.
BETA = 0.034 / 0.864
ALPHA = (0.05 - 0.8 * BETA) / 0.2
TRUE_IOU = PC * ALPHA / (PC + (1 - PC) * BETA)


def _weak_unit(rng, concept):
    r = rng.random(concept.shape)
    return np.where(concept, r < ALPHA, r < BETA)


@pytest.fixture(scope="module")
def mixed_run():
    rng = np.random.default_rng(0)
    concepts = rng.random((8, N * POS)) < PC
    planted = np.stack([_weak_unit(rng, concepts[k % 8]) for k in range(100)])
    null = rng.random((200, N * POS)) < rng.uniform(0.02, 0.1, (200, 1))
    units = np.concatenate([planted, null])
    return units, concepts, sig.label_significance(units, concepts, N, permutations=199, seed=1)


def test_null_p_values_are_uniform_and_bh_keeps_false_discoveries_low(mixed_run):
    units, _, res = mixed_run
    p_null = res["p_value"][100:]
    assert stats.kstest(p_null, "uniform").pvalue > 0.01
    keep, _ = sig.benjamini_hochberg(res["p_value"], 0.05)
    false = keep[100:].sum()
    assert false / max(1, keep.sum()) <= 0.05
    keep_null, _ = sig.benjamini_hochberg(p_null, 0.05)
    assert keep_null.mean() <= 0.05
    assert res["permutations"] == 199


def test_planted_weak_units_are_detected(mixed_run):
    _, concepts, res = mixed_run
    keep, _ = sig.benjamini_hochberg(res["p_value"], 0.05)
    assert keep[:100].mean() >= 0.95
    np.testing.assert_array_equal(res["label"][:100], np.arange(100) % 8)
    assert abs(res["iou"][:100].mean() - TRUE_IOU) < 0.005
    assert (res["null_mean"][:100] < 0.06).all()          # chance IoU of a 5% unit against a 20% concept


def test_benjamini_hochberg_matches_scipy():
    p = np.random.default_rng(3).random(50) ** 3
    keep, adjusted = sig.benjamini_hochberg(p, 0.1)
    np.testing.assert_allclose(adjusted, stats.false_discovery_control(p), rtol=1e-12)
    np.testing.assert_array_equal(keep, adjusted <= 0.1)


def test_mask_significance_of_a_formula_mask():
    rng = np.random.default_rng(4)
    c = rng.random((2, 300 * 4)) < 0.3
    units = np.stack([c[0] & ~c[1], rng.random(1200) < 0.2])
    res = sig.mask_significance(units, np.stack([c[0] & ~c[1], c[0] & ~c[1]]), 300, permutations=99)
    assert res["iou"][0] == 1.0 and res["p_value"][0] == 0.01
    assert res["p_value"][1] > 0.01


@pytest.mark.slow
def test_bootstrap_interval_covers_the_planted_iou_at_its_nominal_rate():
    rng = np.random.default_rng(5)
    reps, images = 300, 500                     # 300 independent datasets of 500 images
    m = rng.random((reps, images * POS)) < PC
    u = _weak_unit(rng, m)
    lo, hi = sig.bootstrap_iou(u, m, images, samples=400, level=0.95, seed=2).T
    cover = ((lo <= TRUE_IOU) & (TRUE_IOU <= hi)).mean()
    assert 0.91 <= cover <= 0.99, cover


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="multiple of num_images"):
        sig.label_significance(np.zeros((1, 10), bool), np.zeros((1, 10), bool), 3)
    with pytest.raises(ValueError, match="probabilities"):
        sig.benjamini_hochberg([0.5, 2.0])
