"""Shape-bias scores on planted pairs against NumPy: a unit that sees only the kept shape channel vs texture."""

import json
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdissect.data.folders import DataSourceError
from jaxdissect.pipelines import shape_bias as sb
from jaxdissect.preprocess import renormalize

S = 64  # image and feature-map size: the 64x64 quantile grid is the native map


class Channels(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x


class Planted(nn.Module):
    """Layer 'feat': units 0, 1, 2 are the (normalised) R, G, B channels, unit 3 is R + G."""

    @nn.compact
    def __call__(self, x):
        f = Channels(name="feat")(jnp.concatenate([x, x[..., :1] + x[..., 1:2]], -1))
        return f.mean((1, 2))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    originals, stylized = [], []
    for i in range(12):
        o = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
        s = o.copy()
        s[..., 1:] = rng.integers(0, 256, (S, S, 2), dtype=np.uint8)  # red (shape) kept, green/blue re-textured
        cls = "a" if i < 6 else "b"
        for d in ("orig", "styl"):
            os.makedirs(root / d / cls, exist_ok=True)
        Image.fromarray(o).save(root / "orig" / cls / f"img{i:02d}.png")
        Image.fromarray(s).save(root / "styl" / cls / f"img{i:02d}-stylized-paint{i % 3}.png")
        originals.append(o), stylized.append(s)
    return root, np.stack(originals), np.stack(stylized)


def np_acts(images):
    x = renormalize(images.astype(np.float32) / 255.0, "pt", "imagenet")
    return np.concatenate([x, x[..., :1] + x[..., 1:2]], -1).reshape(-1, 4).astype(np.float64)


def test_scores_equal_numpy(pairs, tmp_path):
    root, o, s = pairs
    source = sb.PairedFolders(str(root / "orig"), str(root / "styl"), size=S)
    assert len(source) == 12
    out = str(tmp_path / "out")
    summary = sb.shape_bias(Planted(), {}, ["feat"], source, out, batch_size=5, strip_images=3, thumb=32)
    ua, sa = np_acts(o).astype(np.float32), np_acts(s).astype(np.float32)
    u99, s99 = np.quantile(ua, 0.99, axis=0), np.quantile(sa, 0.99, axis=0)
    inter = ((sa > s99) & (ua > u99)).mean(0)
    ref = np.clip(np.where(inter >= 0.02, 1, inter / (0.02 - inter)), 0, 1)
    z = np.load(os.path.join(out, "feat", "shape_bias.npz"))
    np.testing.assert_allclose(z["u_99"], u99, rtol=1e-6)
    np.testing.assert_allclose(z["s_99"], s99, rtol=1e-6)
    np.testing.assert_allclose(z["intersection"], inter, atol=1e-9)
    np.testing.assert_allclose(z["score"], ref, atol=1e-9)
    # planted: red is the shape (its masks coincide, up to ties of 8-bit values), green and blue are texture
    assert z["score"][0] > 0.5 and z["score"][1] < 0.1 and z["score"][2] < 0.1
    assert summary["layers"]["feat"]["shape_units"] == int((ref > 0.1).sum())
    assert json.load(open(os.path.join(out, "shape_bias.json")))["layers"]["feat"]["units"] == 4
    for kind in ("s_imgs", "su_imgs"):
        assert Image.open(os.path.join(out, "feat", kind, "unit0.jpg")).size == (3 * 32 + 2 * 5, 32)
    assert os.path.getsize(os.path.join(out, "shape_bias.png")) > 0


def test_score_formula_and_bad_input(pairs, tmp_path):
    np.testing.assert_allclose(sb.shape_bias_score([0.0, 0.005, 0.01, 0.015, 0.02, 0.5]),
                               [0.0, 0.005 / 0.015, 1.0, 1.0, 1.0, 1.0])
    root, *_ = pairs
    os.makedirs(tmp_path / "styl" / "a")
    Image.new("RGB", (8, 8)).save(tmp_path / "styl" / "a" / "other-stylized-x.png")
    with pytest.raises(DataSourceError, match="1 stylized images have no original"):
        sb.PairedFolders(str(root / "orig"), str(tmp_path / "styl"))
    source = sb.PairedFolders(str(root / "orig"), str(root / "styl"), size=S)
    with pytest.raises(Exception, match="unknown or non-spatial layers"):
        sb.shape_bias(Planted(), {}, ["fe"], source, str(tmp_path / "o"))
    with pytest.raises(Exception, match="launch.dissect --layers=feat"):
        sb.shape_bias(Planted(), {}, ["feat"], source, str(tmp_path / "o2"), dissection=str(tmp_path / "none"),
                      strip_images=0)
