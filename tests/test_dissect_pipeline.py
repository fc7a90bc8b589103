"""End-to-end dissection of a hand-built model whose units are known detectors (planted ground truth)."""

import json
import os
import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import CELL, DET, MIX, SIZE, Planted, PlantedScenes, Pool
from helpers import PLANTED_CATS as CATS
from helpers import PLANTED_LABELS as LABELS
from jaxdissect.pipelines.dissect import DissectError, dissect


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
    from jaxdissect.driver import Driver

    def fail(*args, **kwargs):
        raise AssertionError("a finished dissection ran a pass again")

    monkeypatch.setattr(Driver, "run_pass", fail)
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
    assert dissect(module, variables, ["fc"], data, "dataset", quantile=0.2)["fc"].config["image_level"]  # [N, U]
    with pytest.raises(DissectError, match=r"resolution \(16, 16\).*8x8"):
        dissect(module, variables, ["det"], data, "dataset", quantile=0.2, resolution=(16, 16))


class PoolNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="fc")(Pool(name="det")(x).mean((1, 2)))


class LabelledFolder:
    """An image folder plus a segmentation computed from its pixels: label 1 where red dominates."""

    label_names, label_categories, categories = ["-", "red"], ["-", "color"], ["color"]

    def __init__(self, folder):
        self.folder, self.name = folder, "folder"

    def __len__(self):
        return len(self.folder)

    def fingerprint(self):
        return self.folder.fingerprint()

    def get_batch(self, indices):
        batch = dict(self.folder.get_batch(indices))
        d = batch["display"].astype(np.int32)
        red = (d[..., 0] > d[..., 1] + 60).reshape(len(indices), 8, CELL, 8, CELL).mean((2, 4)) > 0.5
        batch["seg"] = red[:, None].astype(np.int32)
        return batch


def _folder_transform(image):
    d = np.asarray(image.resize((SIZE, SIZE)), np.uint8)
    return d.astype(np.float32) / 255.0, d


def _write_images(root, n):
    from PIL import Image

    root.mkdir()
    for i in range(n):
        rng = np.random.default_rng(i)
        cells = rng.random((8, 8)) < 0.15
        img = np.full((8, 8, 3), 40, np.uint8)
        img[cells] = (230, 30, 30)
        img = img.repeat(CELL, 0).repeat(CELL, 1) + rng.integers(0, 20, (SIZE, SIZE, 3)).astype(np.uint8)
        Image.fromarray(img).save(root / f"img{i}.png")


@pytest.mark.slow
def test_corrupt_image_skipped_and_counted_or_raised(tmp_path):
    import jax

    from jaxdissect.data.folders import DataSourceError, ImageFolder

    module = PoolNet()
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    good, mixed = tmp_path / "good", tmp_path / "mixed"
    _write_images(good, 6)
    _write_images(mixed, 6)
    (mixed / "img2b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")   # index 3, among the same good images
    kw = dict(quantile=0.2, topk=4, thumbsize=16, batch_size=4)
    ref = dissect(module, variables, ["det"], LabelledFolder(ImageFolder(str(good), transform=_folder_transform)),
                  "dataset", output_dir=str(tmp_path / "ref"), **kw)
    skip = LabelledFolder(ImageFolder(str(mixed), transform=_folder_transform, on_error="skip"))
    got = dissect(module, variables, ["det"], skip, "dataset", output_dir=str(tmp_path / "skip"), **kw)
    assert ref["det"].images == 6 and got["det"].images == 6
    np.testing.assert_array_equal(got["det"].thresholds, ref["det"].thresholds)
    np.testing.assert_array_equal(got["det"].intersection, ref["det"].intersection)
    assert 3 not in got["det"].top_index
    assert list(skip.folder.bad_files) == [3]
    report = json.load(open(tmp_path / "skip" / "det" / "report.json"))
    assert "(1 unreadable images skipped)" in report["header"]["name"]
    assert "1 unreadable images skipped" in open(tmp_path / "skip" / "index.html").read()
    strict = LabelledFolder(ImageFolder(str(mixed), transform=_folder_transform))
    with pytest.raises(DataSourceError, match=r"img2b\.png"):
        dissect(module, variables, ["det"], strict, "dataset", output_dir=str(tmp_path / "raise"), **kw)


class PlantedGenerator(nn.Module):
    """z -> 32x32 image: cell (y, x) is red where z[8y + x] > 1 and green where it is < -1.

    Layer ``block`` unit 0 is relu(z - 1) per cell (fires on red), unit 1 relu(-z - 1) (green).
    """

    @nn.compact
    def __call__(self, z):
        cells = z[:, :64].reshape(-1, 8, 8)
        Stack(name="block")(cells)
        red = jnp.where(cells > 1, 1.0, -1.0)
        green = jnp.where(cells < -1, 1.0, -1.0)
        rgb = jnp.stack([red, green, -jnp.ones_like(red)], -1)
        return rgb.repeat(CELL, 1).repeat(CELL, 2)


class Stack(nn.Module):
    @nn.compact
    def __call__(self, cells):
        return jnp.stack([nn.relu(cells - 1), nn.relu(-cells - 1)], -1)


class ColourSegmenter:
    """Stands in for jaxdissect.segment: label 1 where the image is red, 2 where green."""

    categories = ["object", "material"]


