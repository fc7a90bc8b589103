"""Bases in the pipelines (issue 26): a dissection in several bases in one run, learned bases trained from the
run's own data and cached, the classifier sweep and the generator experiments on a basis's features, and the
comparison of bases with the random-init control.

References are independent of the code under test: the planted model's ground truth (concept ``k`` of layer
``mixed`` lies along column ``k`` of a known rotation), separate dissections of explicit views, and NumPy
recomputations of a layer's output with a feature's decoded contribution removed.
"""

import csv
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_topk, random_sae

import jaxdissect
from jaxdissect.bases import sae
from jaxdissect.config import ConfigError, DissectConfig, DissectError
from jaxdissect.interventions import classifier as ci
from jaxdissect.interventions import generator as gi
from jaxdissect.layers import Replace, capture, run
from jaxdissect.models import planted
from jaxdissect.pipelines import bases as bases_lib
from jaxdissect.pipelines import compare as C
from jaxdissect.rotation import random_rotation_powers

BASES = "neurons;rotation:1;sae:2,k=2;probe:net2vec"
TRAINING = {"sae_batches": 60, "sae_minibatch": 256, "sae_learning_rate": 1e-2}
Q = planted.rotation()


def read(path) -> str:
    return pathlib.Path(path).read_text()


# --------------------------------------------------------------------------
# Settings


def test_basis_settings_have_their_own_group():
    plain = DissectConfig().identity()
    assert not {"basis", "sae_batches", "sae_minibatch", "sae_learning_rate", "probe_epochs"} & set(plain)
    with_bases = DissectConfig(basis="neurons; sae:8").identity()
    assert with_bases["basis"] == "neurons; sae:8" and with_bases["sae_batches"] == 200
    assert DissectConfig(rotation="0.5").bases == "rotation:0.5:1"         # --rotation names the same basis
    assert DissectConfig(basis="sae:8").bases == "sae:8"
    with pytest.raises(ConfigError, match=r"basis='pca': unknown basis 'pca'") as e:
        DissectConfig(basis="pca")
    assert e.value.render("--").startswith("--basis=")
    with pytest.raises(ConfigError, match="not both"):
        DissectConfig(basis="rotation:1", rotation="1")
    with pytest.raises(ConfigError, match="sae_batches=0"):
        DissectConfig(basis="sae:2", sae_batches=0)


# --------------------------------------------------------------------------
# A dissection in several bases


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    module, variables = planted.planted_model()
    data = planted.PlantedScenes(64)
    out, cache = str(root / "out"), str(root / "cache")
    results = jaxdissect.dissect(module, variables, ["mixed"], data, "dataset", basis=BASES, quantile=0.1,
                                 batch_size=16, topk=5, thumbsize=16, output_dir=out, cache_dir=cache,
                                 progress=False, **TRAINING)
    return module, variables, data, out, cache, results


@pytest.mark.slow
def test_every_basis_is_a_view_of_one_run(planted_run):
    module, variables, data, out, _, results = planted_run
    assert list(results) == ["mixed", "mixed@rotation:1:1", "mixed@sae:2,k=2", "mixed@probe:net2vec"]
    assert [len(r.thresholds) for r in results.values()] == [16, 16, 32, 16]
    # The rotation view equals a separate dissection of the layer rotated by the matrix built independently.
    matrix = random_rotation_powers(16, [1.0], 1)[0]
    alone = jaxdissect.dissect(module, variables, [], data, "dataset", quantile=0.1, batch_size=16, topk=5,
                               progress=False, views={"r": ("mixed", matrix)})["r"]
    rotated = results["mixed@rotation:1:1"]
    np.testing.assert_array_equal(rotated.thresholds, alone.thresholds)
    np.testing.assert_array_equal(rotated.intersection, alone.intersection)
    # The SAE view equals a dissection of the same features given as an explicit view.
    basis, params, _ = bases_lib.load_view_basis(os.path.join(out, "mixed@sae:2,k=2"))
    explicit = jaxdissect.dissect(module, variables, [], data, "dataset", quantile=0.1, batch_size=16, topk=5,
                                  progress=False, views={"s": ("mixed", basis, params)})["s"]
    np.testing.assert_array_equal(results["mixed@sae:2,k=2"].thresholds, explicit.thresholds)
    np.testing.assert_array_equal(results["mixed@sae:2,k=2"].iou, explicit.iou)
    # The passes read the SAE's sparse codes; its dense features give the same results bit for bit.
    dense = jaxdissect.dissect(module, variables, [], data, "dataset", quantile=0.1, batch_size=16, topk=5,
                               progress=False, views={"d": ("mixed", DenseSAE(k=basis.k), params)})["d"]
    for key in ("thresholds", "intersection", "active", "top_values", "top_index", "act_mean", "act_max"):
        assert np.asarray(getattr(dense, key)).tobytes() == np.asarray(getattr(explicit, key)).tobytes(), key


