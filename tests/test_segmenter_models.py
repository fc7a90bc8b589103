"""Flax segmenters vs independent references: PyTorch modules built from the spec, NumPy integrals, planted values."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_segmenter_reference as R
from launcher_cli import cli
from jaxdissect.convert import common
from jaxdissect.convert import segmenter as conv
from jaxdissect.checkpoint import load_metadata, load_model
from jaxdissect.segmentation import (
    ColorSegmenter,
    UnifiedParsing,
    adaptive_avg_pool,
    color_preprocess,
    prroi_pool,
    resize_bilinear,
    upp_preprocess,
)
from jaxdissect.segmentation.prroi import prroi_matrix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------------------- resizing and preprocessing

@pytest.mark.parametrize("src,dst", [((5, 7), (13, 11)), ((13, 11), (5, 4)), ((1, 3), (4, 4)),
                                     ((64, 64), (56, 56))])
def test_resize_bilinear_matches_pytorch(src, dst):
    x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
    ref = F.interpolate(nchw(x), size=dst, mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    # PyTorch rounds source coordinates to float32 (ours are exact): ~1e-5 relative differences at most.
    assert rel_err(resize_bilinear(jnp.asarray(x), dst), ref) < 2e-5


@pytest.mark.parametrize("src,dst", [((224, 227), (256, 256)), ((100, 37), (7, 13)), ((7, 7), (3, 3)),
                                     ((8, 8), (6, 6))])
def test_adaptive_avg_pool_matches_pytorch(src, dst):
    x = np.random.default_rng(1).normal(size=(1, *src, 2)).astype(np.float32)
    ref = torch.nn.AdaptiveAvgPool2d(dst)(nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(adaptive_avg_pool(jnp.asarray(x), dst)), ref, atol=2e-6)


def test_upp_preprocess_matches_original_transform():
    x = np.random.default_rng(2).uniform(-1, 1, size=(2, 100, 120, 3)).astype(np.float32)
    for images in (x, x[:, :64, :64]):  # pooled to 64 x 64, and already that size
        ref = R.upp_preprocess_reference(nchw(images), 64).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(upp_preprocess(jnp.asarray(images), size=64)), ref, atol=1e-4)
    # Planted: a white pixel becomes 255 minus the B, G, R means in B, G, R order.
    white = upp_preprocess(jnp.ones((1, 4, 4, 3)), size=4)
    np.testing.assert_allclose(np.asarray(white[0, 0, 0]), [255 - 102.9801, 255 - 115.9465, 255 - 122.7717],
                               rtol=1e-6)


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_color_preprocess_matches_original_transform(order):
    fmt = {"byteorder": order, "mean": [0.1, 0.5, 0.9], "stdev": [0.2, 0.3, 0.4]}
    x = np.random.default_rng(3).uniform(-1, 1, size=(2, 50, 70, 3)).astype(np.float32)
    ref = R.color_preprocess_reference(nchw(x), fmt, 32).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(color_preprocess(jnp.asarray(x), fmt, 32)), ref, atol=1e-5)


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="NHWC"):
        upp_preprocess(jnp.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="byteorder"):
        color_preprocess(jnp.zeros((1, 8, 8, 3)), {"byteorder": "RBG", "mean": [0] * 3, "stdev": [1] * 3})
    with pytest.raises(ValueError, match="imageformat"):
        color_preprocess(jnp.zeros((1, 8, 8, 3)), {"mean": [0] * 3})


# ----------------------------------------------------------------------------- precise RoI pooling

def _riemann_prroi(f, bins, samples=200):
    """Midpoint-rule integral of the zero-padded bilinear interpolant of 2-D ``f`` over each bin, / bin area."""
    h, w = f.shape

    def tents(length, n_bins):
        # Sample points inside each bin; value of every pixel's tent there: [bins, samples, length].
        edges = np.arange(n_bins + 1) * (length / n_bins)
        t = edges[:-1, None] + (np.arange(samples) + 0.5)[None, :] * (length / n_bins) / samples
        return np.maximum(0.0, 1.0 - np.abs(t[..., None] - np.arange(length)))

    ty, tx = tents(h, bins), tents(w, bins)
    # Interpolant at every (y sample, x sample) of every bin pair, averaged over the samples.
    values = np.einsum("psi,ij,qtj->pqst", ty, f, tx)
    return values.mean(axis=(2, 3))


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (4, 4), (5, 7), (8, 8)])
def test_prroi_matches_numerical_integration(h, w):
    f = np.random.default_rng(h * 10 + w).normal(size=(h, w))
    x = jnp.asarray(f[None, :, :, None], jnp.float32)
    for bins in (1, 2, 3, 6):
        ours = np.asarray(prroi_pool(x, bins))[0, :, :, 0]
        np.testing.assert_allclose(ours, _riemann_prroi(f, bins), atol=2e-5)
        cellwise = R.prroi_pool_reference(torch.from_numpy(f[None, None]).double(), bins)[0, 0].numpy()
        np.testing.assert_allclose(ours, cellwise, atol=2e-6)


def test_prroi_planted_values():
    # A constant map of ones, RoI [0, 4]: the interpolant is 1 on [0, 3] and falls linearly to 0 on [3, 4]
    # (no pixel 4), so each axis averages (3 + 0.5) / 4.
    ones = jnp.ones((1, 4, 4, 1))
    np.testing.assert_allclose(float(prroi_pool(ones, 1)[0, 0, 0, 0]), (3.5 / 4) ** 2, rtol=1e-6)
    # Rows of the weight matrix integrate the tents: they sum to the covered tent mass / bin size.
    np.testing.assert_allclose(prroi_matrix(4, 2).sum(1), [1.0, 0.75], rtol=1e-6)


# ----------------------------------------------------------------------------- converted networks vs PyTorch

IMAGE_HW = (64, 96)  # C5 is 2 x 3: non-square, exercises every resize and the 6-bin RoI pooling
SEG_SIZE = (40, 52)


@pytest.fixture(scope="module")
def upp(tmp_path_factory):
    d = tmp_path_factory.mktemp("upp")
    paths = R.make_upp_checkpoint(d / "published")
    meta = conv.convert(paths["encoder"], paths["decoder"], paths["labels"], str(d / "converted"))
    return paths, meta, str(d / "converted")


@pytest.fixture(scope="module")
def color(tmp_path_factory):
    d = tmp_path_factory.mktemp("color")
    paths = R.make_color_checkpoint(d / "published")
    meta = conv.convert(paths["encoder"], paths["decoder"], paths["labels"], str(d / "converted"))
    return paths, meta, str(d / "converted")


def _softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def _apply_capturing(module, variables, x):
    """Jitted forward that also returns every submodule's output (compiling once beats op-by-op dispatch)."""
    fn = jax.jit(lambda v, x: module.apply(v, x, SEG_SIZE, capture_intermediates=True, mutable=["intermediates"]))
    return fn(variables, jnp.asarray(x))


