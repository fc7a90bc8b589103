"""The pipeline's receptive-field geometry (the original's AlexNet mode) against a NumPy reference."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect.pipelines.dissect import DissectError, dissect
from helpers import CELL, SIZE, Planted, PlantedScenes

# A made-up conv stack from the 32-pixel image to the 8x8 "det" map (as the original used
# AlexNet's pool5 stack for every layer): scale 4, offset 1, grid 8.
CONVS = ((5, 4, 1, 1), (3, 1, 1, 1))
RF = {"convolutions": CONVS, "image_size": SIZE}
N, Q = 24, 0.2


def _rf_matrix(source, target):
    """``[target, source]`` bilinear, zero-padded weights, written from spec 2.2 (AlexNet grid)."""
    scale, offset, grid = 1.0, 0.0, SIZE
    for k, s, p, d in CONVS:      # forward composition: centre of feature i = i * scale + offset
        offset += ((k - 1) * d / 2 - p) * scale
        scale *= s
        grid = (grid + 2 * p - d * (k - 1) - 1) // s + 1
    f = (target - 1) / (SIZE - 1)  # image coordinates -> target pixels
    m = np.zeros((target, source))
    for t in range(target):
        x = (t - offset * f) / (scale * f) * (source - 1) / (grid - 1)
        i = int(np.floor(x))
        for j, w in ((i, 1 - (x - i)), (i + 1, x - i)):
            if 0 <= j < source:
                m[t, j] += w
    return m


@pytest.fixture(scope="module")
def setup():
    module = Planted()
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 5)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    return module, variables


@pytest.mark.slow
def test_thresholds_and_iou_match_numpy(setup):
    module, variables = setup
    got = dissect(module, variables, ["det"], PlantedScenes(N), "dataset", quantile=Q, topk=4, batch_size=8,
                  geometry="receptive_field", receptive_field=RF, progress=False)["det"]
    plain = dissect(module, variables, ["det"], PlantedScenes(N), "dataset", quantile=Q, topk=4, batch_size=8,
                    progress=False)["det"]
    batch = PlantedScenes(N).get_batch(range(N))
    g = SIZE // CELL
    det = batch["image"].reshape(N, g, CELL, g, CELL, 5).mean((2, 4)).astype(np.float64)
    m = _rf_matrix(g, g)
    assert not np.allclose(m, np.eye(g)), "the planted grid must differ from the identity"
    up = np.einsum("th,nhwu,sw->ntsu", m, det, m)                               # [N, 8, 8, 5]
    level = np.quantile(up.reshape(-1, 5), 1 - Q, axis=0)
    np.testing.assert_allclose(got.thresholds, level, rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain.thresholds, level, rtol=1e-3), "the geometry must change the thresholds"
    seg = batch["seg"][:, 0]
    on = up > np.asarray(got.thresholds, np.float64)
    far = np.abs(up - got.thresholds) > 1e-5 * np.maximum(1, np.abs(up))      # not at the level itself
    labels = len(PlantedScenes.label_names)
    inter = np.stack([[(on[..., u] & (seg == lab)).sum() for lab in range(labels)] for u in range(5)])
    inter_far = np.stack([[(on[..., u] & (seg == lab) & far[..., u]).sum() for lab in range(labels)]
                          for u in range(5)])
    assert (got.intersection[:, 1:] >= inter_far[:, 1:]).all()
    # label 0 (no label) is not scored; compare the real labels
    np.testing.assert_array_equal(got.intersection[:, 1:], inter[:, 1:])
    np.testing.assert_array_equal(got.active, on.sum((0, 1, 2)))
    label_pixels = np.bincount(seg.ravel(), minlength=labels)
    iou = inter / np.maximum(on.sum((0, 1, 2))[:, None] + label_pixels - inter, 1)
    np.testing.assert_allclose(got.iou[:, 1:], iou[:, 1:], rtol=1e-6)
    assert got.config["geometry"] == "receptive_field"
    assert got.config["receptive_field"] == {"convolutions": [list(c) for c in CONVS], "image_size": SIZE}


@pytest.mark.slow
def test_strips_highlight_the_receptive_field_region(setup, tmp_path, monkeypatch):
    from jaxdissect.reports import strips

    module, variables = setup
    seen, original = [], strips.masked_thumbnail
    monkeypatch.setattr(strips, "masked_thumbnail",
                        lambda image, act, level, thumb, mask=None: seen.append((act, level, mask))
                        or original(image, act, level, thumb, mask=mask))
    got = dissect(module, variables, ["det"], PlantedScenes(N), "dataset", quantile=Q, topk=4, batch_size=8,
                  geometry="receptive_field", receptive_field=RF, progress=False, thumbsize=16,
                  output_dir=str(tmp_path / "out"))["det"]
    g = SIZE // CELL
    m = _rf_matrix(g, g)
    assert seen and all(mask is not None for *_, mask in seen)
    for act, level, mask in seen:
        up = m @ np.asarray(act, np.float64) @ m.T                               # one unit's [8, 8] grid
        far = np.abs(up - level) > 1e-5 * np.maximum(1, np.abs(up))
        np.testing.assert_array_equal(mask[far], (up > level)[far])
    assert set(float(level) for _, level, _ in seen) <= set(got.thresholds.astype(float).tolist())


def test_bad_receptive_field(setup):
    module, variables = setup
    data = PlantedScenes(4)
    with pytest.raises(DissectError, match="needs receptive_field"):
        dissect(module, variables, ["det"], data, "dataset", quantile=Q, geometry="receptive_field")
    with pytest.raises(DissectError, match="geometry='receptive_field'"):
        dissect(module, variables, ["det"], data, "dataset", quantile=Q, receptive_field=RF)
    with pytest.raises(DissectError, match="kernel >= 1"):
        dissect(module, variables, ["det"], data, "dataset", quantile=Q, geometry="receptive_field",
                receptive_field={"convolutions": [(3, 0, 0, 1)], "image_size": SIZE})
    with pytest.raises(DissectError, match="geometry must be one of"):
        dissect(module, variables, ["det"], data, "dataset", quantile=Q, geometry="nearest")


_TWO_DEVICES = """
import sys
sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp, numpy as np
from helpers import Planted, PlantedScenes, SIZE
from test_receptive_field_geometry import RF
from jaxdissect import parallel
from jaxdissect.pipelines.dissect import dissect
m = Planted()
shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 5)))
rng = np.random.default_rng(0)
v = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
r = [dissect(m, v, ["det", "mix"], PlantedScenes(12), "dataset", quantile=0.2, topk=4, batch_size=6,
             geometry="receptive_field", receptive_field=RF, progress=False,
             mesh=parallel.make_mesh(d)) for d in (jax.devices()[:1], jax.devices())]
