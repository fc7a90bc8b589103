"""Random rotations (NetDissect 2017): the matrices against a NumPy/SciPy rewrite of the reference
algorithm, and the rotation curve on a planted network whose units are exact concept detectors."""

import flax.linen as nn
import numpy as np
import pytest
import scipy.linalg

import jaxdissect
from jaxdissect import rotation
from jaxdissect.pipelines.dissect import DissectError


def reference_powers(n, powers, seed, unpermute):
    """The reference algorithm (reference 2.2), written out independently with explicit loops."""
    g = np.random.RandomState(seed).normal(size=(n, n))
    q, r = np.linalg.qr(g)
    for j in range(n):  # column j times sign(R_jj)
        if r[j, j] < 0:
            q[:, j] = -q[:, j]
    if np.linalg.det(q) < 0:
        q[0, :] = -q[0, :]
    t, w = scipy.linalg.schur(q, output="real")
    thetas = [np.arccos(min(1.0, max(-1.0, t[k, k]))) for k in range(0, n, 2)]

    def rebuild(p):
        m = np.zeros((n, n))
        for j, th in enumerate(thetas):
            a = p * th
            m[2 * j:2 * j + 2, 2 * j:2 * j + 2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
        return w.dot(m).dot(w.T)

    perm = np.eye(n)
    if unpermute:
        full = rebuild(1.0)
        perm = np.zeros((n, n))
        used = []
        for row in sorted(range(n), key=lambda i: -full[i].max()):
            for col in sorted(range(n), key=lambda c: -full[row, c]):
                if col not in used:
                    perm[col, row] = 1
                    used.append(col)
                    break
    return [perm.dot(rebuild(p)) for p in powers]


@pytest.mark.parametrize("n,seed,unpermute", [(8, 1, False), (12, 3, True), (64, 1, True)])
def test_matrices_equal_reference(n, seed, unpermute):
    powers = [0.0, 0.3, 0.5, 1.0]
    ours = rotation.random_rotation_powers(n, powers, seed, unpermute=unpermute)
    ref = reference_powers(n, powers, seed, unpermute)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-12)
        np.testing.assert_allclose(a @ a.T, np.eye(n), atol=1e-10)
        assert np.linalg.det(a) == pytest.approx(1.0) or unpermute
    if not unpermute:
        np.testing.assert_allclose(ours[0], np.eye(n), atol=1e-12)       # alpha = 0 is the identity
        half = ours[2]
        np.testing.assert_allclose(half @ half, ours[3], atol=1e-10)     # Q^.5 Q^.5 = Q
    again = rotation.random_rotation_powers(n, powers, seed, unpermute=unpermute)
    for a, b in zip(ours, again):
        np.testing.assert_array_equal(a, b)                              # same seed, same matrices
    other = rotation.random_rotation_powers(n, [1.0], seed + 1)[0]
    assert np.abs(other - ours[3]).max() > 0.1


def test_bad_inputs():
    with pytest.raises(rotation.RotationError, match="even channel count"):
        rotation.random_rotation_powers(7, [1.0], 1)
    with pytest.raises(rotation.RotationError, match="cannot act on a layer with 6 channels"):
        rotation.rotate_activations(np.zeros((1, 2, 2, 6), np.float32), np.eye(4))
    assert rotation.parse_rotation("0.5") == (0.5, 1)
    assert rotation.parse_rotation("1:7") == (1.0, 7)
    with pytest.raises(rotation.RotationError, match="ALPHA"):
        rotation.parse_rotation("half")


K, S, N = 16, 16, 32   # concepts = units, label grid, images


class _Identity(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x


class Planted(nn.Module):
    """Its layer ``units`` is the input: channel k is a graded detector of concept k, exactly."""

    @nn.compact
    def __call__(self, x):
        return _Identity(name="units")(x).mean(axis=(1, 2))


class PlantedConcepts:
    """Each pixel carries each of K concepts independently (p = 0.1); unit k's activation is a
    log-normal strength inside concept k's region and 0 outside, so unit k detects concept k."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.present = rng.random((N, S, S, K)) < 0.1
        self.acts = (self.present * np.exp(1.5 * rng.standard_normal((N, S, S, K)))).astype(np.float32)
        self.label_names = ["-"] + [f"concept{k}" for k in range(K)]
        self.label_categories = ["-"] + ["object"] * K
        self.categories = ["object"]
        self.name = "planted"

    def __len__(self):
        return N

    def fingerprint(self):
        return {"kind": "planted-concepts", "n": N}

    def get_batch(self, indices):
        idx = np.asarray(indices)
        seg = np.where(self.present[idx], np.arange(1, K + 1), 0).transpose(0, 3, 1, 2).astype(np.int32)
        return {"image": self.acts[idx], "display": np.zeros((len(idx), S, S, 3), np.uint8), "seg": seg,
                "valid": np.ones(len(idx), bool)}


def _unique(results, name, miniou):
    r = results[name]
    return len({int(lab) for lab, s in zip(r.label, r.label_iou) if s > miniou})


@pytest.mark.slow
def test_rotation_curve_on_planted_detectors():
    module, data = Planted(), PlantedConcepts()
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    curves = []
    for seed in (1, 2):  # the views of the layer share the passes; the second seed reuses the compiled steps
        mats = rotation.random_rotation_powers(K, alphas, seed)
        views = {f"units@{a}": ("units", m) for a, m in zip(alphas, mats)}
        views["units"] = ("units", None)
        results = jaxdissect.dissect(module, {}, [], data, "dataset", views=views, quantile=0.05,
                                     miniou=0.3, topk=3, batch_size=16, progress=False)
        plain = results["units"]
        assert _unique(results, "units", 0.3) == K
        np.testing.assert_array_equal(plain.label, np.arange(1, K + 1))      # unit k detects concept k
        r0 = results["units@0.0"]                                           # alpha = 0 changes nothing
        np.testing.assert_array_equal(r0.label, plain.label)
        np.testing.assert_allclose(r0.iou, plain.iou, atol=2e-3)
        curves.append([_unique(results, f"units@{a}", 0.3) for a in alphas])
    mean = np.mean(curves, axis=0)
    assert mean[0] == K and mean[-1] <= 1.5, curves                          # near zero at alpha = 1
    assert all(mean[i + 1] <= mean[i] for i in range(len(mean) - 1)), curves  # falls monotonically


def test_rotation_shape_mismatch_is_a_clear_error():
    with pytest.raises(DissectError, match="6x6 rotation cannot act on layer units with 16 channels"):
        jaxdissect.dissect(Planted(), {}, [], PlantedConcepts(), "dataset",
                           views={"units@1": ("units", np.eye(6))}, progress=False)
