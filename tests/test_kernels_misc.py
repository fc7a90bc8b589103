"""Upsampling geometries, top-k with exact means, and label choice, against independent references."""

from fractions import Fraction

import jax
import numpy as np
import pytest
import torch

from jaxdissect.kernels import labels as lk
from jaxdissect.kernels import topk as tk
from jaxdissect.kernels import upsample as uk

_UPSAMPLE = jax.jit(uk.upsample, static_argnames=("size", "geometry", "convolutions", "image_size"))

# AlexNet (Caffe style) conv1..pool5 as (kernel, stride, padding, dilation).
ALEXNET = ((11, 4, 0, 1), (3, 2, 0, 1), (5, 1, 2, 1), (3, 2, 0, 1), (3, 1, 1, 1), (3, 1, 1, 1), (3, 1, 1, 1),
           (3, 2, 0, 1))


def _formula(a, th, tw, clamp=False):
    """Direct evaluation of the spec's formula, per output pixel, float64 loops."""
    b, sh, sw, u = a.shape
    out = np.zeros((b, th, tw, u))

    def sample(ss, ts, t):
        x = (t + 0.5) * ss / ts - 0.5
        if clamp:
            x = min(max(x, 0.0), ss - 1.0)
        i = int(np.floor(x))
        f = x - i
        return [(j, w) for j, w in ((i, 1 - f), (i + 1, f)) if 0 <= j < ss]

    for y in range(th):
        for x in range(tw):
            for jy, wy in sample(sh, th, y):
                for jx, wx in sample(sw, tw, x):
                    out[:, y, x] += wy * wx * a[:, jy, jx]
    return out


def test_original_geometry_equals_the_formula_with_attenuated_borders():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 14, 5, 3)).astype(np.float32)
    got = np.asarray(_UPSAMPLE(a, (56, 3)))
    np.testing.assert_allclose(got, _formula(a.astype(np.float64), 56, 3), rtol=1e-6, atol=1e-6)
    ones = np.ones((1, 14, 14, 1), np.float32)
    up = np.asarray(_UPSAMPLE(ones, (56, 56)))[0, :, :, 0]
    np.testing.assert_allclose(up[0, 20], 0.625, rtol=1e-7)
    np.testing.assert_allclose(up[1, 20], 0.875, rtol=1e-7)
    np.testing.assert_allclose(up[0, 0], 0.625 ** 2, rtol=1e-7)
    np.testing.assert_allclose(up[20, 20], 1.0, rtol=1e-7)
    # 224 -> 56 point-samples source pixels 4t+1 and 4t+2 (no antialiasing).
    big = rng.standard_normal((1, 224, 8, 1)).astype(np.float32)
    down = np.asarray(_UPSAMPLE(big, (56, 8)))[0, :, :, 0]
    np.testing.assert_allclose(down, (big[0, 1::4, :, 0] + big[0, 2::4, :, 0]) / 2, rtol=1e-6, atol=1e-6)


def test_original_geometry_equals_torch_grid_sample_with_zero_padding():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 7, 9, 3)).astype(np.float32)
    th, tw = 20, 6
    ys = (np.arange(th) + 0.5) * 7 / th - 0.5
    xs = (np.arange(tw) + 0.5) * 9 / tw - 0.5
    grid = np.stack(np.meshgrid(2 * xs / 8 - 1, 2 * ys / 6 - 1), -1)[None].repeat(2, 0)
    want = torch.nn.functional.grid_sample(torch.tensor(a).permute(0, 3, 1, 2), torch.tensor(grid, dtype=torch.float32),
                                           mode="bilinear", padding_mode="zeros", align_corners=True)
    np.testing.assert_allclose(np.asarray(_UPSAMPLE(a, (th, tw))), want.permute(0, 2, 3, 1).numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(28, 20), (5, 3)])
def test_clamped_geometry_equals_torch_and_jax_resize(size):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, 7, 9, 3)).astype(np.float32)
    got = np.asarray(_UPSAMPLE(a, size=size, geometry="clamped"))
    want = torch.nn.functional.interpolate(torch.tensor(a).permute(0, 3, 1, 2), size=size, mode="bilinear",
                                           align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, _formula(a.astype(np.float64), *size, clamp=True), rtol=1e-6, atol=1e-6)
    if size[0] > 7:
        resized = jax.image.resize(a, (2, *size, 3), "bilinear")
        np.testing.assert_allclose(got, np.asarray(resized), rtol=1e-5, atol=1e-6)


def test_upsampling_of_an_image_does_not_depend_on_its_batch():
    a = np.random.default_rng(3).standard_normal((5, 13, 13, 4)).astype(np.float32)
    whole = np.asarray(jax.jit(lambda x: uk.upsample(x, (56, 56)))(a))
    one = np.asarray(jax.jit(lambda x: uk.upsample(x, (56, 56)))(a[3:4]))
    np.testing.assert_array_equal(whole[3:4], one)