@pytest.mark.slow
def test_upp_matches_pytorch_reference(upp):
    paths, meta, directory = upp
    module, variables = load_model(directory)
    labels = json.load(open(paths["labels"]))
    assert isinstance(module, UnifiedParsing)
    assert module.part_sizes == R.upp_part_sizes(labels) == (3, 4, 2)
    assert load_metadata(directory)["kind"] == "upp" and meta["source"]["dropped_keys"] == ["fc.bias", "fc.weight"]

    x = torch.randn(2, 3, *IMAGE_HW, generator=torch.Generator().manual_seed(7)) * 60
    feats, ref = R.upp_reference_forward(*R.load_upp_reference(paths), x, SEG_SIZE)
    out, state = _apply_capturing(module, variables, R.to_nhwc(x))
    for k in range(4):
        captured = state["intermediates"]["encoder"][f"layer{k + 1}"]["__call__"][0]
        assert rel_err(captured, R.to_nhwc(feats[k])) < 1e-4, f"encoder.layer{k + 1}"
    assert out["scene"].shape == (2, 3) and rel_err(out["scene"], ref["scene"].numpy()) < 1e-4
    for head, n in (("object", 6), ("material", 4), ("part", 9)):
        assert out[head].shape == (2, *SEG_SIZE, n)
        r = R.to_nhwc(ref[head])
        assert rel_err(out[head], r) < 1e-4, head
        if head != "part":
            assert rel_err(_softmax(np.asarray(out[head])), _softmax(r)) < 1e-4, head
    start = 0
    for size in module.part_sizes:  # probabilities within each part group, as the original computes them
        group = slice(start, start + size)
        ours = _softmax(np.asarray(out["part"])[..., group])
        theirs = _softmax(R.to_nhwc(ref["part"])[..., group])
        assert rel_err(ours, theirs) < 1e-4
        start += size


