"""Learned bases: specs, the TopK SAE against a NumPy reference, its training (determinism, one compile per
shape, resume after a kill, the per-user cache), and recovery of planted concept directions.

The planted layer: 16 concepts, each present at a pixel with probability 0.1 and carrying a log-normal
strength along its own direction ``d_k = Q[:, k]`` of a random rotation ``Q``, so no channel is a concept
detector while a basis aligned with the ``d_k`` is. Recovery is judged against that ground truth and
against the unrotated units dissected the same way.
"""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxdissect import statistics
from jaxdissect.bases import BasisError, Linear, Neurons, probe, sae, spec
from helpers import numpy_topk, random_sae
from jaxdissect.rotation import random_rotation_powers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, S, N = 16, 16, 64                       # concepts = channels, label grid, images


# --------------------------------------------------------------------------
# Specs.


def test_specs_parse_and_build():
    assert spec.parse("neurons") == spec.BasisSpec("neurons")
    assert spec.parse(" rotation:0.5 ").text == "rotation:0.5:1"
    assert spec.parse("rotation:1:7") == spec.BasisSpec("rotation", alpha=1.0, seed=7)
    assert spec.parse("sae:8") == spec.BasisSpec("sae", expansion=8.0, k=spec.DEFAULT_K)
    assert spec.parse("sae:4, k=16").text == "sae:4,k=16"
    assert spec.parse("probe:net2vec").learned and spec.parse("sae:2").learned
    assert spec.parse("sae:8,k=32").units(512) == 4096
    assert [s.text for s in spec.parse_list("neurons; rotation:1;sae:8,k=32")] == [
        "neurons", "rotation:1:1", "sae:8,k=32"]
    basis, params = spec.parse("rotation:1:3").build(8)
    assert isinstance(basis, Linear) and basis.describe() == "rotation:1:3"
    np.testing.assert_array_equal(params["matrix"], random_rotation_powers(8, [1.0], 3)[0].astype(np.float32))
    assert isinstance(spec.parse("neurons").build(8)[0], Neurons)
    for bad, words in (("pca", "unknown basis"), ("rotation:x", "rotation:ALPHA"), ("sae:0", "sae:EXPANSION"),
                       ("sae:8,k=0", "sae:EXPANSION"), ("probe:ibd", "probe:net2vec"), ("neurons:2", "unknown")):
        with pytest.raises(BasisError, match=words) as e:
            spec.parse(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(BasisError, match="listed twice"):
        spec.parse_list("sae:8;sae:8,k=32")
    with pytest.raises(BasisError, match="even channel count"):
        spec.parse("rotation:1").build(7)
    with pytest.raises(BasisError, match="learned from data"):
        spec.parse("sae:2").build(8)
    with pytest.raises(BasisError, match="cache_dir and identity"):
        spec.resolve("sae:2", 8)


# --------------------------------------------------------------------------
# The TopK SAE against NumPy.


def test_topk_codes_and_reconstruction_equal_numpy():
    rng = np.random.default_rng(0)
    params = random_sae(rng, 6, 20)
    acts = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    basis = sae.TopKSAE(k=3)
    codes = np.asarray(jax.jit(basis.encode)(params, acts))
    want_codes, want_recon = numpy_topk(params, acts, 3)
    assert codes.shape == (3, 4, 5, 20)
    np.testing.assert_allclose(codes.reshape(-1, 20), want_codes, rtol=1e-5, atol=1e-6)
    assert ((codes > 0).sum(-1) <= 3).all()
    np.testing.assert_allclose(np.asarray(basis.reconstruct(params, acts)).reshape(-1, 6), want_recon,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(basis.decode(params, codes)).reshape(-1, 6),
                               want_codes @ params["w_dec"], rtol=1e-5, atol=1e-5)
    assert basis.num_units(params, 6) == 20
    with pytest.raises(BasisError, match="cannot act on a layer with 7 channels"):
        basis.check(params, 7)
    with pytest.raises(BasisError, match="1 <= k <= 20"):
        sae.TopKSAE(k=21).check(params, 6)


# --------------------------------------------------------------------------
# Planted concepts along rotated directions.


def planted(seed=0):
    rng = np.random.default_rng(seed)
    present = rng.random((N, S, S, K)) < 0.1
    units = (present * np.exp(1.5 * rng.standard_normal((N, S, S, K)))).astype(np.float32)
    seg = np.where(present, np.arange(1, K + 1), 0).transpose(0, 3, 1, 2).astype(np.int32)
    return units, seg


Q = random_rotation_powers(K, [1.0], 1)[0].astype(np.float32)     # concept k lies along Q[:, k]
SETTINGS = sae.Settings(expansion=2, k=2, num_batches=100, learning_rate=1e-2, minibatch=256, dead_after=20000)


def cycle(acts, size=8):
    """``batches(start)``: batch i is images ``(i mod n/size) * size ...`` of ``acts``."""
    def batches(start=0):
        for i in range(start, SETTINGS.num_batches):
            j = i % (len(acts) // size)
            yield acts[j * size:(j + 1) * size]
    return batches


def dissect(seg, *sets):
    """Each set of units dissected (dissect_activations, top 5%), all in one call (units are independent, and
    64 units in all compile once for every test): per set, ``(labels, label IoU, best IoU per concept)``."""
    acts = np.concatenate(sets, -1)
    r = statistics.dissect_activations(lambda: ((acts[i:i + 16], seg[i:i + 16]) for i in range(0, N, 16)),
                                       K + 1, 0.05, S, topk=3, num_batches=N // 16, progress=False)
    bounds = np.cumsum([0] + [a.shape[-1] for a in sets])
    return [(r.label[a:b], r.label_iou[a:b], r.iou[a:b, 1:].max(0)) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.fixture(scope="module")
def planted_run():
    units, seg = planted()
    rotated = units @ Q.T
    basis, params, curve = sae.train(cycle(rotated), K, SETTINGS, progress=False)
    return units, rotated, seg, basis, params, curve


@pytest.mark.slow
def test_sae_recovers_planted_directions_and_labels(planted_run):
    units, rotated, seg, basis, params, _ = planted_run
    w = params["w_dec"] / np.linalg.norm(params["w_dec"], axis=1, keepdims=True)
    cos = w @ Q                                                      # [features, concepts]
    assert (cos.max(0) > 0.9).all(), np.round(cos.max(0), 3)
    codes = np.asarray(jax.jit(basis.encode)(params, rotated))
    (truth, _, truth_best), (_, _, neuron_best), (labels, label_iou, feature_best) = dissect(seg, units, rotated, codes)
    np.testing.assert_array_equal(truth, np.arange(1, K + 1))           # the planted units are the detectors
    # The feature along each planted direction is labelled with that concept, as well as the planted unit.
    aligned = cos.argmax(0)
    np.testing.assert_array_equal(labels[aligned], np.arange(1, K + 1))
    np.testing.assert_allclose(label_iou[aligned], truth_best, atol=0.03)
    assert feature_best.mean() > truth_best.mean() - 0.02
    assert neuron_best.max() < 0.5 * truth_best.min(), (neuron_best, truth_best)


def test_probe_directions_match_the_planted_ones(planted_run):
    _, rotated, seg, *_ = planted_run
    batches = lambda: ((rotated[i:i + 16], seg[i:i + 16]) for i in range(0, N, 16))  # noqa: E731
    basis, params, info = probe.train(batches, K + 1, label_names=["-"] + [f"c{k}" for k in range(K)],
                                      settings=probe.Settings(epochs=10), progress=False)
    assert info["labels"] == list(range(1, K + 1)) and basis.concepts == tuple(f"c{k}" for k in range(K))
    w = params["matrix"] / np.linalg.norm(params["matrix"], axis=1, keepdims=True)
    assert ((w * Q.T).sum(1) > 0.9).all(), np.round((w * Q.T).sum(1), 3)
    assert info["heldout_images"] == N // 5 and min(info["heldout_iou"]) > 0.5
    assert info["loss"][-1] < info["loss"][0]
    basis.check(params, K)
    codes = np.asarray(basis.encode(params, rotated[:2]))
    # Decoding the codes gives back activations inside the directions' span (here all of it).
    np.testing.assert_allclose(np.asarray(basis.decode(params, codes)), rotated[:2], rtol=1e-3, atol=1e-3)


def test_without_rotation_the_sae_does_not_beat_the_neurons():
    units, seg = planted(seed=1)
    basis, params, _ = sae.train(cycle(units), K, SETTINGS, progress=False)
    codes = np.asarray(jax.jit(basis.encode)(params, units))
    (_, _, neuron_best), (_, _, feature_best), _ = dissect(seg, units, codes, units)
    assert feature_best.mean() <= neuron_best.mean() + 0.02, (feature_best.mean(), neuron_best.mean())


# --------------------------------------------------------------------------
# Training.


def stream(index):
    """Deterministic activations of batch ``index`` (a function of the index alone)."""
    rng = np.random.default_rng(index % 5)
    return np.maximum(rng.standard_normal((4, 6, 6, 8)) @ np.eye(8) - 0.3, 0).astype(np.float32)


SMALL = sae.Settings(expansion=2, k=3, num_batches=12, learning_rate=3e-3, minibatch=64, dead_after=500)


def small_batches(start=0):
    return (stream(i) for i in range(start, SMALL.num_batches))


def test_training_is_deterministic_decreasing_and_compiled_once_per_shape(planted_run):
    curve = planted_run[5]
    assert np.mean(curve["fvu"][-10:]) < 0.2 * np.mean(curve["fvu"][:3])
    assert np.mean(curve["loss"][-10:]) < np.mean(curve["loss"][:3])
    a = sae.train(small_batches, 8, SMALL, progress=False)
    b = sae.train(small_batches, 8, SMALL, progress=False)
    for name in sae.PARAMS:
        np.testing.assert_array_equal(a[1][name], b[1][name])
    assert a[2] == b[2]
    c = sae.train(small_batches, 8, sae.Settings(**{**SMALL.__dict__, "seed": 1}), progress=False)
    assert not np.array_equal(a[1]["w_dec"], c[1]["w_dec"])
    step = sae._step(SMALL.k, 8, SMALL.aux_coef, SMALL.minibatch, SMALL.dead_after, SMALL.learning_rate)
    assert step._cache_size() == 1                    # 12 batches of one shape (and 3 runs): one compilation
    sae.train(lambda start=0: (stream(i)[:, :3] for i in range(start, SMALL.num_batches)), 8, SMALL,
              progress=False)
    assert step._cache_size() == 2                    # a second batch shape: a second compilation


KILL = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_bases import SMALL, stream
    from jaxdissect.bases import sae

    def batches(start=0):
        for i in range(start, SMALL.num_batches):
            if i == 9:
                os.kill(os.getpid(), signal.SIGKILL)   # killed mid-training, checkpoints after batches 4 and 8
            yield stream(i)

    sae.train(batches, 8, SMALL, workdir={workdir!r}, checkpoint_every=4, progress=False)
''')


@pytest.mark.slow
def test_training_resumes_after_a_kill_to_the_same_parameters(tmp_path):
    workdir = str(tmp_path / "work")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", KILL.format(tests=os.path.join(ROOT, "tests"), workdir=workdir)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert os.listdir(os.path.join(workdir, "checkpoints"))            # it had checkpointed before the kill
    resumed = sae.train(small_batches, 8, SMALL, workdir=workdir, checkpoint_every=4, progress=False)
    whole = sae.train(small_batches, 8, SMALL, progress=False)
    for name in sae.PARAMS:
        np.testing.assert_array_equal(resumed[1][name], whole[1][name])
    assert resumed[2] == whole[2]                                       # the curve too


def test_trained_once_per_identity_and_settings_in_the_cache(tmp_path):
    identity = {"model": "stream", "layer": "x", "data": "stream:12"}
    basis, params, info = sae.train_or_load(str(tmp_path), identity, small_batches, 8, SMALL, progress=False)
    assert os.path.dirname(info["path"]) == str(tmp_path / "bases") and info["units"] == 16
    assert len(info["curve"]["fvu"]) == SMALL.num_batches and "dead" in info["curve"]
    assert not [n for n in os.listdir(tmp_path / "bases") if n.endswith(".train")]   # checkpoints removed

    def untouched(start=0):
        raise AssertionError("a cached SAE was trained again")

    again = sae.train_or_load(str(tmp_path), identity, untouched, 8, SMALL, progress=False)
    assert again[2]["path"] == info["path"] and again[0] == basis
    np.testing.assert_array_equal(again[1]["w_dec"], params["w_dec"])
    other = sae.train_or_load(str(tmp_path), {**identity, "layer": "y"}, small_batches, 8, SMALL, progress=False)
    assert other[2]["path"] != info["path"]
    resolved = spec.resolve("sae:2,k=3", 8, cache_dir=str(tmp_path), identity=identity, activations=untouched,
                            settings=SMALL)
    assert resolved[2]["path"] == info["path"] and resolved[2]["spec"] == "sae:2,k=3"


@pytest.mark.slow
def test_activation_batches_stream_a_layer_from_any_start():
    from jaxdissect.data.synthetic import SyntheticScenes
    from jaxdissect.layers import capture
    from jaxdissect.models.small_cnn import SmallCNN

    source = SyntheticScenes(6, seed=2)
    module = SmallCNN(widths=(4, 8, 8, 8))
    variables = module.init(jax.random.PRNGKey(0), source.get_batch([0])["image"])
    batches = sae.activation_batches(module, variables, "conv2", source, batch_size=4, num_batches=4, seed=3)
    whole = list(batches())
    assert len(whole) == 4 and whole[0].shape == (4, 32, 32, 8)
    np.testing.assert_array_equal(list(batches(2))[0], whole[2])       # the same batch from any start
    # Batch 1 holds epoch 0's last two images and epoch 1's first two, in each epoch's own order.
    order = np.concatenate([np.random.RandomState(3).permutation(6), np.random.RandomState(4).permutation(6)])
    want = capture(module, variables, source.get_batch(order[4:8])["image"], ["conv2"])[1]["conv2"]
    np.testing.assert_allclose(whole[1], np.asarray(want), rtol=1e-5, atol=1e-6)
    _, params, curve = sae.train(batches, 8, sae.Settings(expansion=1, k=2, num_batches=4, minibatch=512),
                                 progress=False)
    assert params["w_dec"].shape == (8, 8) and len(curve["fvu"]) == 4


def test_probe_is_cached_and_resolved_from_its_spec(tmp_path):
    units, seg = planted(seed=2)
    data = lambda: ((units[i:i + 16], seg[i:i + 16]) for i in range(0, 32, 16))  # noqa: E731
    identity = {"model": "planted", "layer": "units", "data": "planted:32"}
    settings = probe.Settings(epochs=2)
    basis, params, info = spec.resolve("probe:net2vec", K, cache_dir=str(tmp_path), identity=identity,
                                       labelled=data, num_labels=K + 1, settings=settings)
    assert isinstance(basis, probe.Probe) and info["spec"] == "probe:net2vec" and len(info["heldout_iou"]) == K

    def untouched():
        raise AssertionError("a cached probe was trained again")

    again = probe.train_or_load(str(tmp_path), identity, untouched, K + 1, settings=settings)
    assert again[2]["path"] == info["path"] and again[0] == basis
    np.testing.assert_array_equal(again[1]["matrix"], params["matrix"])
    with pytest.raises(BasisError, match="labelled=batches"):
        spec.resolve("probe:net2vec", K, cache_dir=str(tmp_path), identity=identity)


TWICE = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {tests!r})
    from test_bases import SMALL, stream
    from jaxdissect.bases import sae

    def batches(start=0):
        with open({marks!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        return (stream(i) for i in range(start, SMALL.num_batches))

    sae.train_or_load({cache!r}, {{"model": "stream"}}, batches, 8, SMALL, progress=False)
''')


@pytest.mark.slow
def test_two_processes_train_the_same_sae_once(tmp_path):
    code = TWICE.format(tests=os.path.join(ROOT, "tests"), marks=str(tmp_path / "marks"), cache=str(tmp_path / "c"))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    assert len(set(open(tmp_path / "marks").read().split())) == 1       # one process trained, the other loaded
    assert len(os.listdir(tmp_path / "c" / "bases")) == 2                # the SAE and its lock file