def test_receptive_field_mapping_reproduces_the_alexnet_numbers():
    assert uk.receptive_field(ALEXNET) == (32.0, 33.0)
    assert uk.conv_output_size(227, ALEXNET[:1]) == 55 and uk.conv_output_size(227, ALEXNET) == 6
    # The original's grid for pool5 (6x6), applied to conv5's 13x13 map, spans indices -2.47 .. 14.47.
    scale, offset = 32 * 55 / 226, 33 * 55 / 226
    x6 = (np.arange(56) - offset) / scale
    np.testing.assert_allclose([2 * x6[0] / 5 - 1, 2 * x6[-1] / 5 - 1], [-1.4125, 1.4123], atol=3e-4)
    taps = uk.receptive_field_taps(13, 56, ALEXNET, 227)
    m = taps.matrix(13)
    x13 = x6 * 12 / 5
    np.testing.assert_allclose([x13[0], x13[-1]], [-2.475, 14.47], atol=0.01)
    ramp = np.arange(13.0)                       # linear data: the mapping reads off x inside the map
    inside = (x13 >= 0) & (x13 <= 12)
    np.testing.assert_allclose((m @ ramp)[inside], x13[inside], atol=1e-9)
    assert np.all(m[x13 < -1] == 0) and np.all(m[x13 > 13] == 0)   # zero padding outside
    # With the layers up to the dissected one the grid covers the actual map (the corrected variant).
    conv5 = uk.receptive_field_taps(13, 56, ALEXNET[:7], 227).matrix(13)
    a = np.random.default_rng(4).standard_normal((1, 13, 13, 2)).astype(np.float32)
    got = np.asarray(_UPSAMPLE(a, (56, 56), convolutions=ALEXNET[:7], image_size=227))
    np.testing.assert_allclose(got[0, :, :, 1], conv5 @ a[0, :, :, 1] @ conv5.T, rtol=1e-5, atol=1e-5)


_TOPK = jax.jit(tk.update)
N, H, W, UNITS, K = 7, 3, 4, 6, 7      # one compiled shape for all top-k tests


def _merge(*states):
    return tk.merge(jax.tree.map(lambda *s: np.stack([np.asarray(v) for v in s]), *states), H * W)


def _fold(a, index, parts):
    """Per-part states of ``a`` split into ``parts`` interleaved shares, padded to N images each."""
    states = []
    for i in range(parts):
        x, idx = a[i::parts], index[i::parts]
        pad = N - len(x)
        states.append(_TOPK(tk.init(UNITS, K), np.concatenate([x, np.zeros((pad, H, W, UNITS), np.float32)]),
                            np.arange(N) < len(x), np.r_[idx, np.zeros(pad, np.int32)]))
    return states


def test_topk_equals_a_stable_numpy_sort_and_merges_identically():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3 * N, H, W, UNITS)).astype(np.float32)
    a[4] = a[11]                                  # tied images: the lower index wins
    a[:, :, :, 2] = np.round(a[:, :, :, 2])       # many ties
    index = np.arange(3 * N, dtype=np.int32) + 1000
    whole = tk.init(UNITS, K)
    for i in range(0, 3 * N, N):                  # one state fed in order
        whole = _TOPK(whole, a[i:i + N], np.ones(N, bool), index[i:i + N])
    r1, r3 = _merge(whole), _merge(*_fold(a, index, 3))
    score = a.max((1, 2))
    for unit in range(UNITS):
        order = np.lexsort((index, -score[:, unit]))[:K]
        np.testing.assert_array_equal(r1["top_index"][unit], index[order])
        np.testing.assert_array_equal(r1["top_values"][unit], score[order, unit])
    for key in r1:
        np.testing.assert_array_equal(r1[key], r3[key], err_msg=key)
    np.testing.assert_array_equal(r1["max"], a.max((0, 1, 2)))
    assert r1["images"] == 3 * N


def test_topk_pads_missing_images_with_minus_one():
    a = np.ones((2, H, W, UNITS), np.float32)
    r = _merge(*_fold(a, np.arange(2, dtype=np.int32), 1))
    np.testing.assert_array_equal(r["top_index"][0], [0, 1] + [-1] * (K - 2))
    assert np.isneginf(r["top_values"][0, 2:]).all() and r["images"] == 2


def test_mean_is_exact_whatever_the_split():
    rng = np.random.default_rng(6)
    a = (rng.standard_normal((3 * N, H, W, UNITS)) * np.exp(rng.uniform(-40, 40, (1, 1, 1, UNITS))))
    a = a.astype(np.float32)
    a[0, 0, 0, 1] = 1e-45                          # subnormal
    a[:, :, :, 3] = np.float32(3e38)               # sums far beyond float32
    a[1::2, :, :, 2] *= -1
    index = np.arange(3 * N, dtype=np.int32)
    for parts in (1, 3):
        merged = _merge(*_fold(a, index, parts)) if parts > 1 else None
        if parts == 1:
            whole = tk.init(UNITS, K)
            for i in range(0, 3 * N, N):
                whole = _TOPK(whole, a[i:i + N], np.ones(N, bool), index[i:i + N])
            merged = _merge(whole)
        for unit in range(UNITS):
            exact = sum(Fraction(float(v)) for v in a[..., unit].ravel()) / a[..., unit].size
            assert merged["mean"][unit] == float(exact), (parts, unit)


def test_best_labels_row0_option_strict_threshold_and_ties():
    iou = np.array([[0.30, 0.10, 0.20, 0.00],     # row 0 (activation rate) beats the real labels
                    [0.01, 0.04, 0.02, 0.04],     # best 0.04: tie -> lowest index; not above miniou
                    [0.01, 0.00, 0.50, 0.05]])
    label, best, ok = lk.best_labels(iou)
    np.testing.assert_array_equal(label, [2, 1, 2])
    np.testing.assert_array_equal(best, [0.20, 0.04, 0.50])
    np.testing.assert_array_equal(ok, [True, False, True])
    label, best, ok = lk.best_labels(iou, row0_competes=True)
    np.testing.assert_array_equal(label, [0, 1, 2])
    np.testing.assert_array_equal(ok, [False, False, True])
    label, _, ok = jax.jit(lambda x: lk.best_labels(x, miniou=0.1))(iou)
    np.testing.assert_array_equal(np.asarray(ok), [True, False, True])
    assert lk.describe([2, 0], ["-", "sky", "tree", "x"], ["-", "object", "material", "y"]) == \
        [("tree", "material"), ("-", "-")]