same = all(np.array_equal(getattr(r[0][n], k), getattr(r[1][n], k))
           for k in ("thresholds", "intersection", "active", "top_index") for n in ("det", "mix"))
print("devices", len(jax.devices()), "same", same)
"""


@pytest.mark.slow
def test_one_and_two_devices_identical():
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.dirname(tests))
    out = subprocess.run([sys.executable, "-c", _TWO_DEVICES.format(tests=tests)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "devices 2 same True" in out.stdout


def test_launcher_takes_the_grid_from_model_json():
    from launch.common import LaunchError
    from launch.dissect import _geometry

    recorded = {"upsample": {"convolutions": [list(c) for c in CONVS], "image_size": SIZE}}
    assert _geometry(None, recorded, "m") == ("receptive_field", recorded["upsample"])
    assert _geometry("original", recorded, "m") == ("original", None)
    assert _geometry(None, {}, "m") == ("original", None)
    assert _geometry("clamped", {}, "m") == ("clamped", None)
    with pytest.raises(LaunchError, match="records no receptive-field grid"):
        _geometry("receptive_field", {}, "m")
    with pytest.raises(LaunchError, match="malformed"):
        _geometry(None, {"upsample": {"convolutions": [[3, 1]]}}, "m")
    from jaxdissect.models.alexnet import PLACES_UPSAMPLE_CONVOLUTIONS

    alexnet = {"upsample": {"convolutions": [list(c) for c in PLACES_UPSAMPLE_CONVOLUTIONS], "image_size": 227}}
    assert _geometry(None, alexnet, "alexnet")[0] == "receptive_field"  # what converters.alexnet_places365 writes


@pytest.mark.slow
def test_launcher_dissects_with_the_recorded_grid(tmp_path):
    """A model whose model.json records ``upsample`` is dissected with it by default, end to end."""
    from jaxdissect.checkpoint import save_model
    from jaxdissect.models.small_cnn import SmallCNN
    from launch import dissect as launcher
    from helpers import launcher_config, numpy_init

    module = SmallCNN(widths=(4, 4, 4, 4))
    path = str(tmp_path / "rf_cnn")
    grid = {"convolutions": [[3, 2, 1, 1]] * 3, "image_size": 64}
    save_model(path, module, numpy_init(module, (1, 64, 64, 3)), metadata={
        "model": "rf_cnn", "preprocessing": {"normalization": "zc", "resize": 64, "crop": 64}, "upsample": grid})
    results, _ = launcher.run(launcher_config(model=path, data="synthetic:4", segmenter="dataset", layers="conv4",
                                      topk=2, thumbsize=16, output_dir=str(tmp_path / "out")))
    assert results["conv4"].config["geometry"] == "receptive_field"
    assert results["conv4"].config["receptive_field"] == grid
