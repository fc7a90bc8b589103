"""``dissect(formulas=..., significance=True)`` and ``launch.dissect --formulas --significance`` end to end.

Planted ground truth: unit 0 of layer "combo" fires exactly where "disc" OR
"window" is drawn, unit 1 exactly on "wood", unit 2 is noise. With quantile
0.25 the exact threshold is 0, so each planted unit's mask is its formula.
"""

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import screenshot as shot
from helpers import COMBO_IMAGES as N
from helpers import PLANTED_LABELS as LABELS
from helpers import PlantedScenes, combo_report, run_combo
from jaxdissect.pipelines.dissect import DissectError

PERMS = 200


def _concepts():
    """NumPy reference: boolean [L, N * 64] masks straight from the data's segmentation."""
    seg = PlantedScenes(N).get_batch(np.arange(N))["seg"][:, 0].reshape(-1)
    return {name: seg == i for i, name in enumerate(LABELS) if i}


def _eval(formula, concepts):
    """The mask of a formula text of the grammar ``name | (F AND F) | (F OR F) | (F AND NOT F)``."""
    tokens = re.findall(r"\(|\)|AND NOT|AND|OR|[^\s()]+", formula)
    pos = 0

    def parse():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok != "(":
            return concepts[tok]
        left = parse()
        op = tokens[pos]
        pos += 1
        right = parse()
        pos += 1
        return left & right if op == "AND" else left | right if op == "OR" else left & ~right

    return parse()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    return {"plain": run_combo(tmp, "plain"),
            "full": run_combo(tmp, "full", formulas=3, significance=True, permutations=PERMS),
            "nocache": run_combo(tmp, "nocache", formulas=3, significance=True, permutations=PERMS,
                            activation_cache_mb=0),
            "one": run_combo(tmp, "one", formulas=1, exact_formulas=True)}


def test_planted_formula_and_significance_in_report_json(runs):
    _, out = runs["full"]
    units = combo_report(out)
    concepts = _concepts()
    wanted = [concepts["disc"] | concepts["window"], concepts["wood"]]
    for u, mask in enumerate(wanted):
        assert units[u]["formula_iou"] == 1.0
        assert np.array_equal(_eval(units[u]["formula"], concepts), mask), units[u]["formula"]
        assert units[u]["p_value"] == pytest.approx(1 / (1 + PERMS))
        assert units[u]["significant"] and units[u]["q_value"] <= 0.05
        lo, hi = units[u]["iou_ci"]
        assert lo <= units[u]["iou"] <= hi
    assert {"OR"} <= set(re.findall(r"AND NOT|AND|OR", units[0]["formula"]))
    assert units[2]["p_value"] > 0.05 and not units[2]["significant"]      # the noise unit
    summary = list(csv.DictReader(open(os.path.join(out, "summary.csv"))))
    assert summary[0]["significant"] == "2"
    assert json.load(open(os.path.join(out, "summary.json")))["layers"][0]["significant"] == 2
    # The noise unit's formula IoU is what its formula's mask gives (NumPy, from the data and the threshold).
    scenes = PlantedScenes(N).get_batch(np.arange(N))["image"]
    act = scenes[..., 4].reshape(N, 8, 4, 8, 4).mean((2, 4)).reshape(-1)
    noise = act > runs["full"][0]["combo"].thresholds[2]
    f = _eval(units[2]["formula"], concepts)
    assert units[2]["formula_iou"] == pytest.approx((f & noise).sum() / (f | noise).sum(), abs=1e-9)


def test_length_one_formula_is_the_label(runs):
    _, out = runs["one"]
    for u in combo_report(out):
        assert u["formula"] == u["label"] and u["formula_iou"] == pytest.approx(u["iou"], abs=1e-6)
        assert "p_value" not in u


