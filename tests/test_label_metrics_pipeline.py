"""dissect(label_metrics=True) against NumPy metrics computed from the model's activations and the labels.

A hand-built model whose units are planted detectors (one equal to a concept's
0/1 indicator) on scenes where labels are present in some images only, with a
second (part) label channel, an image-level scene label and an unreadable
image. The reference recomputes every metric in float64 NumPy from
``jaxdissect.capture`` of the model, the upsampling of
``jaxdissect.kernels.upsample`` (tested against NumPy in test_kernels_misc)
and the data source's labels.
"""

import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect.pipelines.dissect import dissect

SIZE, CELL, G = 32, 4, 8      # 32x32 images, labels on 4x4 cells -> 8x8 segmentation
LABELS = ["-", "disc", "window", "wood", "knob", "kitchen"]
CATS = ["-", "object", "object", "material", "part", "scene"]
N, BATCH, BAD = 12, 4, 5      # 12 images in 3 batches; image 5 cannot be read
METRICS = ("iou", "f1", "auprc", "pearson", "cosine")


class Pool(nn.Module):
    size: int

    @nn.compact
    def __call__(self, x):
        return nn.avg_pool(x, (self.size, self.size), strides=(self.size, self.size))


class Planted(nn.Module):
    """``det`` (8x8, the segmentation grid) unit c = input channel c; ``coarse`` = ``det`` pooled to 4x4."""

    @nn.compact
    def __call__(self, x):
        det = Pool(CELL, name="det")(x)
        coarse = Pool(2, name="coarse")(det)
        return nn.Dense(2, name="fc")(coarse.mean((1, 2)))


class Scenes:
    """Channel 0: disc at a random intensity; 1: window; 2: the knob part (second seg channel); 3: the
    kitchen scene (image label) as a bright wash; 4: noise; 5: exactly the disc indicator (0/1)."""

    label_names, label_categories = LABELS, CATS
    categories = ("object", "part", "material", "scene")

    def __init__(self, n=N, fail_after=None):
        self.n, self.name, self.fail_after, self.calls = n, "scenes", fail_after, 0

    def __len__(self):
        return self.n

    def fingerprint(self):
        return {"kind": "label-metrics-scenes", "n": self.n}

    def get_batch(self, indices):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed")
        images, displays, segs, scene = [], [], [], []
        for i in indices:
            rng = np.random.default_rng([7, int(i)])
            present = rng.random(3) < 0.6
            cells = np.where(rng.random((G, G)) < 0.3, rng.choice([1, 2, 3], (G, G)), 0)
            cells = np.where(np.isin(cells, np.flatnonzero(present) + 1), cells, 0)
            part = np.where((cells == 2) & (rng.random((G, G)) < 0.5), 4, 0)
            kitchen = rng.random() < 0.5
            x = np.zeros((G, G, 6), np.float32)
            x[..., 0] = np.where(cells == 1, rng.uniform(0.5, 1.0, (G, G)), 0)
            x[..., 1] = np.where(cells == 2, rng.uniform(0.5, 1.0, (G, G)), 0)
            x[..., 2] = (part == 4) * 0.9
            x[..., 3] = (0.8 if kitchen else 0.1) + 0.1 * rng.random((G, G))
            x[..., 5] = cells == 1
            x = x.repeat(CELL, 0).repeat(CELL, 1)
            x[..., 4] = rng.uniform(0, 1, (SIZE, SIZE))
            images.append(x)
            displays.append((x[..., :3] * 255).astype(np.uint8))
            segs.append(np.stack([cells, part]).astype(np.int32))
            scene.append([5 if kitchen else -1])
        return {"image": np.stack(images), "display": np.stack(displays), "seg": np.stack(segs),
                "image_labels": np.asarray(scene, np.int32), "valid": np.asarray([i != BAD for i in indices])}


@pytest.fixture(scope="module")
def model():
    module = Planted()
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 6)))
    rng = np.random.default_rng(0)
    return module, jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def _run(model, out, **kw):
    module, variables = model
    kw = {"label_metrics": True, "data": Scenes(), "progress": False, "checkpoint_every": 50, **kw}
    return dissect(module, variables, ["det", "coarse"], kw.pop("data"), "dataset", quantile=0.3, topk=4,
                   thumbsize=16, batch_size=BATCH, output_dir=str(out), **kw)


def _metrics(out, layer):
    with open(os.path.join(out, layer, "report.json")) as f:
        return [u["metrics"] for u in json.load(f)["units"]]


@pytest.fixture(scope="module")
def cached_run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cached")
    return str(out), _run(model, out)


