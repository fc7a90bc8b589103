"""Classifier unit ablation: exact per-class counts against PyTorch, a planted unit, naive recomputation."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect.interventions import classifier as ci
from jaxdissect.pipelines import ablate_classifier as experiment
from jaxdissect.layers import Ablate, run

# ---- independent reference counts ---------------------------------------------


def ref_counts(labels, preds, num_classes):
    """Per-class true/pred/correct by explicit loops (independent of the code under test)."""
    true = [sum(1 for y in labels if y == c) for c in range(num_classes)]
    pred = [sum(1 for p in preds if p == c) for c in range(num_classes)]
    correct = [sum(1 for y, p in zip(labels, preds) if y == p == c) for c in range(num_classes)]
    return np.array(true), np.array(pred), np.array(correct)


def ref_metrics(labels, preds, num_classes):
    true, pred, correct = ref_counts(labels, preds, num_classes)
    n = len(labels)
    out = {}
    for c in range(num_classes):
        tn = (n - true[c]) - (pred[c] - correct[c])
        rec = correct[c] / true[c] if true[c] else np.nan
        tnr = tn / (n - true[c])
        out.setdefault("recall", []).append(rec)
        out.setdefault("true_negative_rate", []).append(tnr)
        out.setdefault("precision", []).append(correct[c] / pred[c] if pred[c] else np.nan)
        out.setdefault("accuracy", []).append((correct[c] + tn) / n)
        out.setdefault("balanced_accuracy", []).append((rec + tnr) / 2)
    return {k: np.array(v) for k, v in out.items()}


# ---- a small classifier shaped like VGG's top (conv -> relu -> pool -> dense) --

UNITS, CLASSES = 8, 5


class Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.relu(nn.Conv(UNITS, (3, 3), padding="SAME", name="conv2")(x))
        x = x.mean(axis=(1, 2))
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        return nn.Dense(CLASSES, name="fc2")(x)


class ToyTorch:
    """The same network in PyTorch (NCHW), with the original's in-place unit-zeroing rule on conv2's ReLU."""

    def __init__(self, params):
        import torch

        def conv(p):
            m = torch.nn.Conv2d(p["kernel"].shape[2], p["kernel"].shape[3], 3, padding=1)
            m.weight.data = torch.tensor(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
            m.bias.data = torch.tensor(np.asarray(p["bias"]))
            return m

        def dense(p):
            m = torch.nn.Linear(*p["kernel"].shape)
            m.weight.data = torch.tensor(np.asarray(p["kernel"]).T.copy())
            m.bias.data = torch.tensor(np.asarray(p["bias"]))
            return m

        self.torch = torch
        self.conv1, self.conv2 = conv(params["conv1"]), conv(params["conv2"])
        self.fc1, self.fc2 = dense(params["fc1"]), dense(params["fc2"])

    def predict(self, x, units=()):
        t = self.torch
        with t.no_grad():
            h = t.relu(self.conv1(t.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())))
            h = t.relu(self.conv2(h))
            h[:, list(units)] = 0
            h = t.relu(self.fc1(h.mean(dim=(2, 3))))
            return self.fc2(h).argmax(dim=1).numpy()


@pytest.fixture(scope="module")
def toy():
    model = Toy()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(37, 6, 6, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=37).astype(np.int32)
    variables = model.init(jax.random.key(0), images[:1])
    return model, variables, images, labels


def test_counts_and_metrics_match_pytorch_for_several_unit_sets(toy):
    pytest.importorskip("torch")
    model, variables, images, labels = toy
    ref = ToyTorch(variables["params"])
    unit_sets = [[0], [3, 5], [1, 2, 4, 6], list(range(UNITS - 1))]
    # batch_size 8 does not divide 37: the padded rows of the last batch must not count.
    base, sets = ci.ablation_sweep(model, variables, "conv2", unit_sets, (images, labels), batch_size=8)
    for i, units in enumerate([[]] + unit_sets):
        preds = ref.predict(images, units)
        got = base if i == 0 else {k: v[i - 1] if np.ndim(v) == 2 else v for k, v in sets.items()}
        true, pred, correct = ref_counts(labels, preds, CLASSES)
        np.testing.assert_array_equal(got["true"], true)
        np.testing.assert_array_equal(got["pred"], pred)
        np.testing.assert_array_equal(got["correct"], correct)
        expected = ref_metrics(labels, preds, CLASSES)
        for key in ci.METRICS:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, equal_nan=True)
    assert base["total"] == sets["total"] == 37
    # The sets did change predictions (the comparison could fail).
    assert any((sets["pred"][i] != base["pred"]).any() for i in range(len(unit_sets)))
    one = ci.ablate_units(model, variables, "conv2", [3, 5], (images, labels), batch_size=16)
    np.testing.assert_array_equal(one["pred"], sets["pred"][1])


def test_cached_single_unit_sweep_equals_naive_recomputation(toy):
    model, variables, images, labels = toy
    base, per_unit = ci.single_unit_sweep(model, variables, "conv2", (images, labels), batch_size=16)
    assert per_unit["pred"].shape == (UNITS, CLASSES)
    full = jax.jit(lambda e: run(model, variables, images, edits={"conv2": e}))
    for u in range(UNITS):
        preds = np.asarray(full(Ablate(np.arange(UNITS) == u))).argmax(-1)
        true, pred, correct = ref_counts(labels, preds, CLASSES)
        np.testing.assert_array_equal(per_unit["pred"][u], pred)
        np.testing.assert_array_equal(per_unit["correct"][u], correct)
    clean_preds = np.asarray(model.apply(variables, images)).argmax(-1)
    np.testing.assert_array_equal(base["pred"], ref_counts(labels, clean_preds, CLASSES)[1])


# ---- planted: unit k carries class k ---------------------------------------------


class Planted(nn.Module):
    """Unit k of ``feat`` = relu(input channel k); logit k = mean of unit k; units 4, 5 are unused."""

    @nn.compact
    def __call__(self, x):
        eye = np.zeros((1, 1, 4, 6), np.float32)
        eye[0, 0, np.arange(4), np.arange(4)] = 1.0
        eye[0, 0, :, 4:] = 0.3
        feat = nn.Conv(6, (1, 1), name="feat", kernel_init=lambda *_: jnp.asarray(eye))(x)
        feat = nn.relu(feat)
        head = np.zeros((6, 4), np.float32)
        head[np.arange(4), np.arange(4)] = 1.0
        return nn.Dense(4, name="head", kernel_init=lambda *_: jnp.asarray(head))(feat.mean(axis=(1, 2)))


def planted_data(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n).astype(np.int32)
    x = rng.uniform(0, 0.5, size=(n, 4, 4, 4)).astype(np.float32)
    x[np.arange(n), :, :, labels] += 1.0
    return x, labels


def test_planted_unit_destroys_its_class_only():
    model = Planted()
    x, labels = planted_data(40, 1)
    variables = model.init(jax.random.key(0), x[:1])
    res = ci.ablate_units(model, variables, "feat", [2], (x, labels), batch_size=16)
    base = res["baseline"]
    np.testing.assert_array_equal(base["recall"], 1.0)
    assert res["recall"][2] == 0 and res["pred"][2] == 0
    np.testing.assert_array_equal(res["recall"][[0, 1, 3]], 1.0)
    _, per_unit = ci.single_unit_sweep(model, variables, "feat", (x, labels), batch_size=16)
    order = ci.rank_units(per_unit["balanced_accuracy"])
    np.testing.assert_array_equal(order[:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(per_unit["balanced_accuracy"][4], base["balanced_accuracy"])
    np.testing.assert_array_equal(ci.unit_importance(order, top=1), [1, 1, 1, 1, 0, 0])


def test_experiment_outputs_and_resumes(tmp_path, monkeypatch):
    model = Planted()
    val, train = planted_data(24, 2), planted_data(32, 3)
    variables = model.init(jax.random.key(0), val[0][:1])
    report = {"header": {"name": "feat"}, "units": [
        {"unit": u, "iou": 0.1 * u, "label": f"concept{u}", "cat": "object"} for u in range(6)]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    names = ["bedroom", "kitchen", "ski_resort", "church-outdoor"]
    kwargs = dict(class_names=names, sizes=(1, 2, 5), plot_class="ski_resort", full_classes=["ski_resort"],
                  iou_path=str(tmp_path / "report.json"), batch_size=8)
    summary = experiment.classifier_ablation_experiment(model, variables, "feat", val, train, str(tmp_path / "w"),
                                                        **kwargs)
    ski = summary["classes"]["ski_resort"]
    assert ski["top_units"][0]["unit"] == 2 and ski["top_units"][0]["label"] == "concept2"
    assert ski["ablate_top_ba"]["1"] == 0.5  # recall 0, TNR 1
    # Keeping only unit 2 leaves logit 2 the only non-zero one: everything is called ski_resort.
    assert ski["keep_only_top_ba"]["1"] == 0.5 and ski["keep_only_top_ba"]["2"] > 0.5
    assert summary["mean_balanced_accuracy"]["val_baseline"] == 1.0
    assert summary["importance_histogram"]["units"][:2] == [2, 0]
    curve = summary["all_n"]["ski_resort"]
    assert len(curve["ablate_top_ba"]) == 5 and curve["ablate_top_ba"][0] == 0.5
    for n in (1, 2, 5):  # the n = 1..5 curve agrees with the per-size pieces
        assert curve["ablate_top_ba"][n - 1] == ski["ablate_top_ba"][str(n)]
        assert curve["keep_only_top_ba"][n - 1] == ski["keep_only_top_ba"][str(n)]
    for f in ("summary.json", "results.npz", "ice-all-classes.png", "ice-one-class.png", "ice-vs-iou.png",
              "pra_val_single_units.npz", "pra_train_single_units.npz", "pra_val_classunits_n5.npz"):
        assert os.path.getsize(tmp_path / "w" / f) > 0, f
    # A second run recomputes nothing.
    monkeypatch.setattr(ci, "evaluate_counts", lambda *a, **k: pytest.fail("recomputed a cached piece"))
    again = experiment.classifier_ablation_experiment(model, variables, "feat", val, train, str(tmp_path / "w"),
                                                      **kwargs)
    assert again == summary


def test_interrupted_pass_resumes_from_its_checkpoint(tmp_path, toy):
    model, variables, images, labels = toy
    ck = str(tmp_path / "sweep.partial")
    sets = [[1], [2, 3]]

    def stop_after_two(b, n):
        if b == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ci.ablation_sweep(model, variables, "conv2", sets, (images, labels), batch_size=8, checkpoint=ck,
                          checkpoint_every=1, progress=stop_after_two)
    seen = []
    _, resumed = ci.ablation_sweep(model, variables, "conv2", sets, (images, labels), batch_size=8,
                                   checkpoint=ck, checkpoint_every=1, progress=lambda b, n: seen.append(b))
    _, whole = ci.ablation_sweep(model, variables, "conv2", sets, (images, labels), batch_size=8)
    assert seen[0] == 2  # batch 1 was checkpointed; the pass resumed with batch 2
    np.testing.assert_array_equal(resumed["pred"], whole["pred"])
    np.testing.assert_array_equal(resumed["true"], whole["true"])
    assert os.path.exists(os.path.join(ck, "stream.json"))  # the run_stream work directory


def test_old_npz_checkpoint_is_refused(tmp_path, toy):
    model, variables, images, labels = toy
    old = tmp_path / "sweep.partial.npz"
    np.savez(old, next_batch=np.asarray(3), key=np.asarray("x"))
    with pytest.raises(ci.InterventionError, match="older version.*delete it"):
        ci.ablation_sweep(model, variables, "conv2", [[1]], (images, labels), batch_size=8, checkpoint=str(old))


# ---- VGG16 fast path ---------------------------------------------------------------


@pytest.mark.slow
def test_vgg16_fast_conv5_3_path_equals_generic_path():
    from jaxdissect import capture
    from jaxdissect.models.vgg16 import VGG16

    model = VGG16(num_classes=10)
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 32, 32, 3)))
    # He-normal weights, non-zero biases (both signs of pooled units and fc6 pre-activations), no compile.
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = jax.tree.map(
        lambda a: (rng.normal(size=a.shape) * (np.sqrt(2 / np.prod(a.shape[:-1])) if a.ndim > 1 else 0.05))
        .astype(np.float32), shapes)
    units = np.array([0, 5, 77, 300, 511, 128, 42, 9])
    ev = ci._Evaluator(model, variables, "conv5_3", x, "auto")
    assert ev.fast
    clean, acts = jax.jit(lambda v, x: capture(model, v, x, ["conv5_3", "avgpool"]))(variables, x)
    fast = np.asarray(ev.fast_logits(variables, acts["avgpool"], jnp.asarray(units)))
    masks = np.arange(512)[None, :] == units[:, None]
    generic = np.asarray(ev.generic_logits(variables, acts["conv5_3"], jnp.asarray(masks)))
    scale = np.abs(generic).max()
    np.testing.assert_allclose(fast, generic, atol=1e-5 * scale)
    assert np.abs(generic - np.asarray(clean)[None]).max() > 1e-4 * scale  # the ablations matter
    # Multi-unit sets (top-n style and their complements) through the fc6 contribution matrix.
    sets = np.zeros((4, 512), bool)
    sets[0, units[:3]] = True
    sets[1, rng.permutation(512)[:100]] = True
    sets[2], sets[3] = ~sets[0], ~sets[1]
    fast_sets = np.asarray(ev.fast_mask_logits(variables, acts["avgpool"], jnp.asarray(sets)))
    generic_sets = np.asarray(ev.generic_logits(variables, acts["conv5_3"], jnp.asarray(sets)))
    np.testing.assert_allclose(fast_sets, generic_sets, atol=1e-5 * np.abs(generic_sets).max())
    _, set_counts = ci.ablation_sweep(model, variables, "conv5_3", sets, (x, np.array([3, 7], np.int32)),
                                      batch_size=2)
    for e in range(len(sets)):
        np.testing.assert_array_equal(set_counts["pred"][e], ref_counts([3, 7], generic_sets[e].argmax(-1), 10)[1])
    labels = np.array([3, 7], np.int32)
    _, counts = ci.single_unit_sweep(model, variables, "conv5_3", (x, labels), units=units, method="fast",
                                     batch_size=2)
    for e in range(len(units)):
        np.testing.assert_array_equal(counts["pred"][e], ref_counts(labels, generic[e].argmax(-1), 10)[1])


# ---- errors ------------------------------------------------------------------------


def test_bad_arguments_are_reported(toy):
    model, variables, images, labels = toy
    data = (images, labels)
    with pytest.raises(ci.InterventionError, match=r"unknown class 'ski-resort'; did you mean 'ski_resort'"):
        ci.class_index(["bedroom", "ski_resort"], "ski-resort")
    with pytest.raises(ci.InterventionError, match=r"unit indices \[8, 9\] out of range; the layer has units 0..7"):
        ci.ablate_units(model, variables, "conv2", [1, 8, 9], data)
    with pytest.raises(ci.InterventionError, match="unit set 0 is empty"):
        ci.ablate_units(model, variables, "conv2", [], data)
    with pytest.raises(ci.InterventionError, match="units is empty"):
        ci.single_unit_sweep(model, variables, "conv2", data, units=[])
    with pytest.raises(ci.InterventionError, match=r"unknown layer 'conv3' \(did you mean 'conv2', 'conv1'"):
        ci.ablate_units(model, variables, "conv3", [1], data)
    with pytest.raises(ci.InterventionError, match="fast single-unit path needs"):
        ci.single_unit_sweep(model, variables, "conv2", data, method="fast")
    with pytest.raises(ci.InterventionError, match=r"labels \[7\] are outside the model's 5 classes"):
        ci.ablate_units(model, variables, "conv2", [1], (images, np.where(labels == 0, 7, labels)))


# ---- launcher ----------------------------------------------------------------------


@pytest.mark.slow
def test_launcher_on_a_places_folder(tmp_path, capsys):
    from PIL import Image

    from jaxdissect.checkpoint import save_model
    from jaxdissect.models.small_cnn import SmallCNN
    from launch import ablate_classifier as launcher

    rng = np.random.default_rng(0)
    for split in ("val", "train"):
        for c, name in enumerate(["bedroom", "kitchen", "ski_resort"]):
            os.makedirs(tmp_path / split / name)
            for i in range(2):
                pixels = rng.integers(0, 256, size=(24, 32, 3)).astype(np.uint8)
                pixels[..., c] = 255
                Image.fromarray(pixels).save(tmp_path / split / name / f"{split}_{c}_{i}.png")
    model = SmallCNN(num_classes=3, widths=(4, 4, 4, 8))
    save_model(str(tmp_path / "model"), model, model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))),
               metadata={"preprocessing": {"normalization": "imagenet", "resize": 256, "crop": 224},
                         "classes": ["bedroom", "kitchen", "ski_resort"]})
    summary = launcher.run(str(tmp_path / "model"), f"places:{tmp_path / 'val'}", str(tmp_path / "train"),
                           str(tmp_path / "out"), layer="conv4", sizes=["1", "3"], plot_class="kitchen",
                           batch_size=4)
    assert summary["val_images"] == summary["train_images"] == 6
    assert set(summary["classes"]) == {"bedroom", "kitchen", "ski_resort"}
    assert "n = 3: top n removed" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "out" / "ice-one-class.png")
    with pytest.raises(launcher.LaunchError, match="not a directory"):
        launcher.run(str(tmp_path / "model"), str(tmp_path / "nope"), str(tmp_path / "train"), str(tmp_path / "o2"))
    with pytest.raises(ci.InterventionError, match="unknown class 'kitchn'; did you mean 'kitchen'"):
        launcher.run(str(tmp_path / "model"), str(tmp_path / "val"), str(tmp_path / "train"), str(tmp_path / "o3"),
                     layer="conv4", plot_class="kitchn")
