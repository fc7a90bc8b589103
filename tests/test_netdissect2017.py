"""The 2017 NetDissect scoring on a planted Broden folder against a NumPy computation of the
reference formula (reference 1.5-1.8), and unique detectors counted both ways."""

import csv
import json
import os

import numpy as np
import pytest

import jaxdissect
from helpers import ND2017_CATS as CATS
from helpers import ND2017_IMAGES as N
from helpers import ND2017_LABELS as LABELS
from helpers import ND2017_SEG as S
from helpers import Tiny, write_planted_broden
from jaxdissect import netdissect2017 as nd
from jaxdissect.data import broden

PRIMARY = {n: CATS.index(c) for n, (_, c) in LABELS.items()}   # wood: material, also drawn as an object
Q = 0.1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("broden2017"))
    return root, write_planted_broden(root)


def reference(planted, params):
    """NumPy: exact thresholds, masks, and IoU = I / (A_cat(l) + G - I + 1e-20) (reference 1.5)."""
    x = np.stack([p[0] for p in planted]).astype(np.float64) / 127.5 - 1.0
    pooled = x.reshape(N, S, 2, S, 2, 3).mean(axis=(2, 4))
    acts = pooled @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)
    units = acts.shape[-1]
    thresholds = np.array([np.quantile(acts[..., u].ravel(), 1 - Q) for u in range(units)])
    mask = acts > thresholds                                     # [N, S, S, U]
    num_labels = max(LABELS) + 1
    inter = np.zeros((units, num_labels))
    truth = np.zeros(num_labels)
    cat_act = np.zeros((units, len(CATS)))
    for n, (_, maps, scalars) in enumerate(planted):
        for lab in range(1, num_labels):
            here = np.zeros((S, S), bool)
            for m in maps:
                here |= m == lab
            if lab in scalars:
                here[:] = True
            truth[lab] += here.sum()
            inter[:, lab] += (mask[n] & here[..., None]).sum(axis=(0, 1))
        present = {PRIMARY[int(v)] for m in maps for v in np.unique(m) if v > 0} | {PRIMARY[s] for s in scalars}
        for c in present:
            cat_act[:, c] += mask[n].sum(axis=(0, 1))
    iou = np.zeros((units, num_labels))
    for lab in range(1, num_labels):
        c = PRIMARY[lab]
        iou[:, lab] = inter[:, lab] / (cat_act[:, c] + truth[lab] - inter[:, lab] + 1e-20)
    return thresholds, iou, inter, truth, cat_act


