"""Open-vocabulary scores against float64 NumPy references written from CLIP-Dissect's formulas.

Ties are broken by the lower image index (stable sorts) in the references too;
small tile settings make every run go through several unit chunks and concept
blocks, with padding on both axes. The 8-device run is a subprocess with forced
host devices (as in test_parallel.py).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import ref_cos, ref_cos_cubed, ref_rank_reorder, ref_soft_wpmi, ref_wpmi

from jaxdissect.explain import metrics, open_vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inputs(seed=0, images=60, concepts=37, units=11, ties=False):
    rng = np.random.default_rng(seed)
    clip = rng.uniform(0.1, 0.4, (images, concepts)).astype(np.float32)
    target = rng.standard_normal((images, units)).astype(np.float32)
    if ties:
        target = np.round(target * 2).astype(np.float32)  # a handful of values: many ties in the top-k
        clip = (np.round(clip * 20) / 20).astype(np.float32)
    return clip, target


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(open_vocab, "TILE_ELEMENTS", 256)
    monkeypatch.setattr(open_vocab, "MAX_CONCEPT_BLOCK", 8)


def _close(ours, ref):
    """Equal to float32 rounding: of the result, or of the ``(result, magnitude)`` it was computed from."""
    ref, scale = ref if isinstance(ref, tuple) else (ref, np.max(np.abs(ref)))
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=1e-6 * scale)


CASES = [
    ("soft_wpmi", dict(top_k=7), lambda c, t: ref_soft_wpmi(c, t, top_k=7)),
    ("soft_wpmi", dict(top_k=60), lambda c, t: ref_soft_wpmi(c, t, top_k=60)),  # top_k = images
    ("wpmi", dict(top_k=5), lambda c, t: ref_wpmi(c, t, top_k=5)),
    ("wpmi", dict(top_k=60, a=3.0, lam=0.3), lambda c, t: ref_wpmi(c, t, top_k=60, a=3.0, lam=0.3)),
    ("cos_similarity", {}, ref_cos),
    ("cos_similarity_cubed", {}, ref_cos_cubed),
    ("rank_reorder", dict(top_fraction=0.2), lambda c, t: ref_rank_reorder(c, t, top_fraction=0.2)),
    ("rank_reorder", dict(top_fraction=1.0), lambda c, t: ref_rank_reorder(c, t, top_fraction=1.0)),
]


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("name,kwargs,ref", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_equals_reference(name, kwargs, ref, ties):
    """Both sharding modes (they agree bit for bit: test_one_and_eight_devices_identical)."""
    clip, target = inputs(seed=3, ties=ties)
    shard = "units" if ties else "concepts"
    ours = open_vocab.SIMILARITIES[name](clip, target, shard=shard, **kwargs)
    assert ours.shape == (target.shape[1], clip.shape[1]) and ours.dtype == np.float32
    _close(ours, ref(clip, target))


def test_defaults_and_large_tiles(monkeypatch):
    """CLIP-Dissect's defaults (top_k=100, a=10 ...) on one tile, against the reference."""
    monkeypatch.setattr(open_vocab, "TILE_ELEMENTS", 1 << 24)
    monkeypatch.setattr(open_vocab, "MAX_CONCEPT_BLOCK", 1024)
    clip, target = inputs(seed=5, images=120, concepts=50, units=9)
    _close(open_vocab.soft_wpmi(clip, target), ref_soft_wpmi(clip, target))
    _close(open_vocab.wpmi(clip, target), ref_wpmi(clip, target))
    _close(open_vocab.rank_reorder(clip, target), ref_rank_reorder(clip, target))


def test_dead_unit_scores_zero_cosine():
    clip, target = inputs()
    target[:, 2] = 0
    out = open_vocab.cos_similarity(clip, target)
    assert np.all(out[2] == 0) and np.isfinite(out).all()