def _fake_segment(segmenter, variables, images, downsample=4):
    images = jnp.asarray(images)
    n, h, w, _ = images.shape
    centre = images[:, downsample // 2::downsample, downsample // 2::downsample]
    labels = jnp.where(centre[..., 0] > 0, 1, jnp.where(centre[..., 1] > 0, 2, 0)).astype(jnp.int32)
    return labels[:, None], ["-", "redthing", "greenthing"], ["-", "object", "material"]


@pytest.mark.slow
def test_generator_output_is_segmented_and_shown(tmp_path, monkeypatch):
    from PIL import Image

    import jaxdissect.segmentation
    from jaxdissect.data.folders import LatentSource

    monkeypatch.setattr(jaxdissect.segmentation, "segment", _fake_segment)
    results = dissect(PlantedGenerator(), {}, ["block"], LatentSource(24), (ColourSegmenter(), {}),
                      quantile=0.2, topk=5, thumbsize=32, batch_size=8, output_dir=str(tmp_path))
    report = json.load(open(tmp_path / "block" / "report.json"))
    assert [(u["label"], u["cat"]) for u in report["units"]] == [("redthing", "object"), ("greenthing", "material")]
    assert results["block"].label_iou == pytest.approx([1.0, 1.0])
    strip = np.asarray(Image.open(tmp_path / "block" / "image" / "unit0.jpg"), np.int32)
    red = (strip[..., 0] > 200) & (strip[..., 1] < 70) & (strip[..., 2] < 70)
    assert red.mean() > 0.05      # rendered (x + 1) / 2: red cells show at full brightness


def test_segmenter_resolution_mismatch(model, monkeypatch):
    import jaxdissect.segmentation

    def half(segmenter, variables, images, downsample=4):
        labels, names, cats = _fake_segment(segmenter, variables, images, downsample * 2)
        return labels, names, cats

    monkeypatch.setattr(jaxdissect.segmentation, "segment", half)
    from jaxdissect.data.folders import LatentSource

    with pytest.raises(DissectError, match=r"segmenter returns 4x4 label maps for 32x32 images.*8x8"):
        dissect(PlantedGenerator(), {}, ["block"], LatentSource(8), (ColourSegmenter(), {}), quantile=0.2)


_TWO_DEVICES = """
import os, sys
sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp, numpy as np
from helpers import Planted, PlantedScenes, SIZE
from jaxdissect import parallel
from jaxdissect.pipelines.dissect import dissect
m = Planted()
shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 5)))
rng = np.random.default_rng(0)
v = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
r = [dissect(m, v, ["det", "mix"], PlantedScenes(20), "dataset", quantile=0.2, topk=6, batch_size=6,
             mesh=parallel.make_mesh(d)) for d in (jax.devices()[:1], jax.devices())]
same = all(np.array_equal(getattr(r[0][n], k), getattr(r[1][n], k))
           for k in ("thresholds", "intersection", "top_index", "top_values", "act_mean") for n in ("det", "mix"))
print("devices", len(jax.devices()), "same", same)
"""


@pytest.mark.slow
def test_one_and_two_devices_give_identical_results():
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.dirname(tests))
    out = subprocess.run([sys.executable, "-c", _TWO_DEVICES.format(tests=tests)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "devices 2 same True" in out.stdout


class CountingScenes(PlantedScenes):
    """PlantedScenes that counts the images it decodes."""

    def __init__(self, n, seed=0):
        super().__init__(n, seed)
        self.decoded = 0

    def get_batch(self, indices):
        self.decoded += len(indices)
        return super().get_batch(indices)


def _counting_forward(monkeypatch):
    import jaxdissect.pipelines.dissect as pipeline

    calls = []
    real = pipeline.ModelBatches.forward_fn

    def forward_fn(self, codes=False):
        fn = real(self, codes)

        def counted(variables, x):
            calls.append(int(x.shape[0]))
            return fn(variables, x)
        return counted

    monkeypatch.setattr(pipeline.ModelBatches, "forward_fn", forward_fn)
    return calls


@pytest.mark.parametrize("budget", [1024, 0])
def test_activation_cache_runs_the_model_once_per_image(model, budget, monkeypatch, caplog):
    """Within the budget the model and the decoding run once per image; over it, in every pass."""
    import logging

    module, variables = model
    calls = _counting_forward(monkeypatch)
    data = CountingScenes(20)
    with caplog.at_level(logging.INFO):
        results = dissect(module, variables, ["det", "mix"], data, "dataset", quantile=0.2, topk=10,
                          batch_size=8, activation_cache_mb=budget)
    passes = 1 if budget else 3
    # 3 batches of 8 (the last padded) per pass; the probe batch and strips are not part of the passes.
    assert len(calls) == 3 * passes
    assert data.decoded == 1 + 20 * passes  # + the probe item
    assert ("within the budget" if budget else "over the budget") in caplog.text
    reference = dissect(module, variables, ["det", "mix"], PlantedScenes(20), "dataset", quantile=0.2, topk=10,
                        batch_size=8, activation_cache_mb=1024 - budget)
    for n in ("det", "mix"):
        for k in ("thresholds", "intersection", "active", "label_pixels", "top_index", "act_mean"):
            assert getattr(results[n], k).tobytes() == getattr(reference[n], k).tobytes(), (n, k)
