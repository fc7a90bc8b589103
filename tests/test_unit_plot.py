"""Pre-ReLU capture ("<layer>:pre") against PyTorch/NumPy; single-unit plots and their best threshold."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from helpers import toy_segment
from jaxdissect.interventions import classifier as ci
from jaxdissect.interventions.common import InterventionError
from jaxdissect.layers import Edit, LayerError, capture, pre_activation, run
from jaxdissect.models import toy_generator as T
from jaxdissect.models.small_cnn import SmallCNN
from jaxdissect.models.vgg16 import ConvReLU, Dense
from jaxdissect.pipelines import unit_plot as up


class TinyVGG(nn.Module):
    """VGG16's own blocks (which mark their pre-activation) at toy size."""

    @nn.compact
    def __call__(self, x):
        x = ConvReLU(5, name="conv_a")(x)
        x = ConvReLU(6, name="conv_b")(x)
        x = Dense(4, relu=True, name="fc")(x.mean((1, 2)))
        return Dense(3, name="out")(x)


class InlineReLU(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Block(name="block")(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(x * self.param("w", nn.initializers.ones, (3,)))


def test_pre_relu_equals_pytorch_conv_and_numpy_dense():
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 3)).astype(np.float32)
    model = TinyVGG()
    v = model.init(jax.random.key(0), x)
    p = v["params"]
    _, acts = capture(model, v, x, ["conv_a:pre", "conv_a", "conv_b:pre", "conv_b", "fc:pre", "fc"])
    assert pre_activation(model, v, x, "conv_b") == "conv_b.preact"
    tx = torch.from_numpy(x).permute(0, 3, 1, 2)
    for name, inp in (("conv_a", tx), ("conv_b", torch.relu(torch.from_numpy(
            np.array(acts["conv_a:pre"])).permute(0, 3, 1, 2)))):
        w = torch.from_numpy(np.array(p[name]["kernel"])).permute(3, 2, 0, 1)
        ref = torch.nn.functional.conv2d(inp, w, torch.from_numpy(np.array(p[name]["bias"])), padding=1)
        np.testing.assert_allclose(np.asarray(acts[f"{name}:pre"]), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)
        np.testing.assert_array_equal(np.maximum(np.asarray(acts[f"{name}:pre"]), 0), np.asarray(acts[name]))
    assert (np.asarray(acts["conv_b:pre"]) < 0).any()  # a real pre-activation, not the clipped output
    fc_in = np.asarray(acts["conv_b"]).mean((1, 2))
    np.testing.assert_allclose(np.asarray(acts["fc:pre"]), fc_in @ np.asarray(p["fc"]["kernel"])
                               + np.asarray(p["fc"]["bias"]), atol=1e-5)
    # an edit at ":pre" acts before the ReLU: pushing conv_b below zero there zeroes its output
    _, after = run(model, v, x, edits={"conv_b:pre": Edit(1.0, -100.0)}, capture=["conv_b"])
    assert not np.asarray(after["conv_b"]).any()


def test_pre_relu_of_a_layer_with_a_conv_child_and_errors():
    model = SmallCNN(widths=(4, 4, 4, 4))
    x = np.random.default_rng(1).standard_normal((1, 16, 16, 3)).astype(np.float32)
    v = model.init(jax.random.key(0), x)
    _, acts = capture(model, v, x, ["conv2:pre", "conv2.conv", "conv2"])
    np.testing.assert_array_equal(np.asarray(acts["conv2:pre"]), np.asarray(acts["conv2.conv"]))
    np.testing.assert_array_equal(np.maximum(np.asarray(acts["conv2:pre"]), 0), np.asarray(acts["conv2"]))
    m2 = InlineReLU()
    v2 = m2.init(jax.random.key(0), x)
    with pytest.raises(LayerError, match=r"layer 'block' has no pre-activation submodule.*PreActivation"):
        capture(m2, v2, x, ["block:pre"])
    with pytest.raises(LayerError, match="unknown layer 'conv9'"):
        capture(model, v, x, ["conv9:pre"])