def _np_ap(score, y):
    """Average precision, one step per distinct score (ties as one step), by explicit thresholds."""
    ap, prev = 0.0, 0.0
    for t in np.unique(score)[::-1]:
        sel = score >= t
        tp = (sel & y).sum()
        ap += (tp / y.sum() - prev) * tp / sel.sum()
        prev = tp / y.sum()
    return ap


def _reference(model, results, layer):
    """Every metric per unit in float64 NumPy: (pixel {name: [U]}, image {name: [U]})."""
    from jaxdissect import capture
    from jaxdissect.kernels.upsample import upsample

    module, variables = model
    batch = Scenes().get_batch(range(N))
    keep = batch["valid"]
    _, acts = capture(module, variables, jnp.asarray(batch["image"]), layers=[layer])
    raw = np.asarray(acts[layer], np.float64)[keep]
    up = np.asarray(upsample(acts[layer], (G, G), "original"), np.float64)[keep]   # [n, G, G, U]
    seg, scene = batch["seg"][keep], batch["image_labels"][keep]
    r = results[layer]
    pixel = {m: [] for m in METRICS}
    image = {m: [] for m in METRICS}
    for u, label in enumerate(r.label):
        concept = (seg == label).any(1) | (scene == label).any(1)[:, None, None]          # [n, G, G]
        for level, a, c in (("pixel", up[..., u].ravel(), concept.ravel()),
                            ("image", raw[..., u].max((1, 2)), concept.any((1, 2)))):
            act = a > r.thresholds[u]
            inter = (act & c).sum()
            got = pixel if level == "pixel" else image
            got["iou"].append(inter / (act | c).sum())
            got["f1"].append(2 * inter / (act.sum() + c.sum()))
            got["auprc"].append(_np_ap(a, c))
            got["pearson"].append(np.corrcoef(a, c)[0, 1] if a.std() > 0 and c.std() > 0 else 0.0)
            got["cosine"].append(a @ c / np.sqrt((a @ a) * c.sum()))
    return pixel, image


@pytest.mark.parametrize("layer", ["det", "coarse"])
def test_metrics_equal_numpy_reference(model, cached_run, layer):
    """IoU/F1 exact, r/cos to 1e-6, image level exact, pixel AUPRC within its reported bounds of the exact AP."""
    out, results = cached_run
    got = _metrics(out, layer)
    pixel, image = _reference(model, results, layer)
    assert all(label > 0 for label in results[layer].label)
    for u, entry in enumerate(got):
        for m in ("iou", "f1"):
            assert entry["pixel"][m] == pytest.approx(pixel[m][u], rel=1e-12, abs=1e-12), (u, m)
        for m in ("pearson", "cosine"):
            assert entry["pixel"][m] == pytest.approx(pixel[m][u], abs=1e-6), (u, m)
        for m in METRICS:
            assert entry["image"][m] == pytest.approx(image[m][u], rel=1e-9, abs=1e-9), (u, m)
        lower, upper = entry["pixel"]["auprc_bounds"]
        exact = pixel["auprc"][u]
        # The stated tolerance: the bounds from the 2048-bin histogram contain the exact AP.
        assert lower - 1e-12 <= exact <= upper + 1e-12, (u, lower, exact, upper)
        assert lower <= entry["pixel"]["auprc"] <= upper
        assert abs(entry["pixel"]["auprc"] - exact) <= 0.01, (u, entry["pixel"]["auprc"], exact)
    # The pixel counts are pass 3's: IoU equals the dissection's IoU of the label.
    np.testing.assert_allclose([e["pixel"]["iou"] for e in got], results[layer].label_iou, rtol=1e-12)


def test_unit_equal_to_its_concept_scores_the_maximum(cached_run):
    """Unit 5 of det is exactly the disc indicator: 1 on every metric at both levels."""
    out, results = cached_run
    assert results["det"].label[5] == LABELS.index("disc")
    entry = _metrics(out, "det")[5]
    for level in ("pixel", "image"):
        for m in METRICS:
            assert entry[level][m] == pytest.approx(1.0, abs=1e-6), (level, m)
    assert entry["pixel"]["auprc_bounds"] == [1.0, 1.0]
    # The noise unit scores far lower; the scene unit is judged by its image-level label.
    noise = _metrics(out, "det")[4]
    assert noise["pixel"]["pearson"] < 0.5 and noise["pixel"]["auprc"] < 0.9
    assert results["det"].label[3] == LABELS.index("kitchen")
    assert _metrics(out, "det")[3]["image"]["auprc"] == pytest.approx(1.0)