def test_iou_equals_reference_formula(folder, tmp_path):
    root, planted = folder
    rng = np.random.default_rng(0)
    params = {"kernel": rng.standard_normal((3, 6)).astype(np.float32),
              "bias": (0.1 * rng.standard_normal(6)).astype(np.float32)}
    data = broden.BrodenSource(root)
    assert data.label_categories[6] == "material"
    out = str(tmp_path / "out")
    results = jaxdissect.dissect(Tiny(), {"params": {"proj": params}}, ["proj"], data, "dataset",
                                 method="netdissect2017", quantile=Q, topk=3, batch_size=4, thumbsize=16,
                                 output_dir=out, progress=False)
    r = results["proj"]
    thresholds, iou, inter, truth, cat_act = reference(planted, params)
    np.testing.assert_allclose(r.thresholds, thresholds, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r.intersection[:, 1:], inter[:, 1:])
    np.testing.assert_array_equal(r.label_pixels[1:], truth[1:])
    np.testing.assert_array_equal(r.category_active, cat_act)
    np.testing.assert_allclose(r.iou, iou, rtol=1e-12, atol=0)
    assert (r.iou[:, 0] == 0).all() and (r.label > 0).all()                  # label 0 is never scored
    assert (r.iou[:, 10] == 0).all()                                        # a label never seen
    # Labels: the best of the best category (each label competes only in its primary category).
    for u in range(6):
        per_cat = [max(iou[u, lab] for lab in LABELS if PRIMARY[lab] == c) if any(PRIMARY[lab] == c for lab in LABELS)
                   else 0.0 for c in range(len(CATS))]
        best_cat = max(range(len(CATS)), key=lambda c: (per_cat[c], c))
        assert CATS[best_cat] == r.labels[u]["category"]
        assert r.label_iou[u] == pytest.approx(per_cat[best_cat], rel=1e-12)
    # relabel keeps the 2017 rule: same labels, a detector when the score REACHES the cut-off.
    at_cut = int(np.argsort(r.label_iou)[len(r.label_iou) // 2])
    again = r.relabel(miniou=float(r.label_iou[at_cut]))
    np.testing.assert_array_equal(again.label, r.label)
    np.testing.assert_array_equal(again.interpretable, (r.label_iou >= r.label_iou[at_cut]) & (r.label > 0))
    assert again.interpretable[at_cut]                                      # PNAS's '>' would drop it
    with pytest.raises(ValueError, match="row0_competes"):
        r.relabel(row0_competes=True)
    # result.csv: the original's columns, units by descending score, 1-based unit numbers.
    with open(os.path.join(out, "proj", "proj-result.csv")) as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header[:4] == ["unit", "category", "label", "score"]
    assert header[4:9] == ["color-label", "color-truth", "color-activation", "color-intersect", "color-iou"]
    assert len(header) == 4 + 5 * len(CATS)
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    for row in rows:
        u = int(row["unit"]) - 1
        assert float(row["score"]) == pytest.approx(r.label_iou[u], rel=1e-9)
        for c in CATS:                                                      # no overlap: label '', no counts
            if row[f"{c}-label"] == "":
                assert row[f"{c}-truth"] == row[f"{c}-intersect"] == "0" and float(row[f"{c}-iou"]) == 0
        lab = [k for k, (name, _) in LABELS.items() if name == row["material-label"]]
        if lab:
            assert int(row["material-truth"]) == truth[lab[0]]
            assert int(row["material-activation"]) == cat_act[u, CATS.index("material")]
            assert int(row["material-intersect"]) == inter[u, lab[0]]
    report = json.load(open(os.path.join(out, "proj", "netdissect2017.json")))
    assert report["counts"] == nd.unique_detectors(nd.scores_of(r), CATS, 0.04)
    assert "unique detectors (per category, summed)" in open(os.path.join(out, "index.html")).read()


def _scores(cat_label, cat_score):
    cat_label, cat_score = np.array(cat_label), np.array(cat_score, np.float64)
    best = cat_score.shape[1] - 1 - np.argmax(cat_score[:, ::-1], axis=1)
    rows = np.arange(len(best))
    return nd.Scores(iou=np.zeros((len(best), 1)), category_label=cat_label, category_score=cat_score,
                     best_category=best, label=cat_label[rows, best], score=cat_score[rows, best])


def test_unique_detectors_both_ways():
    # Planted layer: categories object (labels 1-3), part (4-5), scene (6).
    cat_label = [[1, 4, 6], [1, 0, 6], [2, 5, 6], [3, 0, 0], [2, 4, 0], [0, 0, 0]]
    cat_score = [[0.10, 0.05, 0.00], [0.08, 0.00, 0.03], [0.02, 0.06, 0.041], [0.04, 0.00, 0.00],
                 [0.039, 0.045, 0.0], [0.0, 0.0, 0.0]]
    counts = nd.unique_detectors(_scores(cat_label, cat_score), ["object", "part", "scene"], 0.04)
    # Report convention: top score >= 0.04 -> units 0 (1), 1 (1), 2 (5), 3 (3), 4 (4); labels {1, 5, 3, 4}.
    assert counts["top"] == {"detectors": 5, "unique": 4, "per_category": {"object": 2, "part": 2, "scene": 0}}
    # CVPR convention: per category, s_c > 0.04: object units 0, 1 -> {1}; part units 0, 2, 4 -> {4, 5};
    # scene unit 2 -> {6}; summed 4; detectors = units with max_c s_c > 0.04: 0, 1, 2, 4.
    b = counts["per_category"]
    assert b["per_category"] == {"object": 1, "part": 2, "scene": 1} and b["unique"] == 4
    assert b["detectors"] == 4
    assert b["detectors_per_category"] == {"object": 2, "part": 3, "scene": 1}


def test_broden_folder_errors(folder, tmp_path):
    import shutil

    root, _ = folder
    for missing, pattern in (("index.csv", "index.csv is missing"), ("c_part.csv", "c_part.csv is missing")):
        bad = str(tmp_path / missing)
        shutil.copytree(root, bad)
        os.remove(os.path.join(bad, missing))
        with pytest.raises(broden.BrodenError, match=pattern):
            broden.BrodenSource(bad)


@pytest.mark.slow
def test_launcher_method_and_rotation(folder, tmp_path, monkeypatch):
    """launch.dissect --method=netdissect2017 --rotation=1:2 on the planted folder, in-process."""
    monkeypatch.chdir(tmp_path)  # the default output directory is relative
    from jaxdissect.checkpoint import save_model
    from jaxdissect.models.small_cnn import SmallCNN
    from jaxdissect.rotation import random_rotation_powers
    from launch import dissect as launcher
    from helpers import launcher_config, numpy_init

    root, _ = folder
    module = SmallCNN(widths=(8, 16, 16, 16))
    model_dir = str(tmp_path / "tiny_cnn")
    save_model(model_dir, module, numpy_init(module, (1, 16, 16, 3)), metadata={"model": "tiny_cnn", "preprocessing": {"normalization": "imagenet", "resize": 16,
                                                            "crop": 16}})
    config = launcher_config(model=model_dir, data=f"broden:{root}", layers="conv2", quantile=None, batch_size=4,
                     topk=3, thumbsize=16, method="netdissect2017", rotation="1:2", rotation_unpermute=False)
    built = launcher.build(config)
    assert built["config"].level_quantile == 0.005
    assert built["output_dir"] == os.path.join("results", "tiny_cnn-broden-dataset-conv2-netdissect2017-rot1_2-t16")
    assert built["config"].bases == "rotation:1:2"          # --rotation names the basis rotation:ALPHA:SEED
    out = str(tmp_path / "out")
    results, _ = launcher.run({**config, "output_dir": out})
    r = results["conv2"]
    explicit = jaxdissect.dissect(built["module"], built["variables"], [], built["data"], "dataset",
                                  built["config"].replace(rotation=None), progress=False,
                                  views={"conv2": ("conv2", random_rotation_powers(16, [1.0], 2)[0])})["conv2"]
    np.testing.assert_array_equal(r.thresholds, explicit.thresholds)
    np.testing.assert_array_equal(r.intersection, explicit.intersection)
    assert r.config["method"] == "netdissect2017" and r.config["rotated_layer"] == "conv2"
    assert r.category_active.shape == (16, len(CATS))
    assert os.path.exists(os.path.join(out, "conv2", "conv2-result.csv"))
    with pytest.raises(launcher.LaunchError, match="ALPHA"):
        launcher.build({**config, "rotation": "x"})
