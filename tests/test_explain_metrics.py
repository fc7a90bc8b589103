"""Label metrics against NumPy definitions; maxima; NeuronEval's missing/extra-labels checks."""

import numpy as np
import pytest

from jaxdissect.explain import metrics as em


def _np_ap(a, y):
    """Average precision by explicit thresholds at every distinct activation (step curve)."""
    ap, prev_r = 0.0, 0.0
    for t in np.unique(a)[::-1]:
        sel = a >= t
        tp = (sel & y).sum()
        r, p = tp / y.sum(), tp / sel.sum()
        ap += (r - prev_r) * p
        prev_r = r
    return ap


def test_metrics_match_numpy_definitions():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = np.round(rng.standard_normal(300), 1).astype(np.float32)      # ties on purpose
        y = rng.random(300) < 0.2
        m, c = a > 0.3, y
        inter = (m & c).sum()
        np.testing.assert_allclose(em.iou(a, y, 0.3), inter / (m | c).sum(), rtol=1e-6)
        np.testing.assert_allclose(em.f1(a, y, 0.3), 2 * inter / (m.sum() + c.sum()), rtol=1e-6)
        np.testing.assert_allclose(em.recall(a, y, 0.3), inter / m.sum(), rtol=1e-6)
        np.testing.assert_allclose(em.precision(a, y, 0.3), inter / c.sum(), rtol=1e-6)
        np.testing.assert_allclose(em.auprc(a, y), _np_ap(a, y), rtol=1e-5)
        np.testing.assert_allclose(em.pearson(a, y), np.corrcoef(a, y)[0, 1], rtol=1e-5)
        np.testing.assert_allclose(em.cosine(a, y), a @ y / np.linalg.norm(a) / np.linalg.norm(y), rtol=1e-5)


def test_unit_equal_to_concept_scores_the_maximum_at_pixel_and_image_level():
    rng = np.random.default_rng(1)
    concept = (rng.random(40 * 9) < 0.15).astype(np.float32)
    got = em.label_metrics(concept, concept, num_images=40, threshold=0.5)
    assert set(got) == {f"{lvl}_{m}" for lvl in ("pixel", "image") for m in ("iou", "f1", "auprc", "pearson", "cosine")}
    for name, value in got.items():
        np.testing.assert_allclose(value, 1.0, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", ["iou", "f1", "auprc", "pearson", "cosine"])
def test_sound_metrics_fall_when_half_the_positives_are_dropped_or_added(name):
    rng = np.random.default_rng(2)
    concept = (rng.random(1000) < 0.1).astype(np.float32)
    act = concept + 0.01 * rng.random(1000).astype(np.float32)
    assert em.missing_labels_check(em.METRICS[name], act, concept, threshold=0.5)
    assert em.extra_labels_check(em.METRICS[name], act, concept, threshold=0.5)


def test_sanity_report_flags_recall_and_precision():
    report = em.sanity_report()
    assert not report["recall"]["extra_labels"] and report["recall"]["missing_labels"]
    assert not report["precision"]["missing_labels"]
    assert [m for m, r in report.items() if r["sound"]] == ["iou", "f1", "auprc", "pearson", "cosine"]


def test_batched_units_and_bad_inputs():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 50)).astype(np.float32)
    y = rng.random(50) < 0.3
    np.testing.assert_allclose(em.auprc(a, y), [_np_ap(x, y) for x in a], rtol=1e-5)
    with pytest.raises(ValueError, match="unknown metrics"):
        em.label_metrics(a[0], y, metrics=("auc",))
    with pytest.raises(ValueError, match="num_images"):
        em.image_level(a[0], y, 7)
