"""Synthetic scenes (planted labels, determinism, contract), the small CNN and its training.

The label checks re-derive the ground truth from the object list (centre,
radius, shape areas in closed form, named colours) rather than from the
rendering code, and the segmentation from the full-resolution labels with a
per-block loop.
"""

import json
import math
import os

import jax
import numpy as np
import pytest

from jaxdissect.data import synthetic as syn
from jaxdissect.data.synthetic import SyntheticScenes

# Area of each shape in units of radius squared.
AREAS = dict(disc=math.pi, square=1.6 ** 2, triangle=0.5 * 2 * 1.7, bar=2 * 0.6,
             ring=math.pi * (1 - 0.55 ** 2), cross=2 * (2 * 0.56) - 0.56 ** 2)


@pytest.fixture(scope="module")
def data():
    ds = SyntheticScenes(48, seed=3)
    return ds, ds.get_batch(range(len(ds))), ds.pixel_labels(range(len(ds)))


def test_contract(data):
    ds, batch, _ = data
    assert len(ds) == 48
    assert batch["image"].shape == (48, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["display"].shape == (48, 64, 64, 3) and batch["display"].dtype == np.uint8
    assert batch["seg"].shape == (48, 3, 16, 16) and batch["seg"].dtype == np.int32
    assert batch["label"].shape == (48,) and batch["label"].dtype == np.int32
    assert batch["valid"].all()
    np.testing.assert_allclose(batch["image"], batch["display"] / 127.5 - 1, atol=1e-6)
    assert len(ds.label_names) == len(ds.label_categories) and ds.label_names[0] == "-"
    assert set(ds.label_categories[1:]) == set(ds.categories) == {"object", "material", "color"}
    assert batch["seg"].max() < len(ds.label_names)
    # Channel k holds only labels of category k (object, material, colour), or 0.
    for k, cat in enumerate(ds.categories):
        values = np.unique(batch["seg"][:, k])
        assert all(v == 0 or ds.label_categories[v] == cat for v in values)
    json.dumps(ds.fingerprint())
    assert ds.fingerprint() != SyntheticScenes(48, seed=4).fingerprint()
    assert ds.fingerprint() != SyntheticScenes(49, seed=3).fingerprint()
    assert isinstance(ds.name, str)


def test_deterministic_per_index(data):
    ds, batch, _ = data
    again = SyntheticScenes(48, seed=3).get_batch([7, 2, 7])
    for key in ("display", "seg", "label"):
        np.testing.assert_array_equal(again[key], batch[key][[7, 2, 7]])
    other = SyntheticScenes(48, seed=4).get_batch([7])
    assert not np.array_equal(other["display"], batch["display"][[7]])
    with pytest.raises(IndexError):
        ds.objects(48)


def test_seg_is_block_majority_of_pixel_labels(data):
    _, batch, pixels = data
    for i in range(0, 48, 7):
        for k in range(3):
            for y in range(16):
                for x in range(16):
                    block = pixels[i, k, 4 * y:4 * y + 4, 4 * x:4 * x + 4].ravel()
                    assert batch["seg"][i, k, y, x] == np.bincount(block).argmax()


def test_planted_objects(data):
    ds, batch, pixels = data
    names = ds.label_names
    pairs = [set(p) for p in syn.SCENES.values()]
    for i in range(48):
        objects = ds.objects(i)
        drawn = {names[v] for v in np.unique(pixels[i, 0]) if v}
        assert drawn == {o["shape"] for o in objects}
        # The class is the one whose pair is present, and no other pair is complete.
        assert [j for j, p in enumerate(pairs) if p <= drawn] == [batch["label"][i]]
        for o in objects:
            mask = pixels[i, 0] == names.index(o["shape"])
            area = AREAS[o["shape"]] * o["radius"] ** 2
            assert abs(mask.sum() - area) < 0.2 * area + 4, (o, mask.sum(), area)
            ys, xs = np.nonzero(mask)
            cy, cx = o["center"]
            assert np.all((ys - cy) ** 2 + (xs - cx) ** 2 <= (o["radius"] * 1.42) ** 2 + 1e-6)
            centre = pixels[i, 0, int(round(cy)), int(round(cx))]
            assert (centre == 0) == (o["shape"] == "ring")
            assert (pixels[i, 1][mask] == names.index(o["material"])).all()
            assert (pixels[i, 2][mask] == names.index(o["color"])).all()


def test_pixel_colours_match_labels(data):
    ds, batch, pixels = data
    rgb = batch["display"].astype(float)
    noise = 4 * 6.0  # 4 sigma of the pixel grain
    bg = pixels[:, 0] == 0
    assert (np.abs(rgb[bg] - syn.BACKGROUND) < noise).all(axis=-1).mean() > 0.999
    for name, colour in syn.COLORS.items():
        sel = pixels[:, 2] == ds.label_names.index(name)
        if not sel.any():
            continue
        c = np.array(colour, float)
        scale = rgb[sel] @ c / (c @ c)
        assert np.quantile(scale, 0.01) > 0.45 and np.quantile(scale, 0.99) < 1.1
        resid = np.linalg.norm(rgb[sel] - scale[:, None] * c, axis=-1)
        assert np.quantile(resid, 0.99) < 2 * noise
        # Every material is a two-level pattern: both brightness levels occur.
        assert (scale < 0.7).mean() > 0.1 and (scale > 0.9).mean() > 0.1


def test_small_cnn_matches_torch_reference():
    """Parameters laid out by hand (the names a converter or checkpoint relies on), forward vs PyTorch."""
    torch = pytest.importorskip("torch")
    from jaxdissect.models.small_cnn import SmallCNN

    widths = (4, 5, 6, 7)
    module = SmallCNN(widths=widths)
    rng = np.random.default_rng(0)
    params, cin = {}, 3
    for i, w in enumerate(widths):
        params[f"conv{i + 1}"] = {"conv": {"kernel": rng.normal(0, 0.3, (3, 3, cin, w)).astype(np.float32),
                                           "bias": rng.normal(0, 0.1, (w,)).astype(np.float32)}}
        cin = w
    params["fc"] = {"kernel": rng.normal(size=(cin, 6)).astype(np.float32),
                    "bias": rng.normal(size=(6,)).astype(np.float32)}
    x = SyntheticScenes(2).get_batch([0, 1])["image"]
    logits, state = jax.jit(lambda v, x: module.apply(v, x, capture_intermediates=True,
                                                      mutable=["intermediates"]))({"params": params}, x)
    assert logits.shape == (2, 6)

    t = torch.tensor(x).permute(0, 3, 1, 2).double()
    acts = []
    for i in range(len(widths)):
        p = params[f"conv{i + 1}"]["conv"]
        weight = torch.tensor(p["kernel"]).permute(3, 2, 0, 1).double()
        t = torch.relu(torch.nn.functional.conv2d(t, weight, torch.tensor(p["bias"]).double(), padding=1))
        acts.append(t.permute(0, 2, 3, 1).numpy())
        if i < len(widths) - 1:
            t = torch.nn.functional.max_pool2d(t, 2)
    ref = t.amax(dim=(2, 3)).numpy() @ params["fc"]["kernel"] + params["fc"]["bias"]
    inter = state["intermediates"]
    for name, want, size in zip(module.layer_names, acts, (64, 32, 16, 8)):
        got = np.asarray(inter[name]["__call__"][0])
        assert got.shape == (2, size, size, want.shape[-1])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_train_or_load_learns_and_caches(tmp_path):
    from jaxdissect.checkpoint import load_metadata
    from jaxdissect.pipelines.train_synthetic import settings_key, train_or_load

    # A cheap configuration (32-pixel scenes, 120 steps); the default reaches ~97% test accuracy.
    settings = dict(num_train=512, steps=120, num_test=192, batch_size=32, widths=(16, 32, 32, 32),
                    image_size=32, learning_rate=3e-3)
    module, variables, info = train_or_load(str(tmp_path), log=None, **settings)
    assert info["cached"] is False
    # Chance is 1/6.
    assert info["train_accuracy"] > 0.35 and info["test_accuracy"] > 0.22, info
    name = os.path.basename(info["path"])
    assert sorted(os.listdir(tmp_path)) == [name, name + ".lock"]   # the model and the lock that built it once
    assert load_metadata(info["path"])["settings"]["steps"] == 120
    module2, variables2, info2 = train_or_load(str(tmp_path), log=None, **settings)
    assert info2["cached"] is True and module2 == module and info2["path"] == info["path"]
    assert info2["test_accuracy"] == info["test_accuracy"]
    jax.tree.map(np.testing.assert_array_equal, variables2, jax.tree.map(np.asarray, variables))
    assert settings_key(dict(settings, steps=121)) != settings_key(settings)
    with pytest.raises(TypeError, match="unknown settings"):
        train_or_load(str(tmp_path), log=None, bogus=1)