@pytest.mark.slow
def test_color_matches_pytorch_reference(color):
    paths, meta, directory = color
    module, variables = load_model(directory)
    assert isinstance(module, ColorSegmenter) and module.n_labels == 11
    assert load_metadata(directory)["labels"]["imageformat"]["byteorder"] == "BGR"
    assert "conv_last_deepsup.weight" in meta["source"]["dropped_keys"]

    x = torch.randn(2, 3, *IMAGE_HW, generator=torch.Generator().manual_seed(8))
    feats, ref = R.color_reference_forward(*R.load_color_reference(paths), x, SEG_SIZE)
    out, state = _apply_capturing(module, variables, R.to_nhwc(x))
    for k in range(4):
        captured = state["intermediates"]["encoder"][f"layer{k + 1}"]["__call__"][0]
        assert rel_err(captured, R.to_nhwc(feats[k])) < 1e-4, f"encoder.layer{k + 1}"
    assert captured.shape[1:3] == (8, 12)  # output stride 8
    assert out.shape == (2, *SEG_SIZE, 11)
    assert rel_err(out, R.to_nhwc(ref)) < 1e-4
    assert rel_err(_softmax(np.asarray(out)), _softmax(R.to_nhwc(ref))) < 1e-4


def test_color_bfloat16_override_stays_close(color):
    paths, _, directory = color
    module, variables = load_model(directory, dtype=jnp.bfloat16)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    _, ref = R.color_reference_forward(*R.load_color_reference(paths), x, (16, 16))
    out = jax.jit(lambda v, x: module.apply(v, x, (16, 16)))(variables, jnp.asarray(R.to_nhwc(x)))
    assert out.dtype == jnp.float32
    assert rel_err(out, R.to_nhwc(ref)) < 0.05


# ----------------------------------------------------------------------------- converter errors

def _convert_expecting(tmp_path, match, *, encoder, decoder, labels, kind=None, exc=common.ConversionError):
    with pytest.raises(exc, match=match):
        conv.convert(encoder, decoder, labels, str(tmp_path / "out"), kind=kind)
    assert not os.path.exists(tmp_path / "out" / "model.json")


def test_converter_rejects_missing_and_truncated_files(upp, tmp_path):
    p = upp[0]
    _convert_expecting(tmp_path, "does not exist", encoder=str(tmp_path / "nope.pth"), decoder=p["decoder"],
                       labels=p["labels"])
    _convert_expecting(tmp_path, "labels file .* does not exist", encoder=p["encoder"], decoder=p["decoder"],
                       labels=str(tmp_path / "labels.json"))
    truncated = tmp_path / "decoder_epoch_40.pth"
    truncated.write_bytes(open(p["decoder"], "rb").read()[:100000])
    _convert_expecting(tmp_path, "truncated or corrupt", encoder=p["encoder"], decoder=str(truncated),
                       labels=p["labels"])