def test_summary_page_and_settings(cached_run):
    out, _ = cached_run
    with open(os.path.join(out, "summary.json")) as f:
        rows = json.load(f)["layers"]
    for row in rows:
        ours = _metrics(out, row["layer"])
        for level in ("pixel", "image"):
            for m in METRICS:
                assert row[f"median_{level}_{m}"] == pytest.approx(
                    np.median([e[level][m] for e in ours]), abs=1e-4)
    with open(os.path.join(out, "summary.csv")) as f:
        assert "median_pixel_auprc" in f.readline()
    with open(os.path.join(out, "index.html")) as f:
        page = f.read()
    assert "pixel AUPRC" in page and '"metric_keys": ["m_pixel_iou"' in page
    assert '<h2>det</h2>' in page and '<h2>coarse</h2>' in page
    assert "recall not reported: fails the extra-labels check" in page
    assert "2048 equal bins" in page


def test_cache_path_decodes_nothing_and_runs_no_model(model, cached_run, tmp_path, monkeypatch, caplog):
    """With the activation cache the metrics pass reads no data and runs no model (the same calls as without
    the pass)."""
    import jaxdissect.pipelines.dissect as pipeline

    out, _ = cached_run
    calls = []
    real = pipeline.ModelBatches.forward_fn

    def forward_fn(self, codes=False):
        fn = real(self, codes)
        return lambda variables, x: (calls.append(1), fn(variables, x))[1]

    monkeypatch.setattr(pipeline.ModelBatches, "forward_fn", forward_fn)
    with_metrics, without = Scenes(), Scenes()
    with caplog.at_level(logging.INFO):
        _run(model, tmp_path / "a", data=with_metrics, progress=True)
    assert "metrics: reading the activation cache" in caplog.text
    model_calls = len(calls)
    _run(model, tmp_path / "b", data=without, label_metrics=False)
    assert with_metrics.calls == without.calls and model_calls == len(calls) - model_calls
    for layer in ("det", "coarse"):
        assert _metrics(str(tmp_path / "a"), layer) == _metrics(out, layer)


def test_recompute_path_killed_in_the_metrics_pass_resumes_with_identical_numbers(model, cached_run, tmp_path,
                                                                                  caplog):
    """Without the cache (every pass reads the data and runs the model), a run killed after one batch of the
    metrics pass resumes from its checkpoint; its numbers equal the cached run's, bit for bit."""
    out, _ = cached_run
    # No cache: 1 probe + 3 batches in each of passes 1-3, then the metrics pass dies after its first batch.
    with pytest.raises(RuntimeError, match="killed"):
        _run(model, tmp_path, data=Scenes(fail_after=1 + 3 * 3 + 1), activation_cache_mb=0, checkpoint_every=1)
    checkpoints = tmp_path / "work" / "metrics" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["1"]
    with caplog.at_level(logging.INFO):
        _run(model, tmp_path, data=Scenes(), activation_cache_mb=0, checkpoint_every=1)
    assert "dissect metrics: resuming at batch 1 of 3" in caplog.text
    assert max(os.listdir(checkpoints), key=int) == "3"
    for layer in ("det", "coarse"):
        assert _metrics(str(tmp_path), layer) == _metrics(out, layer)


@pytest.mark.parametrize("bins", [2, 64, 1024])
def test_binned_average_precision_bounds_hold_the_exact_value(bins):
    """On ReLU-like scores with ties, the histogram's bounds contain the exact AP at any bin count."""
    from jaxdissect.explain.unit_metrics import binned_average_precision

    rng = np.random.default_rng(bins)
    y = rng.random((3000, 3)) < 0.1
    s = np.maximum(rng.standard_normal((3000, 3)) + 1.5 * y, 0)
    s[:, 1] = np.round(s[:, 1], 1)
    s[:, 2] -= 1.0                                                  # negative values too
    m = np.abs(s).max(0)
    index = np.clip(np.floor((s / m + 1) * bins), 0, 2 * bins - 1).astype(int)
    neg, pos = np.zeros((3, 2 * bins)), np.zeros((3, 2 * bins))
    for u in range(3):
        np.add.at(neg[u], index[~y[:, u], u], 1)
        np.add.at(pos[u], index[y[:, u], u], 1)
    ap, lower, upper = binned_average_precision(neg, pos)
    for u in range(3):
        exact = _np_ap(s[:, u], y[:, u])
        assert lower[u] - 1e-12 <= exact <= upper[u] + 1e-12
        assert lower[u] <= ap[u] <= upper[u]
        if bins == 1024:
            assert abs(ap[u] - exact) < 0.01


def test_launcher_switches_label_metrics_on_with_significance():
    from launch.dissect import dissect_config

    def label_metrics_on(options):
        return dissect_config(options).label_metrics

    assert label_metrics_on({"label_metrics": True}) and label_metrics_on({"significance": True})
    assert not label_metrics_on({"formulas": 3})
