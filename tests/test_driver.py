"""The pass driver's strategy interface: a new scoring method (docs/architecture.md's example, run as written),
a pass-1 tap with a host fold (the open-vocabulary shape: per-image pooled units and a device function on the
display images) and a run without concept labels, on the planted model of test_dissect_pipeline."""

import dataclasses
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect.driver import Strategy, Tap
from jaxdissect.pipelines.dissect import dissect
from helpers import CELL, DET, Planted, PlantedScenes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 24
KW = dict(quantile=0.2, topk=5, thumbsize=16, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def model():
    import jax

    module = Planted()
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 5)))
    rng = np.random.default_rng(0)
    return module, jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def _docs_example():
    """The first Python block of docs/architecture.md, executed: it defines DiceScoring."""
    text = open(os.path.join(REPO, "docs", "architecture.md")).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/architecture.md", "exec"), scope)
    return scope["DiceScoring"]


@pytest.mark.slow
def test_docs_scoring_example_plugs_in(model):
    """Dice from the same counts is 2 IoU / (1 + IoU) for every unit and label (closed form), the planted
    units keep their labels, and the labels reach report-free results unchanged otherwise."""
    dice_scoring = _docs_example()
    iou = dissect(*model, ["det"], PlantedScenes(N), "dataset", **KW)["det"]
    dice = dissect(*model, ["det"], PlantedScenes(N), "dataset", strategies=[dice_scoring()], **KW)["det"]
    ref = 2 * iou.iou / (1 + iou.iou)
    ref[:, 0] = 0
    np.testing.assert_allclose(dice.iou, ref, rtol=1e-12)
    assert dice.label[:4].tolist() == DET and dice.config["scoring"] == "dice"
    np.testing.assert_array_equal(dice.thresholds, iou.thresholds)
    np.testing.assert_array_equal(dice.intersection, iou.intersection)


@dataclasses.dataclass(frozen=True)
class _Pool:
    """Per image: each view's spatial mean per unit, and the display image's mean brightness."""

    views: tuple

    def __call__(self, state, params, acts, batch):
        return state, {"pooled": {v: acts[v].mean((1, 2)) for v in self.views},
                       "bright": jnp.asarray(batch["display"], jnp.float32).mean((1, 2, 3)) * params["scale"]}


@dataclasses.dataclass(frozen=True)
class PooledUnits(Strategy):
    """A pass-1 tap folding per-image outputs into host arrays indexed by image, as open-vocabulary scoring will."""

    name = "pooled"

    def tap(self, pass_name, driver):
        if pass_name != "pass1":
            return None
        n = driver.num_images

        def fold(host, out, batch):
            rows = batch["index"][batch["valid"]]
            host = dict(host, pooled=dict(host["pooled"]))
            for v in host["pooled"]:
                host["pooled"][v] = host["pooled"][v].copy()
                host["pooled"][v][rows] = out["pooled"][v][batch["valid"]]
            host["bright"] = host["bright"].copy()
            host["bright"][rows] = out["bright"][batch["valid"]]
            return host

        return Tap(update=_Pool(tuple(driver.views)), params={"scale": np.float32(1 / 255)}, keys=("display",),
                   host_init={"pooled": {v: np.zeros((n, p.num_units), np.float32) for v, p in driver.plans.items()},
                              "bright": np.zeros(n, np.float32)},
                   fold=fold)

    def finish(self, driver, taps):
        _, host = taps["pass1"]
        return {v: {"pooled": host["pooled"][v].tolist(), "bright": host["bright"].tolist()} for v in driver.views}

    def unit_fields(self, view, found):
        return [{"mean_pooled": float(np.mean(col))} for col in np.asarray(found["pooled"]).T]

    def settings(self):
        return {"pooled": "spatial mean per unit and image"}


@pytest.mark.slow
@pytest.mark.parametrize("cache_mb", [1024, 0])
def test_pass1_tap_folds_per_image_outputs(model, tmp_path, cache_mb, monkeypatch):
    """The tap's host arrays equal NumPy's per-image means, with or without the activation cache; they reach
    report.json and index.html, and a finished run reloads them instead of running a pass."""
    from jaxdissect.driver import Driver

    batch = PlantedScenes(N).get_batch(range(N))
    det = batch["image"].reshape(N, 8, CELL, 8, CELL, 5).mean((2, 4))          # the det layer, in NumPy
    out = str(tmp_path / "out")
    dissect(*model, ["det"], PlantedScenes(N), "dataset", output_dir=out, strategies=[PooledUnits()],
            activation_cache_mb=cache_mb, **KW)
    found = json.load(open(os.path.join(out, "work", "results", "pooled-det.json")))
    np.testing.assert_allclose(found["pooled"], det.mean((1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(found["bright"], batch["display"].mean((1, 2, 3)) / 255, rtol=1e-5)
    units = json.load(open(os.path.join(out, "det", "report.json")))["units"]
    np.testing.assert_allclose([u["mean_pooled"] for u in units], det.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    assert "spatial mean per unit and image" in open(os.path.join(out, "index.html")).read()

    def fail(*args, **kwargs):
        raise AssertionError("a finished dissection ran a pass again")

    monkeypatch.setattr(Driver, "run_pass", fail)
    dissect(*model, ["det"], PlantedScenes(N), "dataset", output_dir=out, strategies=[PooledUnits()],
            activation_cache_mb=cache_mb, **KW)


@pytest.mark.slow
def test_no_labels(model, tmp_path):
    """segmentation=None: the passes run with no concept labels; every unit's label is 0 ('-')."""
    r = dissect(*model, ["det"], PlantedScenes(N), None, output_dir=str(tmp_path), **KW)["det"]
    units = json.load(open(tmp_path / "det" / "report.json"))["units"]
    assert [u["label"] for u in units] == ["-"] * 5 and (tmp_path / "index.html").exists()
    assert r.label_names == ["-"] and r.iou.shape == (5, 1) and not r.label.any() and not r.interpretable.any()
    np.testing.assert_array_equal(r.thresholds, dissect(*model, ["det"], PlantedScenes(N), "dataset",
                                                        **KW)["det"].thresholds)
