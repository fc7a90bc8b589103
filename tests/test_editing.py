"""Unit painting (GANPaint) on the planted toy generator, against planted ground truth and NumPy/PyTorch references."""

import numpy as np
import pytest
import torch

from jaxdissect import capture
from jaxdissect.editing import Brushes, EditError, Stroke, apply_strokes, compose, erase, paint, pool_mask
from jaxdissect.models import toy_generator as T
from jaxdissect.pipelines.toy import dissect_toy


@pytest.fixture(scope="module")
def toy():
    return T.toy_generator()


@pytest.fixture(scope="module")
def dissection(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy_dissection"))
    dissect_toy(out, num_images=100)
    return out


@pytest.fixture(scope="module")
def brushes(dissection):
    return Brushes.from_dissection(dissection, "layer4")


def _dilate(mask, r):
    out = np.zeros_like(mask)
    for y, x in zip(*np.nonzero(mask)):
        out[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = True
    return out


def test_dissection_finds_planted_units(brushes):
    for concept in ("red", "green"):
        assert set(brushes.units(concept, 4)) == set(T.CONCEPT_UNITS[concept])
    # Blue is the rarest label; on 100 images one texture unit can edge past a blue unit.
    assert len(set(brushes.units("blue", 4)) & set(T.CONCEPT_UNITS["blue"])) >= 3
    assert brushes.concepts == ["red", "green", "blue"]
    with pytest.raises(EditError, match="did you mean 'red'"):
        brushes.units("redd", 4)
    with pytest.raises(EditError, match="at most 16"):
        brushes.units("red", 20)


def test_paint_red_region_and_nothing_outside(toy, brushes):
    module, variables = toy
    z = T.sample_z(6, seed=7)
    mask = np.zeros((32, 32), bool)  # a GANPaint-style 32x32 canvas; max-pooled to 8x8 cells (2..4, 1..3)
    mask[9:18, 5:13] = True
    clean = np.asarray(module.apply(variables, z))
    out = np.asarray(paint(module, variables, z, "red", mask, brushes, strength=4))
    cells = np.zeros((8, 8), bool)
    cells[2:5, 1:4] = True  # every cell the canvas mask touches
    seg = np.asarray(T.color_segment(out))[:, 0]
    clean_seg = np.asarray(T.color_segment(clean))[:, 0]
    blocks = np.kron(cells, np.ones((4, 4), bool))
    assert (out[:, blocks, 0] > 0.9).all()  # the red channel is on over every painted block
    # Painting adds red units (others stay on): red dominates more, and most painted cells read red.

    def redness(x):
        return (x[..., 0] - np.maximum(x[..., 1], x[..., 2]))[:, blocks].mean()

    assert redness(out) > redness(clean) + 0.3
    assert (seg[:, cells] == 1).mean() > (clean_seg[:, cells] == 1).mean() + 0.2
    # Layers 5-8 (3x3 kernels at 16, 16, 32, 32 px) spread an edit by at most 2+2+1+1 = 6 pixels.
    outside = ~_dilate(np.kron(cells, np.ones((4, 4), bool)), 6)
    np.testing.assert_allclose(out[:, outside], clean[:, outside], atol=1e-6)
    assert np.abs(out - clean)[:, blocks].mean() > 0.1


def test_erase_removes_red(toy, brushes):
    module, variables = toy
    z = T.sample_z(20, seed=3)
    clean_seg = np.asarray(T.color_segment(module.apply(variables, z)))[:, 0]
    assert (clean_seg == 1).mean() > 0.05
    out = erase(module, variables, z, "red", np.ones((8, 8)), brushes, strength=4)
    seg = np.asarray(T.color_segment(out))[:, 0]
    assert (seg == 1).sum() == 0


def test_representation_equals_latent_path(toy, brushes):
    module, variables = toy
    z = T.sample_z(3, seed=11)
    _, acts = capture(module, variables, z, ["layer4"])
    strokes = [Stroke("green", np.eye(32), strength=4), Stroke("red", np.ones((16, 16)) * 0.5, erase=True,
                                                                strength=4)]
    a = np.asarray(apply_strokes(module, variables, z, strokes, brushes))
    b = np.asarray(apply_strokes(module, variables, acts["layer4"], strokes, brushes))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_over_composition_matches_numpy():
    rng = np.random.RandomState(0)
    s, n, h, w, u = 3, 2, 4, 4, 5
    x = rng.standard_normal((n, h, w, u)).astype(np.float32)
    units = (rng.uniform(size=(s, u)) > 0.4).astype(np.float32)
    values = rng.uniform(1, 3, (s, u)).astype(np.float32)
    alpha = rng.uniform(size=(s, n, h, w)).astype(np.float32)
    alpha[0, 0, 0, 0] = 0.0
    a_i = alpha[..., None] * units[:, None, None, None]  # [S, N, h, w, U]
    total = 1 - np.prod(1 - a_i, axis=0)
    weights = np.stack([a_i[i] * np.prod(1 - a_i[i + 1:], axis=0) for i in range(s)])
    value = np.where(total > 0, (weights * values[:, None, None, None]).sum(0) / np.maximum(total, 1e-30), 0)
    expected = x * (1 - total) + value * total
    np.testing.assert_allclose(np.asarray(compose(x, units, values, alpha)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,size", [((32, 32), (8, 8)), ((30, 17), (8, 8)), ((4, 4), (8, 8))])
def test_pool_mask_matches_torch(shape, size):
    m = np.random.RandomState(1).uniform(size=shape).astype(np.float32)
    t = torch.from_numpy(m)[None, None]
    np.testing.assert_allclose(pool_mask(m, size, "max"), torch.nn.functional.adaptive_max_pool2d(t, size)[0, 0])
    np.testing.assert_allclose(pool_mask(m, size, "mean"), torch.nn.functional.adaptive_avg_pool2d(t, size)[0, 0],
                               rtol=1e-6)


def test_bad_inputs(toy, brushes, dissection):
    module, variables = toy
    z = T.sample_z(2)
    with pytest.raises(EditError, match=r"mask values must lie in \[0, 1\]"):
        paint(module, variables, z, "red", np.full((8, 8), 2.0), brushes, strength=4)
    with pytest.raises(EditError, match=r"give \[H, W\] or one per image \[2, H, W\]"):
        paint(module, variables, z, "red", np.ones((3, 8, 8)), brushes, strength=4)
    with pytest.raises(EditError, match="unknown layer 'layer9'"):
        paint(module, variables, z, "red", np.ones((8, 8)), brushes, strength=4, layer="layer9")
    with pytest.raises(EditError, match="no dissection of 'layer5'.*dissected layers: layer4"):
        Brushes.from_dissection(dissection, "layer5")
    with pytest.raises(EditError, match="strength"):
        paint(module, variables, z, "red", np.ones((8, 8)), brushes, strength=0)
