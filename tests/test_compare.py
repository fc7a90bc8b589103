"""Comparisons (launch.compare): several members and rotation powers in one run equal separate runs;
tables, figures and the escaped summary page; bad member/layer lists."""

import csv
import json
import os

import numpy as np
import pytest

import jaxdissect
from jaxdissect.data import broden
from jaxdissect.pipelines import compare as C
from jaxdissect.rotation import random_rotation_powers
from helpers import ND2017_CATS as CATS
from helpers import Tiny, write_planted_broden


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("broden_cmp"))
    write_planted_broden(root)
    return root


def _params(seed):
    rng = np.random.default_rng(seed)
    return {"params": {"proj": {"kernel": rng.standard_normal((3, 6)).astype(np.float32),
                                "bias": (0.1 * rng.standard_normal(6)).astype(np.float32)}}}


@pytest.mark.slow
def test_members_and_rotations_share_one_run(folder, tmp_path):
    data = broden.BrodenSource(folder)
    members = [C.Member(name=f"snap{i}", module=Tiny(), variables=_params(i), layers=["proj"], iteration=it)
               for i, it in enumerate((10, 100, 1000))]
    out = str(tmp_path / "cmp")
    got = C.compare(members, data, rotations=[0.0, 0.5, 1.0], quantile=0.1, batch_size=4, topk=3,
                    thumbsize=16, output_dir=out, progress=False, title="snapshots <b>&</b>")
    assert len(got["rows"]) == 9 and got["categories"] == CATS
    # The shared run equals a separate dissection of one member, rotated by the same matrix.
    q = random_rotation_powers(6, [1.0], 1)[0]
    alone = jaxdissect.dissect(Tiny(), _params(1), [], data, "dataset", method="netdissect2017", quantile=0.1,
                               topk=3, batch_size=4, progress=False, views={"proj": ("proj", q)})["proj"]
    shared = got["results"]["snap1.proj@1"]
    np.testing.assert_allclose(shared.thresholds, alone.thresholds, rtol=1e-6)
    np.testing.assert_array_equal(shared.intersection, alone.intersection)
    np.testing.assert_array_equal(shared.category_active, alone.category_active)
    np.testing.assert_array_equal(shared.iou, alone.iou)
    plain = jaxdissect.dissect(Tiny(), _params(1), ["proj"], data, "dataset", method="netdissect2017",
                               quantile=0.1, topk=3, batch_size=4, progress=False)["proj"]
    np.testing.assert_array_equal(got["results"]["snap1.proj@0"].iou, plain.iou)
    # Every number in the CSV and the JSON, from the per-view results.
    rows = list(csv.DictReader(open(os.path.join(out, "compare.csv"))))
    table = json.load(open(os.path.join(out, "compare.json")))
    assert len(rows) == 9 and table["rows"] == got["rows"]
    for row in rows:
        counts = C.layer_counts(got["results"][row["name"]], 0.04)
        assert int(row["unique"]) == counts["per_category"]["unique"]
        assert int(row["unique_top"]) == counts["top"]["unique"]
        assert sum(int(row[f"unique_{c}"]) for c in CATS) == int(row["unique"])
    assert {r["iteration"] for r in table["rows"]} == {10, 100, 1000}
    for svg in ("unique_per_network.svg", "unique_over_iterations.svg", "unique_over_rotation.svg"):
        assert open(os.path.join(out, svg)).read().lstrip().startswith("<?xml")
    page = open(os.path.join(out, "index.html")).read()
    assert "snapshots &lt;b&gt;&amp;&lt;/b&gt;" in page and "<b>&</b>" not in page
    assert os.path.exists(os.path.join(out, "dissection", "index.html"))


def test_bad_member_lists(folder):
    data = broden.BrodenSource(folder)
    with pytest.raises(C.CompareError, match=r"model b has no dissectable layer 'prj' \(did you mean proj\?\)"):
        C.compare([C.Member("a", Tiny(), _params(0), ["proj"]), C.Member("b", Tiny(), _params(1), ["prj"])], data,
                  progress=False)
    with pytest.raises(C.CompareError, match="used twice"):
        C.compare([C.Member("a", Tiny(), _params(0), ["proj"])] * 2, data, progress=False)
    with pytest.raises(C.CompareError, match="alpha >= 0"):
        C.compare([C.Member("a", Tiny(), _params(0), ["proj"])], data, rotations=[-1], progress=False)


@pytest.mark.slow
def test_launcher(folder, tmp_path):
    from jaxdissect.checkpoint import save_model
    from jaxdissect.models.small_cnn import SmallCNN
    from launch import compare as launcher
    from helpers import numpy_init

    dirs = []
    for i in range(2):
        module = SmallCNN(widths=(8, 8, 8, 8))
        d = str(tmp_path / f"net{i}")
        save_model(d, module, numpy_init(module, (1, 16, 16, 3), seed=i), metadata={"model": f"net{i}", "preprocessing": {"normalization": "imagenet",
                                                                       "resize": 16, "crop": 16}})
        dirs.append(d)
    base = dict(models=",".join(dirs), data=f"broden:{folder}", layers="conv1;conv2", batch_size=4,
                num_images=4, output_dir=str(tmp_path / "out"))
    with pytest.raises(launcher.LaunchError, match="3 ';'-separated layer lists for 2 models"):
        launcher.build({**base, "layers": "conv1;conv2;conv3"})
    with pytest.raises(launcher.LaunchError, match="unknown layer 'conv9'"):
        launcher.build({**base, "layers": "conv1;conv9"})
    with pytest.raises(launcher.LaunchError, match="1 names for 2 models"):
        launcher.build({**base, "names": "x"})
    with pytest.raises(broden.BrodenError, match="index.csv is missing"):
        launcher.build({**base, "data": f"broden:{tmp_path}"})
    out, output_dir = launcher.run(base)
    assert [(r["model"], r["layer"]) for r in out["rows"]] == [("net0", "conv1"), ("net1", "conv2")]
    assert os.path.exists(os.path.join(output_dir, "unique_per_network.svg"))