@pytest.mark.parametrize("call,message", [
    (lambda c, t: open_vocab.soft_wpmi(c, t, top_k=61), "top_k=61 but there are 60 probe images"),
    (lambda c, t: open_vocab.wpmi(c, t, top_k=0), "top_k=0"),
    (lambda c, t: open_vocab.soft_wpmi(c[:50], t), "clip_feats has 50 images but target_feats has 60"),
    (lambda c, t: open_vocab.cos_similarity(c, t[:, 0]), "must be [images, concepts]"),
    (lambda c, t: open_vocab.rank_reorder(c, t, top_fraction=0.01), "int(images * top_fraction)"),
    (lambda c, t: open_vocab.soft_wpmi(c, t, top_k=3, shard="rows"), "choose 'concepts' or 'units'"),
    (lambda c, t: open_vocab.similarity("netdissect"), "unknown similarity function"),
])
def test_bad_inputs_one_line(call, message):
    clip, target = inputs()
    with pytest.raises(open_vocab.OpenVocabError) as e:
        call(clip, target)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_concept_activations_is_cosine():
    rng = np.random.default_rng(1)
    img, txt = rng.standard_normal((5, 8)), rng.standard_normal((3, 8))
    ref = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    np.testing.assert_allclose(open_vocab.concept_activations(img, txt), ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# A planted probe set


def planted(seed=0, images=400, concepts=60, planted_units=12, decoys=2):
    """Images x concepts presence, units that fire on images with their concept, decoy concepts.

    Concept ``c`` is present in an image with probability 0.1; ``clip_feats`` is
    a CLIP-like similarity (0.2 + 0.1 * presence + noise). Unit ``u`` fires
    (value 1 + noise) on the images holding concept ``u``, else noise. For each
    planted unit two decoy concepts are appended: a *random-label* decoy
    (independent presence, same frequency) and an *extra-label* decoy (the
    unit's concept plus as many other images again).
    """
    rng = np.random.default_rng(seed)
    presence = rng.random((images, concepts)) < 0.1
    target = 0.05 * rng.random((images, planted_units))
    target += presence[:, :planted_units] * (1 + 0.05 * rng.random((images, planted_units)))
    extra = []
    for u in range(planted_units):
        random_decoy = rng.random(images) < 0.1
        superset = presence[:, u].copy()
        others = np.flatnonzero(~superset)
        superset[rng.choice(others, presence[:, u].sum(), replace=False)] = True
        extra += [random_decoy, superset]
    presence = np.concatenate([presence, np.stack(extra, 1)], 1)
    clip = 0.2 + 0.1 * presence + 0.01 * rng.standard_normal(presence.shape)
    return clip.astype(np.float32), target.astype(np.float32), presence


def test_planted_units_named_and_decoys_flagged():
    clip, target, presence = planted()
    units = target.shape[1]
    scores = open_vocab.soft_wpmi(clip, target, top_k=30)
    names = [f"c{i}" for i in range(clip.shape[1])]
    labels, index, _ = open_vocab.best_concepts(scores, names)
    assert index.tolist() == list(range(units)), labels
    # NeuronEval's checks: with a sound metric (F1) the planted label beats both decoys, and
    # removing or adding labels lowers the score; recall cannot tell the extra-label decoy apart.
    for u in range(units):
        act, true = target[:, u], presence[:, u].astype(np.float32)
        random_decoy = presence[:, 60 + 2 * u].astype(np.float32)
        superset = presence[:, 60 + 2 * u + 1].astype(np.float32)
        f1 = [float(metrics.f1(act, c, 0.5)) for c in (true, random_decoy, superset)]
        assert f1[0] > f1[1] and f1[0] > f1[2], f1
        assert metrics.missing_labels_check(metrics.f1, act, true, threshold=0.5)
        assert metrics.extra_labels_check(metrics.f1, act, true, threshold=0.5)
        assert not metrics.extra_labels_check(metrics.recall, act, true, threshold=0.5)
        assert float(metrics.recall(act, superset, 0.5)) == float(metrics.recall(act, true, 0.5)) == 1.0


# --------------------------------------------------------------------------
# 1 and 8 devices


EIGHT = """
import json
import jax
import numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from jaxdissect import parallel
from jaxdissect.explain import open_vocab
open_vocab.TILE_ELEMENTS = 256
open_vocab.MAX_CONCEPT_BLOCK = 8
rng = np.random.default_rng(7)
clip = rng.uniform(0.1, 0.4, (64, 45)).astype(np.float32)
target = np.round(rng.standard_normal((64, 13)) * 2).astype(np.float32)
out = {}
for devices in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:devices])
    for shard in ("concepts", "units"):
        for name, kw in (("soft_wpmi", {"top_k": 9}), ("wpmi", {"top_k": 9}), ("cos_similarity", {}),
                         ("cos_similarity_cubed", {}), ("rank_reorder", {"top_fraction": 0.25})):
            r = open_vocab.SIMILARITIES[name](clip, target, mesh=mesh, shard=shard, **kw)
            out[f"{devices}-{shard}-{name}"] = r.tobytes().hex()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_one_and_eight_devices_identical():
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(EIGHT)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, value in out.items():
        if key.startswith("8-"):
            assert value == out["1-" + key[2:]], f"{key} differs from the 1-device result"
        if "-units-" in key:
            assert value == out[key.replace("-units-", "-concepts-")], f"{key}: units and concepts shards differ"


def test_pooling_and_labels():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    np.testing.assert_allclose(open_vocab.pooled_units(x), x.mean((1, 2)))
    np.testing.assert_array_equal(open_vocab.pooled_units(x[:, 0]), x[:, 0, 0])  # tokens: the CLS token
    np.testing.assert_array_equal(open_vocab.pooled_units(x[:, 0, 0]), x[:, 0, 0])
    with pytest.raises(open_vocab.OpenVocabError, match="cannot pool"):
        open_vocab.pooled_units(x[0, 0, 0])
    clip, target, _ = planted(images=200, concepts=20, planted_units=4)
    names = [f"c{i}" for i in range(clip.shape[1])]
    out = open_vocab.label_units(clip, target, names, "soft_wpmi", top=3, top_k=20)
    assert out["label"] == ["c0", "c1", "c2", "c3"] and out["top_index"].shape == (4, 3)
    np.testing.assert_array_equal(out["top_index"][:, 0], out["index"])
    assert (np.diff(out["top_score"], axis=1) <= 0).all()
    with pytest.raises(open_vocab.OpenVocabError, match="3 concept names"):
        open_vocab.label_units(clip, target, names[:3])