class DenseSAE(sae.TopKSAE):
    """The same SAE giving the statistics its dense ``[..., U]`` features instead of sparse codes."""

    def codes(self, params, acts):
        return self.encode(params, acts)


@pytest.mark.slow
def test_learned_bases_recover_the_planted_concepts(planted_run):
    _, _, _, out, _, results = planted_run
    _, params, info = bases_lib.load_view_basis(os.path.join(out, "mixed@sae:2,k=2"))
    w = params["w_dec"] / np.linalg.norm(params["w_dec"], axis=1, keepdims=True)
    cos = w @ Q                                                        # [features, concepts]
    assert (cos.max(0) > 0.9).all(), np.round(cos.max(0), 3)           # from the run's data alone
    aligned = cos.argmax(0)
    features = results["mixed@sae:2,k=2"]
    np.testing.assert_array_equal(features.label[aligned], np.arange(1, 17))
    neurons = results["mixed"]
    assert features.label_iou[aligned].min() > 2 * neurons.label_iou.max(), (features.label_iou[aligned],
                                                                              neurons.label_iou)
    assert info["curve"]["fvu"][-1] < 0.05 and info["settings"]["num_batches"] == TRAINING["sae_batches"]
    # The probes: unit k is concept k's direction, labelled with it, and matches the planted direction.
    report = json.loads(read(os.path.join(out, "mixed@probe:net2vec", "report.json")))
    assert [u["label"] for u in report["units"]] == [u["concept"] for u in report["units"]] == \
        [f"concept{k}" for k in range(16)]
    assert min(u["heldout_iou"] for u in report["units"]) > 0.5
    _, probe_params, _ = bases_lib.load_view_basis(os.path.join(out, "mixed@probe:net2vec"))
    m = probe_params["matrix"] / np.linalg.norm(probe_params["matrix"], axis=1, keepdims=True)
    assert ((m * Q.T).sum(1) > 0.9).all()


@pytest.mark.slow
def test_report_shows_the_training_and_keeps_the_basis(planted_run):
    _, _, _, out, _, _ = planted_run
    page = read(os.path.join(out, "index.html"))
    for view, caption in (("mixed@sae:2,k=2", "SAE training curve"),
                          ("mixed@probe:net2vec", "probe held-out IoU per concept")):
        assert os.path.getsize(os.path.join(out, view, "basis.svg")) > 1000
        assert caption in page
    assert "SAE FVU (training)" in page and "probe held-out IoU (mean)" in page
    assert not os.path.exists(os.path.join(out, "mixed", "basis.svg"))     # neurons and rotations: nothing added
    assert bases_lib.load_view_basis(os.path.join(out, "mixed@rotation:1:1")) is None


@pytest.mark.slow
def test_learned_bases_are_cached_and_the_run_resumes(planted_run, tmp_path, monkeypatch):
    module, variables, data, out, cache, results = planted_run
    assert sorted(n.split("-")[0] for n in os.listdir(os.path.join(cache, "bases")) if not n.endswith(".lock")) == \
        ["probe", "sae"]

    def untouched(*args, **kwargs):
        raise AssertionError("a cached basis was trained again")

    monkeypatch.setattr(sae, "train", untouched)
    monkeypatch.setattr(bases_lib.probe, "train", untouched)
    again = jaxdissect.dissect(module, variables, ["mixed"], data, "dataset", basis=BASES, quantile=0.1,
                               batch_size=16, topk=5, thumbsize=16, output_dir=out, cache_dir=cache, progress=False,
                               **TRAINING)
    for view, r in results.items():
        np.testing.assert_array_equal(again[view].thresholds, r.thresholds)
    monkeypatch.undo()
    with pytest.raises(DissectError, match="other settings"):
        jaxdissect.dissect(module, variables, ["mixed"], data, "dataset", basis=BASES, quantile=0.1,
                           batch_size=16, output_dir=out, cache_dir=cache, progress=False,
                           **{**TRAINING, "sae_batches": 61})