def test_default_path_unchanged_and_cache_independent(runs):
    (_, plain_out), (_, full_out) = runs["plain"], runs["full"]
    a = np.load(os.path.join(plain_out, "combo", "arrays.npz"))
    b = np.load(os.path.join(full_out, "combo", "arrays.npz"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    base = combo_report(plain_out)
    assert all(set(u) == {"image", "unit", "label", "cat", "iou"} for u in base)
    assert [{k: u[k] for k in base[0]} for u in combo_report(full_out)] == base
    assert "significant" not in open(os.path.join(plain_out, "summary.csv")).readline()
    assert combo_report(runs["nocache"][1]) == combo_report(full_out)          # masks from the cache or the model alike


def test_rerun_loads_explanations_and_bad_settings(runs, tmp_path):
    _, out = runs["full"]
    before = combo_report(out)
    run_combo(Path(out).parent, "full", formulas=3, significance=True, permutations=PERMS)  # finished: loaded
    assert combo_report(out) == before
    with pytest.raises(DissectError, match="exact_formulas needs formulas"):
        run_combo(tmp_path, "bad", exact_formulas=True)
    with pytest.raises(DissectError, match="other settings"):
        run_combo(Path(out).parent, "full", formulas=2, significance=True, permutations=PERMS)


def test_html_columns_sorting_and_significance_filter(runs):
    _, out = runs["full"]
    page = os.path.join(out, "index.html")
    text = open(page, encoding="utf-8").read()
    assert "<th>formula</th>" in text and "<th>p-value</th>" in text and 'value="p_value"' in text
    assert "significant at q = 0.05" in text
    if shot.browser() is None:
        pytest.skip("chromium not installed")
    dom = shot.dump_dom(Path(page).resolve().as_uri() + "#sort=p_value&significant=1")
    rows = re.findall(r'data-unit="(\d)"[^>]*>(.*?)</tr>', dom)
    # Noise unit 2 filtered out; equal p-values, so the higher label IoU (unit 1, wood: 1.0) first.
    assert [u for u, _ in rows] == ["1", "0"]
    row0 = dict(rows)["0"]
    assert 'class="formula">(' in row0 and "OR" in row0
    assert 'class="num p-value">0.0050</td>' in row0
    everything = shot.dump_dom(Path(page).resolve().as_uri() + "#sort=unit")
    assert re.findall(r'data-unit="(\d)"', everything) == ["0", "1", "2"]


def test_html_escapes_formula_text(tmp_path):
    from jaxdissect.reports import html

    units = [{"unit": 0, "label": "a", "cat": "object", "iou": 0.5, "formula": "(<b>x</b> OR y)",
              "formula_iou": 0.6, "p_value": 0.01, "q_value": 0.02, "significant": True, "iou_ci": [0.4, 0.6]}]
    page = html.write_run_report(str(tmp_path), "r", [{"name": "l", "units": units}])
    text = open(page, encoding="utf-8").read()
    assert "<b>x</b>" not in text and "\\u003cb\\u003ex" in text
    if shot.browser() is not None:
        dom = shot.dump_dom(page)
        assert '<td class="formula">(&lt;b&gt;x&lt;/b&gt; OR y)</td>' in dom


@pytest.mark.slow
def test_launcher_formulas_and_significance(tmp_path):
    """``launch.dissect --formulas=2 --significance`` on a random-weight CNN and the synthetic scenes' labels."""
    from jaxdissect.checkpoint import save_model
    from jaxdissect.models.small_cnn import SmallCNN
    from launch import dissect as launcher
    from helpers import launcher_config, numpy_init

    module = SmallCNN(widths=(8, 16, 16, 16))
    model = str(tmp_path / "tiny_cnn")
    save_model(model, module, numpy_init(module, (1, 64, 64, 3)), metadata={"model": "tiny_cnn", "preprocessing": {
        "normalization": "zc", "resize": 64, "crop": 64}})
    out = str(tmp_path / "out")
    launcher.run(launcher_config(model=model, data="synthetic:16", layers="conv2", batch_size=8, topk=3, thumbsize=16,
                         output_dir=out, formulas=2, significance=True, permutations=40))
    units = json.load(open(os.path.join(out, "conv2", "report.json")))["units"]
    assert len(units) == 16
    for u in units:
        assert {"formula", "formula_iou", "p_value", "q_value", "significant", "iou_ci"} <= set(u)
        assert u["formula_iou"] >= u["iou"] - 1e-6 and 1 / 41 <= u["p_value"] <= 1


def test_launcher_flags(tmp_path):
    from launch import dissect as launcher
    from launch.common import LaunchError

    with pytest.raises(LaunchError, match="exact_formulas needs --formulas"):
        launcher.validate({"exact_formulas": True})
    with pytest.raises(LaunchError, match="permutations"):
        launcher.validate({"significance": True, "permutations": 0})
