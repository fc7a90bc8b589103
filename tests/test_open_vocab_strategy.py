"""Open-vocabulary labels inside ``jaxdissect.dissect`` (issue 24): planted units, NumPy and PyTorch references.

A planted model on synthetic scenes: a colour layer whose unit k is the
fraction of colour-k pixels in each 4x4 cell (read off the pixels' chroma),
and a ``[N, 8]`` layer: the image's colour fractions and two decoy units,
hashes of the pixels (independent of the content). The data carry two decoy
concepts beside their own labels: one present in random images, one present
wherever red is and in as many other images. The ``labels`` scorer must name
every planted unit with its colour, rank both decoys below it, find the
planted units significant and the hash unit not; its scores equal soft-WPMI
computed in float64 from the data's labels and the captured activations.
With a CLIP scorer (a random-weight tower converted from the PyTorch
reference, no labels at all, a ``[N, U]`` layer) the scores equal the same
formula on the reference's embeddings.
"""

import json
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect.data import synthetic
from jaxdissect.explain import open_vocab_strategy as ovs
from jaxdissect.layers import capture
from jaxdissect.pipelines.dissect import dissect
from helpers import ref_soft_wpmi

COLORS = list(synthetic.COLORS)
RGB = np.array(list(synthetic.COLORS.values()), np.float32)
DECOYS = ["decoy_random", "decoy_superset"]