def test_a_probe_needs_labels(tmp_path):
    module, variables = planted.planted_model()
    with pytest.raises(DissectError, match="probe:net2vec learns concept directions from segmentation"):
        jaxdissect.dissect(module, variables, ["mixed"], planted.PlantedScenes(16), None, basis="probe:net2vec",
                           cache_dir=str(tmp_path), progress=False)


@pytest.mark.slow
def test_launcher_dissects_bases(tmp_path, monkeypatch):
    """``launch.dissect --basis=...`` as the user types it, on a tiny demo model."""
    from launcher_cli import cli, tiny_demo_cache

    cache = str(tmp_path / "cache")
    tiny_demo_cache(cache)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXDISSECT_CACHE", cache)
    code, out, err = cli("dissect", "--layers=conv3", "--basis=neurons;sae:2,k=4", "--num_images=32",
                         "--sae_batches=8", "--thumbsize=16", "--topk=5", "--output_dir=out")
    assert code == 0, err[-3000:]
    assert "conv3@sae:2,k=4: " in out and os.path.exists(tmp_path / "out" / "conv3@sae:2,k=4" / "basis" / "params.npz")
    launch = json.loads(read(tmp_path / "out" / "launch.json"))
    assert launch["basis"] == "neurons;sae:2,k=4" and launch["sae_batches"] == 8
    code, _, err = cli("dissect", "--basis=pca")
    assert code != 0 and err.strip().splitlines()[-1].startswith("error: --basis='pca': unknown basis")
    code, _, err = cli("dissect", "--basis=rotation:1", "--rotation=1")
    assert code != 0 and "not both" in err


# --------------------------------------------------------------------------
# Causal tests: the classifier sweep and the generator experiments on a basis's features


@pytest.fixture(scope="module")
def classifier():
    from jaxdissect.models.small_cnn import SmallCNN

    module = SmallCNN(num_classes=5, widths=(8, 16, 16, 16))
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (12, 32, 32, 3)).astype(np.float32)
    variables = module.init(jax.random.PRNGKey(0), x[:1])
    labels = rng.integers(0, 5, 12).astype(np.int32)
    return module, variables, x, labels


def _counts(logits, labels, classes=5):
    pred = np.asarray(logits).argmax(-1)
    return (np.bincount(pred, minlength=classes), np.bincount(labels[pred == labels], minlength=classes))


def _top_two_margin(logits):
    s = np.sort(np.asarray(logits), -1)
    return (s[..., -1] - s[..., -2]).min()


def test_feature_ablation_in_the_sweep_equals_numpy(classifier):
    module, variables, x, labels = classifier
    units, k = 24, 4
    params = random_sae(np.random.default_rng(5), 16, units)
    basis = sae.TopKSAE(k=k)
    a = np.asarray(capture(module, variables, x, ["conv3"])[1]["conv3"], np.float64)
    codes, _ = numpy_topk(params, a, k)
    codes = codes.reshape(a.shape[:-1] + (units,))

    def reference(removed):
        """The layer's output with the features' decoded contributions removed, run through the rest."""
        edited = a - np.einsum("nhwu,uc->nhwc", codes[..., removed], params["w_dec"][removed])
        logits = run(module, variables, x, edits={"conv3": Replace(jnp.asarray(edited, jnp.float32))})
        assert _top_two_margin(logits) > 1e-4                       # no tie a rounding could flip
        return _counts(logits, labels)

    base, per = ci.single_unit_sweep(module, variables, "conv3", (x, labels), batch_size=4,
                                     basis=(basis, params))
    assert per["pred"].shape == (units, 5)
    changed = 0
    for f in range(units):
        pred, correct = reference([f])
        np.testing.assert_array_equal(per["pred"][f], pred)
        np.testing.assert_array_equal(per["correct"][f], correct)
        changed += not np.array_equal(pred, base["pred"])
    assert changed > 0                                                 # some ablations change predictions
    sets = [[0, 3, 7], list(range(12)), np.zeros(units, bool)]
    clean, swept = ci.ablation_sweep(module, variables, "conv3", sets, (x, labels), batch_size=4,
                                     basis=(basis, params))
    for i, removed in enumerate(sets[:2]):
        pred, correct = reference(removed)
        np.testing.assert_array_equal(swept["pred"][i], pred)
        np.testing.assert_array_equal(swept["correct"][i], correct)
    # Ablating nothing changes nothing: the reconstruction error stays in the layer.
    np.testing.assert_array_equal(swept["pred"][2], clean["pred"])
    np.testing.assert_array_equal(clean["pred"], _counts(module.apply(variables, x), labels)[0])