def brute_force_ba(pos, neg):
    best = (-1.0, None)
    for t in sorted(set(pos) | set(neg)) + [np.inf]:
        tpr = sum(1 for p in pos if p >= t) / len(pos)
        tnr = sum(1 for q in neg if q < t) / len(neg)
        if (tpr + tnr) / 2 > best[0]:
            best = ((tpr + tnr) / 2, t)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_threshold_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    pos = np.round(rng.normal(1.0, 1.0, 37), 1)  # rounded: ties inside and across groups
    neg = np.round(rng.normal(0.0, 1.0, 53), 1)
    ba, t = brute_force_ba(list(pos), list(neg))
    got_t, got_ba = up.best_threshold(pos, neg)
    assert got_ba == pytest.approx(ba) and got_t == t


def test_classifier_unit_plot(tmp_path):
    model = TinyVGG()
    rng = np.random.default_rng(3)
    images = rng.standard_normal((20, 7, 7, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 20).astype(np.int32)
    v = model.init(jax.random.key(1), images[:1])
    names = ["bedroom", "kitchen", "beach"]
    out = str(tmp_path / "plot")
    s = up.classifier_unit_plot(model, v, "conv_b", 2, ci.ArraySource(images, labels, names), out,
                                class_names=names, classes=["kitchen", "beach"], batch_size=8)
    pre = np.asarray(capture(model, v, images, ["conv_b:pre"])[1]["conv_b:pre"])[..., 2].max((1, 2))
    z = np.load(os.path.join(out, "unit_plot.npz"))
    np.testing.assert_allclose(z["peak"], pre, atol=1e-6)
    chosen = np.isin(labels, [1, 2])
    ba, t = brute_force_ba(list(pre[chosen]), list(pre[~chosen]))
    assert s["balanced_accuracy"] == pytest.approx(ba)
    assert s["groups"]["kitchen"]["count"] == (labels == 1).sum()
    assert json.load(open(os.path.join(out, "unit_plot.json")))["unit"] == 2
    assert os.path.getsize(os.path.join(out, "unit_plot.png")) > 0
    with pytest.raises(InterventionError, match="unknown class 'kitchn'; did you mean 'kitchen'"):
        up.classifier_unit_plot(model, v, "conv_b", 2, ci.ArraySource(images, labels, names), out,
                                class_names=names, classes=["kitchn"])
    with pytest.raises(InterventionError, match="unit 6 out of range"):
        up.classifier_unit_plot(model, v, "conv_b", 6, ci.ArraySource(images, labels, names), str(tmp_path / "b"),
                                class_names=names, classes=["kitchen"])


def test_generator_unit_plot(tmp_path):
    gen, gvars = T.toy_generator()
    z = T.sample_z(24, seed=0)
    out = str(tmp_path / "gen")
    unit = 1  # one of the toy's red units at layer4 (jaxdissect.models.toy_generator.CONCEPT_UNITS)
    s = up.generator_unit_plot(gen, gvars, "layer4", unit, z, toy_segment, "red",
                               list(T.LABEL_NAMES), out, fraction=0.02, batch_size=8)
    images, acts = capture(gen, gvars, z, ["layer4"])
    peak = np.asarray(acts["layer4"])[..., unit].reshape(len(z), -1).max(1)
    share = (np.asarray(toy_segment(images))[:, 0] == 1).mean((1, 2))
    d = np.load(os.path.join(out, "unit_plot.npz"))
    np.testing.assert_allclose(d["peak"], peak, atol=1e-6)
    np.testing.assert_allclose(d["share"], share, atol=1e-6)
    has = share > 0.02
    assert s["groups"]["> 0.02 red"]["count"] == has.sum() and 0 < has.sum() < len(z)
    assert s["balanced_accuracy"] == pytest.approx(brute_force_ba(list(peak[has]), list(peak[~has]))[0])
    assert s["balanced_accuracy"] > 0.9  # the red unit's peak separates images with red from those without
