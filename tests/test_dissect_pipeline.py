"""End-to-end dissection of a hand-built model whose units are known detectors (planted ground truth)."""

import json
import os
import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect.pipelines.dissect import DissectError, dissect

SIZE, CELL = 32, 4           # 32x32 images, labels constant on 4x4 cells -> 8x8 segmentation
LABELS = ["-", "disc", "window", "wood", "sky"]
CATS = ["-", "object", "part", "material", "object"]
# Layer "det" unit u fires exactly where label DET[u] is drawn; unit 4 is noise.
DET = [1, 2, 3, 4]
# Layer "mix" permutes "det": unit j of mix is unit MIX[j] of det (4 = the noise unit).
MIX = (3, 4, 0, 2, 1)


class Pool(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.avg_pool(x, (CELL, CELL), strides=(CELL, CELL))


class Permute(nn.Module):
    order: tuple

    @nn.compact
    def __call__(self, x):
        return 2.0 * x[..., jnp.array(self.order)]


class Planted(nn.Module):
    """Input channel c (c < 4) holds the intensity of label c + 1; channel 4 is noise."""

    @nn.compact
    def __call__(self, x):
        det = Pool(name="det")(x)
        mix = Permute(MIX, name="mix")(det)
        return nn.Dense(3, name="fc")(mix.mean((1, 2)))


class PlantedScenes:
    """Cells carry label 1..4 (about 8% of cells each) at a random intensity in [0.5, 1]."""

    label_names = LABELS
    label_categories = CATS
    categories = ["object", "part", "material"]

    def __init__(self, n, seed=0):
        self.n, self.seed, self.name = n, seed, "planted"

    def __len__(self):
        return self.n

    def fingerprint(self):
        return {"kind": "planted", "n": self.n, "seed": self.seed}

    def get_batch(self, indices):
        g = SIZE // CELL
        images, displays, segs = [], [], []
        for i in indices:
            rng = np.random.default_rng([self.seed, int(i)])
            cells = rng.choice(5, size=(g, g), p=[0.68, 0.08, 0.08, 0.08, 0.08])
            intensity = rng.uniform(0.5, 1.0, (g, g))
            x = np.zeros((g, g, 5), np.float32)
            for c in range(1, 5):
                x[..., c - 1] = np.where(cells == c, intensity, 0)
            x = x.repeat(CELL, 0).repeat(CELL, 1)
            x[..., 4] = rng.uniform(0, 1, (SIZE, SIZE))
            images.append(x)
            displays.append((x[..., :3] * 255).astype(np.uint8))
            segs.append(cells[None].astype(np.int32))
        return {"image": np.stack(images), "display": np.stack(displays), "seg": np.stack(segs),
                "valid": np.ones(len(indices), bool)}


@pytest.fixture(scope="module")
def model():
    import jax

    module = Planted()
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 5)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    return module, variables


@pytest.fixture(scope="module")
def planted_run(model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("planted"))
    module, variables = model
    results = dissect(module, variables, ["det", "mix"], PlantedScenes(40), "dataset", quantile=0.2,
                      topk=10, thumbsize=24, batch_size=8, output_dir=out, checkpoint_every=2)
    return out, results


def _expected(layer):
    det = {u: LABELS[DET[u]] for u in range(4)}
    if layer == "det":
        return det
    return {j: det[src] for j, src in enumerate(MIX) if src < 4}


@pytest.mark.parametrize("layer", ["det", "mix"])
def test_planted_units_labelled_in_report_json(planted_run, layer):
    out, results = planted_run
    report = json.load(open(os.path.join(out, layer, "report.json")))
    units = {u["unit"]: u for u in report["units"]}
    assert len(units) == 5
    for unit, label in _expected(layer).items():
        assert units[unit]["label"] == label
        assert units[unit]["cat"] == CATS[LABELS.index(label)]
        assert units[unit]["iou"] == pytest.approx(1.0)
        assert os.path.exists(os.path.join(out, layer, units[unit]["image"]))
    noise = [u for u in units if u not in _expected(layer)][0]
    assert units[noise]["iou"] < 0.5
    assert report["header"]["image"] == "concepts_99.svg"
    assert os.path.exists(os.path.join(out, layer, "concepts_99.svg"))
    arrays = np.load(os.path.join(out, layer, "arrays.npz"))
    assert arrays["iou"].shape == (5, len(LABELS))
    assert arrays["top_index"].shape == (5, 10)


def test_planted_units_labelled_in_index_html(planted_run):
    out, _ = planted_run
    page = open(os.path.join(out, "index.html")).read()
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>',
                                page, re.S).group(1))
    layers = {layer["name"]: {u["unit"]: u["label"] for u in layer["units"]} for layer in data["layers"]}
    for layer in ("det", "mix"):
        for unit, label in _expected(layer).items():
            assert layers[layer][unit] == label


def test_thresholds_and_topk_match_numpy(planted_run):
    """Thresholds equal numpy.quantile of the activations; top-k images equal an argsort."""
    _, results = planted_run
    batch = PlantedScenes(40).get_batch(range(40))
    x = batch["image"]
    det = x.reshape(40, 8, CELL, 8, CELL, 5).mean((2, 4))                      # [N, 8, 8, 5]
    level = np.quantile(det.reshape(-1, 5), 0.8, axis=0)
    np.testing.assert_allclose(results["det"].thresholds, level, rtol=1e-6, atol=1e-7)
    per_image = det.max((1, 2))                                                  # [N, 5]
    for u in range(5):
        ref = np.lexsort((np.arange(40), -per_image[:, u]))[:10]
        np.testing.assert_array_equal(results["det"].top_index[u], ref)


def test_finished_run_is_not_recomputed(model, planted_run, monkeypatch):
    out, results = planted_run
    module, variables = model
    import jaxdissect.pipelines.dissect as pipeline

    def fail(*args, **kwargs):
        raise AssertionError("a finished dissection ran a pass again")

    monkeypatch.setattr(pipeline._Run, "run_pass", fail)
    again = dissect(module, variables, ["det", "mix"], PlantedScenes(40), "dataset", quantile=0.2,
                    topk=10, thumbsize=24, batch_size=8, output_dir=out, checkpoint_every=2)
    np.testing.assert_array_equal(again["mix"].iou, results["mix"].iou)
    with pytest.raises(DissectError, match="other settings"):
        dissect(module, variables, ["det", "mix"], PlantedScenes(40), "dataset", quantile=0.1,
                topk=10, thumbsize=24, batch_size=8, output_dir=out)


def test_bad_inputs(model):
    module, variables = model
    data = PlantedScenes(8)
    with pytest.raises(DissectError, match=r"unknown layer 'dett'.*det, mix"):
        dissect(module, variables, ["dett"], data, "dataset", quantile=0.2)
    with pytest.raises(DissectError, match="fc.*do not output"):
        dissect(module, variables, ["fc"], data, "dataset", quantile=0.2)
    with pytest.raises(DissectError, match=r"resolution \(16, 16\).*8x8"):
        dissect(module, variables, ["det"], data, "dataset", quantile=0.2, resolution=(16, 16))