def test_experiment_pieces_record_their_basis(classifier, tmp_path):
    from jaxdissect.interventions.common import InterventionError
    from jaxdissect.pipelines.ablate_classifier import classifier_ablation_experiment

    module, variables, x, labels = classifier
    params = random_sae(np.random.default_rng(5), 16, 24)
    summary = classifier_ablation_experiment(module, variables, "conv3", (x, labels), (x, labels), str(tmp_path),
                                             sizes=(1, 2), basis=(sae.TopKSAE(k=4), params), batch_size=4)
    assert summary["num_units"] == 24 and summary["basis"] == "sae"
    assert json.loads(read(tmp_path / "basis.json"))["kind"] == "sae"
    with pytest.raises(InterventionError, match="features of another basis"):
        classifier_ablation_experiment(module, variables, "conv3", (x, labels), (x, labels), str(tmp_path),
                                       sizes=(1, 2), batch_size=4)


@pytest.mark.slow
def test_generator_feature_ablation_equals_numpy():
    from jaxdissect.bases import Neurons
    from jaxdissect.models import toy_generator as T

    def segment(images):
        return T.color_segment(images, downsample=1)

    def fractions(images):
        seg = np.asarray(segment(images))[:, 0]
        return np.stack([(seg == label).mean(axis=(1, 2)) for label in range(4)], axis=1)

    module, variables = T.toy_generator()
    z = T.sample_z(12, seed=1)
    units, k = 24, 3
    params = random_sae(np.random.default_rng(7), 16, units)
    a = np.asarray(capture(module, variables, z, ["layer4"])[1]["layer4"], np.float64)
    codes, _ = numpy_topk(params, a, k)
    codes = codes.reshape(a.shape[:-1] + (units,))
    sets = [[int(np.argmax((codes > 0).sum((0, 1, 2))))], [0, 5, 9], np.zeros(units, bool)]
    stats = gi.ablation_segstats(module, variables, "layer4", sets, z, segment, 4, batch_size=5,
                                 basis=(sae.TopKSAE(k=k), params))
    clean = fractions(module.apply(variables, z))
    for i, removed in enumerate(sets[:2]):
        edited = a - np.einsum("nhwu,uc->nhwc", codes[..., removed], params["w_dec"][removed])
        naive = fractions(run(module, variables, z, edits={"layer4": Replace(jnp.asarray(edited, jnp.float32))}))
        np.testing.assert_allclose(stats.ablated.mean[i], naive.mean(0), atol=1e-6)
        np.testing.assert_allclose(stats.delta.mean[i], (naive - clean).mean(0), atol=1e-6)
    assert np.abs(stats.delta.mean[0]).max() > 0                       # the active feature mattered
    np.testing.assert_array_equal(stats.delta.mean[2], 0)              # ablating nothing changes nothing
    # Inserting through the identity basis is inserting units.
    plain = gi.insertion_context(module, variables, "layer4", [0, 1], [3.0, 3.0], z, segment, 4,
                                 cells=[(2, 2), (5, 6)], batch_size=6)
    through = gi.insertion_context(module, variables, "layer4", [0, 1], [3.0, 3.0], z, segment, 4,
                                   cells=[(2, 2), (5, 6)], batch_size=6, basis=(Neurons(), {}))
    np.testing.assert_array_equal(plain.delta.total, through.delta.total)


# --------------------------------------------------------------------------
# The comparison


def _member(n=None):
    module, variables = planted.planted_model()
    return C.Member("planted", module, variables, ["mixed"])


