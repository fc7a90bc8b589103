"""FeatureEdit: removing or inserting a basis's features in a forward pass equals the layer's output
recomputed in NumPy with that feature's decoded contribution removed (or added), for a classifier (the demo
CNN) and a generator (the toy generator); an edit of nothing changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_topk, random_sae

from jaxdissect.bases import Linear, sae
from jaxdissect.layers import (
    Ablate,
    FeatureEdit,
    LayerError,
    Replace,
    SetUnits,
    capture,
    run,
)
from jaxdissect.models.small_cnn import SmallCNN
from jaxdissect.models.toy_generator import sample_z, toy_generator
from jaxdissect.rotation import random_rotation_powers

U, KSAE = 40, 5


@pytest.fixture(scope="module")
def classifier():
    module = SmallCNN(num_classes=5, widths=(8, 16, 16, 16))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    variables = module.init(jax.random.PRNGKey(0), x)
    return module, variables, x


def _edit(module, variables, x, layer, edit):
    f = jax.jit(lambda v, x, e: run(module, v, x, edits={layer: e}, capture=[layer]))
    out, acts = f(variables, x, edit)
    return np.asarray(out), np.asarray(acts[layer])


def test_classifier_feature_ablation_equals_numpy(classifier):
    module, variables, x = classifier
    params = random_sae(np.random.default_rng(1), 16, U)
    basis = sae.TopKSAE(k=KSAE)
    _, acts = capture(module, variables, x, ["conv3"])
    a = np.asarray(acts["conv3"], np.float64)
    codes, _ = numpy_topk(params, a, KSAE)
    codes = codes.reshape(a.shape[:-1] + (U,))
    f = int(np.argmax((codes > 0).sum((0, 1, 2))))                     # a feature that is active somewhere
    want = a - codes[..., f:f + 1] * params["w_dec"][f]
    out, edited = _edit(module, variables, x, "conv3", FeatureEdit(basis, params, Ablate([f])))
    np.testing.assert_allclose(edited, want, rtol=1e-4, atol=1e-5)
    assert np.abs(edited - a).max() > 1e-3                               # the ablation did something
    downstream = np.asarray(run(module, variables, x, edits={"conv3": Replace(jnp.asarray(want, jnp.float32))}))
    np.testing.assert_allclose(out, downstream, rtol=1e-4, atol=1e-4)
    # An ablation of nothing changes nothing (the reconstruction error stays in the layer).
    plain = np.asarray(module.apply(variables, x))
    none, kept = _edit(module, variables, x, "conv3", FeatureEdit(basis, params, Ablate(np.zeros(U, bool))))
    np.testing.assert_array_equal(none, plain)
    np.testing.assert_array_equal(kept, np.asarray(acts["conv3"]))
    # Many ablations in one vmapped call equal the single ones.
    masks = np.eye(U, dtype=bool)[[f, 0, 7]]
    sweep = jax.jit(jax.vmap(lambda m: run(module, variables, x, edits={"conv3": FeatureEdit(basis, params, Ablate(m))}
                                           )))(masks)
    for m, row in zip(masks, np.asarray(sweep)):
        np.testing.assert_allclose(row, _edit(module, variables, x, "conv3", FeatureEdit(basis, params, Ablate(m)))[0],
                                   rtol=1e-5, atol=1e-5)


def test_generator_feature_insertion_and_ablation_equal_numpy():
    module, variables = toy_generator()
    z = sample_z(3, seed=4)
    _, acts = capture(module, variables, z, ["layer4"])
    a = np.asarray(acts["layer4"], np.float64)                          # [3, 8, 8, 16]
    # An SAE feature inserted with code 2.5 inside a region (GANPaint style).
    params = random_sae(np.random.default_rng(2), 16, U)
    basis = sae.TopKSAE(k=KSAE)
    codes, _ = numpy_topk(params, a, KSAE)
    codes = codes.reshape(a.shape[:-1] + (U,))
    region = np.zeros((8, 8), np.float32)
    region[2:5, 1:6] = 1
    f = 3
    want = a + (region[..., None] * (2.5 - codes[..., f:f + 1])) * params["w_dec"][f]
    out, edited = _edit(module, variables, z, "layer4", FeatureEdit(basis, params, SetUnits([f], 2.5, region)))
    np.testing.assert_allclose(edited, want, rtol=1e-4, atol=1e-5)
    image = np.asarray(run(module, variables, z, edits={"layer4": Replace(jnp.asarray(want, jnp.float32))}))
    np.testing.assert_allclose(out, image, rtol=1e-4, atol=1e-5)
    # A rotated unit removed: its component along its row of the rotation, nothing else.
    r = random_rotation_powers(16, [0.5], 1)[0].astype(np.float32)
    rot = Linear(label="rotation:0.5:1")
    want = a - (a @ r[5])[..., None] * r[5]
    _, edited = _edit(module, variables, z, "layer4", FeatureEdit(rot, {"matrix": r}, Ablate([5])))
    np.testing.assert_allclose(edited, want, rtol=1e-4, atol=1e-5)


def test_feature_edit_errors_name_the_problem(classifier):
    module, variables, x = classifier
    with pytest.raises(LayerError, match="cannot act on a layer with 16 channels"):
        run(module, variables, x, edits={"conv3": FeatureEdit(sae.TopKSAE(k=2), random_sae(
            np.random.default_rng(0), 8, 10), Ablate([1]))})
    with pytest.raises(LayerError, match="must be a jaxdissect.bases.Basis"):
        FeatureEdit("sae", {}, Ablate([1]))