def test_converter_rejects_wrong_models(upp, color, tmp_path):
    u, c = upp[0], color[0]
    _convert_expecting(tmp_path, "neither a UPerNet", encoder=u["encoder"], decoder=u["encoder"], labels=u["labels"])
    _convert_expecting(tmp_path, "--kind=upp but .* color decoder", encoder=c["encoder"], decoder=c["decoder"],
                       labels=c["labels"], kind="upp")
    # A colour encoder with the UPP decoder: every layer's shapes differ and are listed.
    _convert_expecting(tmp_path, r"unified-parsing encoder(.|\n)*wrong shape", encoder=c["encoder"],
                       decoder=u["decoder"], labels=u["labels"])
    # One tensor missing from an otherwise good encoder is named.
    state = torch.load(u["encoder"], weights_only=True)
    del state["layer3.4.bn2.running_var"]
    torch.save(state, tmp_path / "enc.pth")
    _convert_expecting(tmp_path, r"missing \(1\): layer3.4.bn2.running_var", encoder=str(tmp_path / "enc.pth"),
                       decoder=u["decoder"], labels=u["labels"])
    state = torch.load(c["decoder"], weights_only=True)
    state["conv_last.4.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "dec.pth")
    _convert_expecting(tmp_path, "NaN", encoder=c["encoder"], decoder=str(tmp_path / "dec.pth"), labels=c["labels"])


def test_converter_checks_labels_against_decoder(upp, color, tmp_path):
    u, c = upp[0], color[0]

    def labels_file(obj, name="labels.json"):
        path = tmp_path / name
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return str(path)

    good = json.load(open(u["labels"]))
    more = dict(good, object=good["object"] + ["extra"])
    _convert_expecting(tmp_path, r"object: decoder has 6, labels.json has 7", encoder=u["encoder"],
                       decoder=u["decoder"], labels=labels_file(more))
    fewer_parts = dict(good, object_part={k: v for k, v in good["object_part"].items() if k != "obj5"})
    _convert_expecting(tmp_path, "part: decoder has 9, labels.json has 7", encoder=u["encoder"],
                       decoder=u["decoder"], labels=labels_file(fewer_parts))
    _convert_expecting(tmp_path, "cannot parse .* as JSON", encoder=u["encoder"], decoder=u["decoder"],
                       labels=labels_file('{"object": ['))
    _convert_expecting(tmp_path, r"missing key\(s\) \['object_part'\]", encoder=u["encoder"],
                       decoder=u["decoder"], labels=labels_file({k: v for k, v in good.items() if k != "object_part"}))
    stray = dict(good, object_part=dict(good["object_part"], ghost=["-"]))
    _convert_expecting(tmp_path, "'ghost', which is not in the 'object' list", encoder=u["encoder"],
                       decoder=u["decoder"], labels=labels_file(stray))
    # The UPP labels with the colour model, and a colour label list one short.
    _convert_expecting(tmp_path, "'labels' must be", encoder=c["encoder"], decoder=c["decoder"], labels=u["labels"])
    short = json.load(open(c["labels"]))
    short["labels"] = short["labels"][:-1]
    _convert_expecting(tmp_path, "label: decoder has 11, labels.json has 10", encoder=c["encoder"],
                       decoder=c["decoder"], labels=labels_file(short))


def test_converter_refuses_nonempty_output(upp, tmp_path):
    p = upp[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(common.ConversionError, match="not empty"):
        conv.convert(p["encoder"], p["decoder"], p["labels"], str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_converter_command_line_reports_errors(upp, tmp_path):
    p = upp[0]
    code, _, err = cli("converters.segmenter", f"--encoder={p['encoder']}", f"--decoder={p['decoder']}",
                       f"--labels={tmp_path / 'missing.json'}", f"--output={tmp_path / 'out'}")
    assert code == 1
    assert "error: labels file" in err and "does not exist" in err