@pytest.mark.slow
def test_rotations_are_rotation_bases(tmp_path):
    data = planted.PlantedScenes(32)
    old = C.compare([_member()], data, rotations=[0.0, 1.0], quantile=0.1, batch_size=16, topk=3, progress=False)
    new = C.compare([_member()], data, bases="rotation:0;rotation:1", quantile=0.1, batch_size=16, topk=3,
                    progress=False, cache_dir=str(tmp_path))
    assert list(old["results"]) == list(new["results"]) == ["planted.mixed@0", "planted.mixed@1"]
    for view, r in old["results"].items():
        np.testing.assert_array_equal(new["results"][view].thresholds, r.thresholds)
        np.testing.assert_array_equal(new["results"][view].iou, r.iou)
    assert [r["basis"] for r in new["rows"]] == ["rotation:0:1", "rotation:1:1"] and "basis" not in old["rows"][0]
    with pytest.raises(C.CompareError, match="given twice"):
        C.compare([_member()], data, rotations=[1.0], bases="rotation:1", progress=False)
    with pytest.raises(C.CompareError, match="the controls are random_init"):
        C.compare([_member()], data, control="trained", progress=False)


@pytest.mark.slow
def test_planted_comparison_with_the_control(tmp_path):
    """Neurons score low, the SAE recovers the planted labels, the probes match; the control is there."""
    out = str(tmp_path / "cmp")
    got = C.compare([_member()], planted.PlantedScenes(128), bases="neurons;sae:2,k=2;probe:net2vec",
                    control="random_init", quantile=0.1, miniou=0.3, batch_size=16, topk=3, thumbsize=16,
                    significance=True, permutations=50, output_dir=out, progress=False, cache_dir=str(tmp_path),
                    **TRAINING)
    rows = {(r["model"], r["basis"]): r for r in got["rows"]}
    assert set(rows) == {(m, b) for m in ("planted", "planted-random_init")
                         for b in ("neurons", "sae:2,k=2", "probe:net2vec")}
    neurons, features, probes = (rows["planted", b] for b in ("neurons", "sae:2,k=2", "probe:net2vec"))
    assert neurons["unique_top"] <= 4 and features["unique_top"] == 16 and probes["unique_top"] == 16
    assert features["mean_iou"] > 0.6 and probes["mean_iou"] > 0.6 and neurons["mean_iou"] < 0.5 * features["mean_iou"]
    assert features["fvu"] < 0.05 and probes["heldout_iou"] > 0.5 and features["dead"] <= 16
    assert features["significant"] >= 16 and neurons["accuracy_drop_mean"] > features["accuracy_drop_mean"] > 0
    assert rows["planted-random_init", "neurons"]["control"] == "random_init"
    table = list(csv.DictReader(read(os.path.join(out, "compare.csv")).splitlines()))
    assert len(table) == 6 and {"basis", "control", "significant", "mean_iou", "fvu", "accuracy_drop_mean"} <= set(
        table[0])
    assert read(os.path.join(out, "bases.svg")).lstrip().startswith("<?xml")
    assert "bases.svg" in read(os.path.join(out, "index.html"))


@pytest.mark.slow
def test_no_flag_comparison_on_the_demo(tmp_path, monkeypatch):
    """``python -m launch.compare`` with no flags: the demo CNN's bases and their random-init control."""
    from launcher_cli import cli, tiny_demo_cache

    cache = str(tmp_path / "cache")
    tiny_demo_cache(cache)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXDISSECT_CACHE", cache)
    code, out, err = cli("compare")
    assert code == 0, err[-3000:]
    folder = tmp_path / "results" / "compare-demo-random_init-bases-synthetic-dataset"
    rows = list(csv.DictReader(read(folder / "compare.csv").splitlines()))
    assert [(r["model"], r["basis"]) for r in rows] == [
        (m, b) for m in ("demo", "demo-random_init")
        for b in ("neurons", "rotation:1:1", "sae:2,k=8", "sae:4,k=8", "probe:net2vec")]
    for r in rows:
        assert r["significant"] != "" and r["accuracy_drop_mean"] != "" and r["mean_iou"] != ""
        assert (r["fvu"] != "") == r["basis"].startswith("sae") and (r["heldout_iou"] != "") == r["basis"].startswith(
            "probe")
    assert (folder / "bases.svg").exists() and "demo conv4 sae:4,k=8:" in out
