"""IoU count kernel against explicit NumPy masks; both formulations; bad labels; merges."""

import jax
import numpy as np
import pytest

from jaxdissect.kernels import iou as ik

B, K, S, U, L, J = 4, 3, 6, 5, 9, 2
_UPDATE = jax.jit(ik.update, static_argnames="method")


def _batch(rng):
    act = rng.standard_normal((B, S, S, U)).astype(np.float32)
    thr = (rng.standard_normal(U) * 0.5).astype(np.float32)
    act[0, 0, 0, 0] = thr[0]                       # equal to the threshold: not active (strict)
    seg = rng.integers(0, L, (B, K, S, S)).astype(np.int32)
    seg[:, 1] = np.where(rng.random((B, S, S)) < 0.4, seg[:, 0], seg[:, 1])   # repeated labels
    img = rng.integers(-1, L, (B, J)).astype(np.int32)
    img[1, 1] = img[1, 0]
    img[2, 0] = seg[2, 0, 0, 0]                    # image label also present in a pixel channel
    return act, thr, seg, img


def _reference(act, thr, seg, img, valid):
    """Counts from explicit boolean masks (label 0 = every pixel)."""
    active = (act > thr) & valid[:, None, None, None]
    member = np.zeros((B, S, S, L), bool)
    for b in range(B):
        for k in range(K):
            member[b, np.arange(S)[:, None], np.arange(S)[None], seg[b, k]] = True
        for j in range(J):
            if img[b, j] > 0:
                member[b, :, :, img[b, j]] = True
    member[..., 0] = True
    member &= valid[:, None, None, None]
    inter = np.einsum("bhwu,bhwl->ul", active.astype(np.int64), member.astype(np.int64))
    return {"pixels": int(valid.sum()) * S * S, "label_pixels": member.sum((0, 1, 2)),
            "active": active.sum((0, 1, 2)), "intersection": inter}


@pytest.mark.parametrize("method", ["segment", "matmul"])
def test_counts_equal_explicit_masks(method):
    rng = np.random.default_rng(0)
    act, thr, seg, img = _batch(rng)
    valid = np.array([True, True, True, False])
    state = _UPDATE(ik.init(U, L), act, thr, seg, valid, np.full(B, 3), img, method=method)
    got = ik.merge(jax.tree.map(lambda x: np.asarray(x)[None], state))
    want = _reference(act, thr, seg, img, valid)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert got["bad_labels"] == 0 and got["first_bad_batch"] == ik.NO_BATCH
    assert ik.default_method() == "segment"      # CPU tests; 'matmul' on GPU/TPU


def test_iou_is_the_ratio_of_dataset_sums():
    rng = np.random.default_rng(2)
    act, thr, seg, img = _batch(rng)
    halves = [_UPDATE(ik.init(U, L), act, thr, seg, np.arange(B) // 2 == i, np.full(B, i), img, method="segment")
              for i in (0, 1)]                      # two partial states, as on two devices
    merged = ik.merge(jax.tree.map(lambda *s: np.stack([np.asarray(v) for v in s]), *halves))
    got = ik.iou(merged["intersection"], merged["active"], merged["label_pixels"])
    active = act > thr
    want = np.zeros((U, L))
    for u in range(U):
        for c in range(L):
            lab = np.zeros((B, S, S), bool) if c else np.ones((B, S, S), bool)
            if c:
                lab |= (seg == c).any(1)
                lab |= (img == c).any(1)[:, None, None]
            union = (active[..., u] | lab).sum()
            want[u, c] = (active[..., u] & lab).sum() / union if union else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got[:, 0], active.mean((0, 1, 2)), rtol=1e-12)   # row 0 = activation rate
    assert ik.iou(np.zeros((1, 2)), np.zeros(1), np.zeros(2)).tolist() == [[0.0, 0.0]]


def test_out_of_range_labels_are_flagged_with_their_batch():
    rng = np.random.default_rng(3)
    act, thr, seg, img = _batch(rng)
    valid = np.ones(B, bool)
    seg[2, 1, 3, 3] = L
    img[3, 0] = -2
    state = _UPDATE(ik.init(U, L), act, thr, seg, valid, np.array([5, 5, 6, 7]), img, method="segment")
    assert int(state["bad_labels"]) == 2 and int(state["first_bad_batch"]) == 6
    seg[0, 0, 0, 0] = -1
    invalid = np.array([True, True, True, False])   # padding rows never count as bad
    state = _UPDATE(ik.init(U, L), act, thr, seg, invalid, np.array([5, 5, 6, 7]), img, method="segment")
    assert int(state["bad_labels"]) == 2 and int(state["first_bad_batch"]) == 5


def test_shape_mismatch_is_refused():
    rng = np.random.default_rng(4)
    act, thr, seg, _ = _batch(rng)
    with pytest.raises(ValueError, match="does not match"):
        ik.update(ik.init(U, L), act, thr, seg[:, :, :5])
    with pytest.raises(ValueError, match="units"):
        ik.update(ik.init(U + 1, L), act, thr, seg)
