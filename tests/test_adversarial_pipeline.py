"""Adversarial unit analysis on a planted classifier: class k is driven by unit k's peak activation."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect.interventions import classifier as ci
from jaxdissect.pipelines.ablate_classifier import classifier_ablation_experiment
from jaxdissect.interventions.common import InterventionError
from jaxdissect.pipelines import adversarial as adv

CLASSES = ["bedroom", "kitchen", "ski_resort", "hangar/indoor", "beach", "forest"]
K, U = len(CLASSES), 10  # units 0..5 drive classes 0..5; units 6..9 feed nothing


class Features(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(U, (3, 3), padding="SAME", name="conv")(x))


class Planted(nn.Module):
    @nn.compact
    def __call__(self, x):
        peak = Features(name="features")(x).max((1, 2))
        return 4.0 * peak[:, :K] + self.param("bias", nn.initializers.zeros, (K,))  # logit k: unit k's peak


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model = Planted()
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (60, 8, 8, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), images[:1])
    # balance the classes: each logit's bias is minus its median over the images
    bias = -np.median(np.asarray(model.apply(variables, images)), axis=0)
    variables = {"params": {**variables["params"], "bias": jnp.asarray(bias, jnp.float32)}}
    labels = np.asarray(jnp.argmax(model.apply(variables, images), -1)).astype(np.int32)
    source = ci.ArraySource(images, labels, CLASSES)
    ablation = str(tmp_path_factory.mktemp("ablation"))
    classifier_ablation_experiment(model, variables, "features", source, source, ablation,
                                   class_names=CLASSES, sizes=(1, 2), batch_size=30)
    return model, variables, source, ablation


@pytest.mark.slow
def test_attack_raises_the_planted_unit_and_grouping_shows_it(planted, tmp_path):
    model, variables, source, ablation = planted
    targets = ["bedroom", "ski_resort", "beach"]
    out = str(tmp_path / "adv")
    run = lambda: adv.adversarial_units(  # noqa: E731
        model, variables, "features", source, out, ablation_dir=ablation, class_names=CLASSES,
        targets=targets, num_images=8, normalization="pt", batch_size=4, examples=4,
        attack_options={"steps": 150, "binary_search_steps": 4, "initial_const": 1.0})
    summary = run()
    order = np.load(os.path.join(ablation, "results.npz"))["order"]
    for name in targets:
        t = CLASSES.index(name)
        assert order[t, 0] == t  # the ablation experiment found the planted unit
        s = summary["targets"][name]
        assert s["attacked"] == 8 and s["succeeded"] >= 6
        z = np.load(os.path.join(out, adv._safe(name), "images.npz"))
        ok = z["success"]
        assert (z["adversarial_prediction"][ok] == t).all()
        assert (z["source"] != t).all() and (source.labels[z["index"]] != t).all()
        raised = (z["adversarial_peak"] - z["original_peak"])[ok].mean(0)
        assert raised.argmax() == t, raised
        g = s["groups"]
        assert g["target"]["mean"] > g["other"]["mean"] + g["other"]["ci99"]
        assert z["original"].shape == z["adversarial"].shape == (8, 8, 8, 3)
        assert os.path.exists(os.path.join(out, adv._safe(name), "examples.png"))
    assert json.load(open(os.path.join(out, "adversarial.json")))["targets"].keys() == set(targets)
    assert os.path.getsize(os.path.join(out, "adversarial.png")) > 0
    # the selection: first 8 images (in order) whose label and prediction are not the target
    first = [i for i in range(len(source)) if source.labels[i] != 0][:8]
    np.testing.assert_array_equal(np.load(os.path.join(out, "bedroom", "images.npz"))["index"], first)
    # resumed: restored from the finished streams, same numbers
    assert run() == json.load(open(os.path.join(out, "adversarial.json")))


def test_group_changes_against_loops():
    rng = np.random.default_rng(1)
    delta = rng.uniform(0, 1, (5, 9))
    order = np.stack([rng.permutation(9) for _ in range(3)])
    sources = np.array([0, 1, 1, 0, 1])
    g = adv.group_changes(delta, order, 2, sources, top=3)
    for i in range(5):
        t, s = set(order[2, :3]), set(order[sources[i], :3])
        others = [u for u in range(9) if u not in t | s]
        assert np.isclose(g["target"][i], np.mean([delta[i, u] for u in t]))
        assert np.isclose(g["source"][i], np.mean([delta[i, u] for u in s]))
        assert np.isclose(g["other"][i], np.mean([delta[i, u] for u in others]))


def test_places_spellings():
    names = ["bedroom", "hangar-indoor", "volleyball_court-outdoor"]
    np.testing.assert_array_equal(adv.resolve_targets(names, ["hangar/indoor", "volleyball_court-outdoor"]), [1, 2])
    np.testing.assert_array_equal(adv.resolve_targets(["hangar/indoor"], ["hangar-indoor"]), [0])


def test_bad_input(planted, tmp_path):
    model, variables, source, ablation = planted
    common = dict(class_names=CLASSES, num_images=2, normalization="pt")
    with pytest.raises(InterventionError, match=r"no classifier ablation result .*launch.ablate_classifier"):
        adv.adversarial_units(model, variables, "features", source, str(tmp_path / "a"),
                              ablation_dir=str(tmp_path / "none"), targets=["bedroom"], **common)
    with pytest.raises(InterventionError, match="unknown class 'bedrom'; did you mean 'bedroom'"):
        adv.adversarial_units(model, variables, "features", source, str(tmp_path / "b"),
                              ablation_dir=ablation, targets=["bedrom"], **common)
    with pytest.raises(InterventionError, match="unknown layer 'feature'"):
        adv.adversarial_units(model, variables, "feature", source, str(tmp_path / "c"),
                              ablation_dir=ablation, targets=["bedroom"], **common)
    with pytest.raises(InterventionError, match="unknown attack"):
        adv.adversarial_units(model, variables, "features", source, str(tmp_path / "d"),
                              ablation_dir=ablation, targets=["bedroom"], attack="fgsm", **common)


def test_launcher_names_the_missing_ablation_command(tmp_path):
    from PIL import Image

    from jaxdissect.checkpoint import save_model
    from jaxdissect.models.small_cnn import SmallCNN
    from launch import adversarial as launcher

    for c in ("bedroom", "kitchen"):
        os.makedirs(tmp_path / "val" / c)
        Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "val" / c / "a.jpg")
    module = SmallCNN(num_classes=2, widths=(4, 4, 4, 4))
    variables = jax.tree.map(np.asarray, module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    save_model(str(tmp_path / "model"), module, variables, metadata={
        "classes": ["bedroom", "kitchen"], "preprocessing": {"normalization": "imagenet", "resize": 256, "crop": 32}})
    with pytest.raises(InterventionError, match=r"python -m launch.ablate_classifier .*--layer=conv4"):
        launcher.run(str(tmp_path / "model"), f"places:{tmp_path / 'val'}", str(tmp_path / "nothing"),
                     str(tmp_path / "out"), layer="conv4", targets=["bedroom"], num_images=1)