class Colors(nn.Module):
    """Unit k: the fraction of each 4x4 cell's pixels whose colour is colour k (nearest chroma; white by brightness)."""

    @nn.compact
    def __call__(self, x):
        rgb = (x + 1.0) * 127.5
        chroma = rgb / jnp.maximum(rgb.sum(-1, keepdims=True), 1.0)
        ref = RGB / RGB.sum(-1, keepdims=True)
        dist = ((chroma[..., None, :] - ref) ** 2).sum(-1)                           # [B, H, W, 6]
        bright = rgb.mean(-1, keepdims=True) >= (synthetic.BACKGROUND + 22)
        white = COLORS.index("white")
        dist = dist.at[..., white].set(jnp.where(bright[..., 0], dist[..., white], jnp.inf))
        grey = ((chroma - 1 / 3) ** 2).sum(-1, keepdims=True)
        background = jnp.where(bright, jnp.inf, grey)                               # dark grey: no colour
        best = jnp.argmin(jnp.concatenate([dist, background], -1), -1)
        onehot = (best[..., None] == jnp.arange(len(COLORS))).astype(jnp.float32)
        b, h, w, c = onehot.shape
        return onehot.reshape(b, h // 4, 4, w // 4, 4, c).mean((2, 4))


class Pooled(nn.Module):
    """``[N, 8]``: the image's colour fractions and two hashes of its pixels (decoys: no concept)."""

    @nn.compact
    def __call__(self, colors, x):
        weights = jnp.arange(x.shape[2])[None, None, :, None]
        h = jnp.stack([jnp.sin(jnp.sum(x * (weights + k), axis=(1, 2, 3)) * 12.9898) * 43758.5453 for k in (0, 1)], -1)
        return jnp.concatenate([colors.mean((1, 2)), h - jnp.floor(h)], -1)


class Planted(nn.Module):
    @nn.compact
    def __call__(self, x):
        colors = Colors(name="colors")(x)
        return Pooled(name="pooled")(colors, x)


class DecoyScenes(synthetic.SyntheticScenes):
    """Synthetic scenes with two more label channels: a random decoy and a red superset (see the module doc)."""

    label_names = synthetic.LABEL_NAMES + DECOYS
    label_categories = synthetic.LABEL_CATEGORIES + ["object", "object"]

    def fingerprint(self):
        return dict(super().fingerprint(), decoys=1)

    def get_batch(self, indices):
        out = super().get_batch(indices)
        seg = out["seg"]
        red = seg[:, 2] == synthetic.COLOR_BASE + COLORS.index("red")
        extra = np.zeros((len(seg), 2) + seg.shape[2:], np.int32)
        for j, i in enumerate(indices):
            rng = np.random.default_rng([7, int(i)])
            draw = rng.random(2)
            quadrant = np.zeros(seg.shape[2:], bool)
            q = int(rng.integers(4))
            half = seg.shape[2] // 2
            quadrant[(q // 2) * half:(q // 2 + 1) * half, (q % 2) * half:(q % 2 + 1) * half] = True
            if draw[0] < 0.37:                       # about as often as red is in an image, whatever it shows
                extra[j, 0][quadrant] = len(synthetic.LABEL_NAMES)
            superset = red[j] | (quadrant if (not red[j].any() and draw[1] < 0.6) else False)
            extra[j, 1][superset] = len(synthetic.LABEL_NAMES) + 1
        out["seg"] = np.concatenate([seg, extra], 1)
        return out


def concepts_of(data):
    """The labels scorer's concepts, written out: cleaned label names, then the classes."""
    return [n.replace("_", " ") for n in data.label_names[1:]] + list(data.class_names)


def reference_feats(data, n):
    """``[n, concepts]`` presence (label anywhere in the image, its class) from the data, in NumPy."""
    batch = data.get_batch(range(n))
    seg, cls = batch["seg"], batch["label"]
    labels = len(data.label_names)
    present = np.stack([(seg == label).any((1, 2, 3)) for label in range(1, labels)], 1)
    classes = np.eye(len(data.class_names), dtype=bool)[cls]
    return np.concatenate([present, classes], 1).astype(np.float64)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("planted"))
    data = DecoyScenes(96, seed=3)
    module = Planted()
    results = dissect(module, {}, ["colors", "pooled"], data, "dataset", quantile=0.05, topk=5, thumbsize=16,
                      batch_size=16, output_dir=out, progress=False, scorer="labels", similarity_top_k=12,
                      significance=True, permutations=40, label_metrics=True)
    reports = {v: json.load(open(os.path.join(out, v, "report.json")))["units"] for v in ("colors", "pooled")}
    return out, data, module, results, reports


def test_planted_units_named_decoys_ranked_below_and_hash_unit_not_significant(planted_run):
    _, _, _, results, reports = planted_run
    for k, u in enumerate(reports["colors"]):
        assert u["ov_label"] == COLORS[k], (k, u["ov_top"])
        assert u["label"] == COLORS[k] and u["agreement"] == "same" and u["iou_label_rank"] == 1
        ranked = [c for c, _ in u["ov_top"]]
        for decoy in (d.replace("_", " ") for d in DECOYS):
            assert decoy not in ranked or ranked.index(decoy) > 0
        assert u["ov_significant"] and u["ov_p_value"] == pytest.approx(1 / 41)
        assert u["ov_metrics"]["image"]["f1"] > 0.5
    pooled = reports["pooled"]
    for k, u in enumerate(pooled[:6]):
        assert u["ov_label"] == COLORS[k] and u["ov_significant"], (k, u["ov_top"])
    assert "decoy superset" in [c for c, _ in pooled[COLORS.index("red")]["ov_top"]][1:]  # runner-up, never first
    for decoy in pooled[6:]:
        assert not decoy["ov_significant"] and decoy["ov_p_value"] > 0.1, decoy
    assert results["pooled"].config["image_level"] and results["pooled"].thresholds.shape == (8,)


def test_scores_equal_soft_wpmi_on_the_data_labels(planted_run):
    """Presence, class columns, pooled values and the row order of the folds against NumPy."""
    _, data, module, _, reports = planted_run
    n = len(data)
    feats = reference_feats(data, n)
    names = concepts_of(data)
    _, acts = capture(module, {}, data.get_batch(range(n))["image"], ["colors", "pooled"])
    for view, pooled in (("colors", np.asarray(acts["colors"]).mean((1, 2))), ("pooled", np.asarray(acts["pooled"]))):
        scores, scale = ref_soft_wpmi(feats, pooled.astype(np.float64), top_k=12)
        for u, entry in enumerate(reports[view]):
            assert entry["ov_label"] == names[int(np.argmax(scores[u]))]
            np.testing.assert_allclose(entry["ov_score"], scores[u].max(), rtol=2e-5, atol=1e-6 * scale)
            top = [c for c, _ in entry["ov_top"]]
            assert top == [names[c] for c in np.argsort(-scores[u], kind="stable")[:5]]


def test_report_page_and_summary_show_both_labels(planted_run):
    out, _, _, _, _ = planted_run
    page = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    for heading in ("open-vocabulary label", "agreement", "IoU label&#x27;s rank", "ov p-value", "ov image f1"):
        assert f"<th>{heading}</th>" in page, heading
    data = json.loads(page.split('id="report-data">')[1].split("</script>")[0])
    columns = {c["id"]: c for c in data["columns"]}
    first = data["layers"][0]["units"][0]
    assert first["col0"] == "red" and columns["col0"]["kind"] == "text"
    assert first["col2"] == "same" and isinstance(first["col1"], float)
    summary = json.load(open(os.path.join(out, "summary.json")))["layers"]
    assert [(r["ov_same"], r["ov_compared"]) for r in summary][0] == (6, 6)
    assert "ov_same" in open(os.path.join(out, "summary.csv")).readline()
    assert "agreement with IoU labels" in page and "open-vocabulary scorer" in page


def test_agreement_words():
    assert ovs.agreement("wine_cellar-bottle_storage-s", "cellar") == "word"
    assert ovs.agreement("Red", "red-c") == "same"
    assert ovs.agreement("dogs", "dog house") == "word"      # a final s of a word over three letters
    assert ovs.agreement("bus", "bu") == "none"
    assert ovs.agreement("house of cards", "the house") == "word"
    assert ovs.agreement("of", "the of") == "none"           # stop words never match
    assert ovs.agreement("-", "red") is None
    accuracy = ovs.final_layer_accuracy(["kitchen", "beach", "red"], ["kitchen", "bedroom", "red-c"])
    assert accuracy == pytest.approx(2 / 3)


def test_label_concepts_and_vocabulary_choices(tmp_path):
    from jaxdissect.config import ConfigError, DissectConfig
    from jaxdissect.vocabularies import VocabularyError

    concepts, labels, classes = ovs.label_concepts(["-", "red-c", "wine_cellar-s", "red-o"], ["wine_cellar", "x"])
    assert concepts == ["red", "wine cellar", "x"] and labels.tolist() == [-1, 0, 1, 0] and classes.tolist() == [1, 2]
    cfg = DissectConfig(scorer="labels")
    names = synthetic.LABEL_NAMES
    every, columns = ovs.vocabulary_concepts(cfg, names, ["kitchen"])
    assert every[-1] == "kitchen" and columns.tolist() == list(range(len(every)))
    assert ovs.vocabulary_concepts(cfg.replace(vocabulary="broden"), names, ["kitchen"])[0] == every[:-1]
    (tmp_path / "some.txt").write_text("blue\nkitchen\n")
    chosen, columns = ovs.vocabulary_concepts(cfg.replace(vocabulary=str(tmp_path / "some.txt")), names, ["kitchen"])
    assert chosen == ["blue", "kitchen"] and [every[c] for c in columns] == chosen
    (tmp_path / "other.txt").write_text("blue\nsky\n")
    with pytest.raises(VocabularyError, match="1 concepts are not labels of the data, e.g. 'sky'"):
        ovs.vocabulary_concepts(cfg.replace(vocabulary=str(tmp_path / "other.txt")), names)
    with pytest.raises(ConfigError, match="scorer=labels scores units with the run's own labels, but it has none"):
        ovs.vocabulary_concepts(cfg, ["-"])
    with pytest.raises(ConfigError, match="vocabulary=20k"):
        ovs.vocabulary_concepts(cfg.replace(vocabulary="20k"), names)
    with pytest.raises(ConfigError, match=r"similarity_top_k=100 \(soft_wpmi's default, CLIP-Dissect's\) is more "
                                          "than the 40 images"):
        ovs.resolve_top_k(cfg, 40)
    assert ovs.resolve_top_k(cfg.replace(similarity="wpmi"), 40) == {"top_k": 28}
    assert ovs.resolve_top_k(cfg.replace(similarity="cos_similarity"), 3) == {}
    with pytest.raises(ConfigError, match="rank_reorder ranks each unit's top 5% of the images, none of 19"):
        ovs.resolve_top_k(cfg.replace(similarity="rank_reorder"), 19)
    with pytest.raises(ConfigError, match=r"scorer=clip:ViT-L/14: neither a known scorer .* known scorers: labels, "
                                          "clip:ViT-B/16, clip:RN50, clip_rn50, clip_vit_b16"):
        ovs.resolve_scorer("clip:ViT-L/14")
    assert ovs.resolve_scorer("clip:RN50", fetch=False) == "clip_rn50" and ovs.resolve_scorer("labels") is None


# --------------------------------------------------------------------------
# A CLIP scorer: a random-weight tower against the PyTorch reference, no labels, a [N, U] layer


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    import torch_clip_reference as ref
    from jaxdissect.convert import clip as convert_clip

    d = tmp_path_factory.mktemp("clip")
    (d / "bpe.txt").write_text("#version: 0.2\nr e\nre d</w>\n", encoding="utf-8")
    vocab = 2 * 256 + 2 + 2
    model = ref.randomize(ref.CLIP(16, 32, 1, 32, 8, 12, vocab, 32, 2, 1, vision_heads=2), seed=5).eval()
    save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(d / "clip.safetensors"))
    convert_clip.convert(str(d / "clip.safetensors"), str(d / "model"), str(d / "bpe.txt"), head_width=16)
    return torch, model, str(d / "model")


class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc")(x.mean((1, 2)) * 4.0)


@pytest.mark.slow
def test_clip_scorer_without_labels_on_a_dense_layer(tiny_clip, tmp_path):
    torch, model, clip_dir = tiny_clip
    from jaxdissect.models.clip import clip_preprocess
    from jaxdissect.tokenizer import ClipTokenizer

    words = ["red", "blue", "green", "sky", "dog", "tree", "car"]
    (tmp_path / "words.txt").write_text("\n".join(words) + "\n")
    rng = np.random.default_rng(0)
    variables = {"params": {"fc": {"kernel": rng.standard_normal((3, 5)).astype(np.float32),
                                   "bias": np.zeros(5, np.float32)}}}
    data = synthetic.SyntheticScenes(40, seed=1)
    out = str(tmp_path / "out")
    results = dissect(Dense(), variables, ["fc"], data, None, quantile=0.1, topk=5, thumbsize=16, batch_size=8,
                      output_dir=out, progress=False, scorer=clip_dir, vocabulary=str(tmp_path / "words.txt"),
                      similarity_top_k=8, cache_dir=str(tmp_path / "cache"))
    assert results["fc"].label_names == ["-"]
    report = json.load(open(os.path.join(out, "fc", "report.json")))["units"]
    batch = data.get_batch(range(len(data)))
    images = np.asarray(clip_preprocess(batch["display"] / 255.0, 32)).transpose(0, 3, 1, 2)
    tokens = ClipTokenizer.from_model_dir(clip_dir)(words).astype(np.int64)
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(np.ascontiguousarray(images))).double().numpy()
        txt = model.encode_text(torch.from_numpy(tokens)).double().numpy()
    feats = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    pooled = np.asarray(Dense().apply(variables, batch["image"]), np.float64)
    scores, scale = ref_soft_wpmi(feats, pooled, top_k=8)
    for u, entry in enumerate(report):
        assert entry["ov_label"] == words[int(np.argmax(scores[u]))]
        np.testing.assert_allclose(entry["ov_score"], scores[u].max(), rtol=1e-4, atol=1e-5 * scale)
        assert entry["agreement"] is None and entry["iou_label_rank"] is None
    cached = [n for n in os.listdir(tmp_path / "cache" / "text_embeddings") if n.endswith(".npy")]
    assert len(cached) == 1    # the vocabulary's text embeddings, kept per model


def test_settings_join_the_identity_only_when_on():
    from jaxdissect.config import DissectConfig

    fields = {"scorer", "vocabulary", "similarity", "similarity_top_k"}
    assert not fields & set(DissectConfig().identity())
    on = DissectConfig(scorer="labels", similarity="wpmi").identity()
    assert {k: on[k] for k in fields} == {"scorer": "labels", "vocabulary": None, "similarity": "wpmi",
                                          "similarity_top_k": None}
