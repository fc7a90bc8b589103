"""VGG16-Places365: converted random PyTorch weights reproduce the PyTorch reference; input pipeline.

The reference is ``tests/torch_reference.TorchVGG16`` (written from the spec
with torch.nn), so a wrong layout, fc6 permutation or layer order fails here.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from torch_reference import VGG_CONV_LAYERS, TorchVGG16, run_torch, save_state_dict  # noqa: E402

import jaxdissect  # noqa: E402
from jaxdissect.convert import vgg16_places365  # noqa: E402
from jaxdissect.preprocess import renormalize, vgg_preprocess  # noqa: E402


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


CLASSES = [f"class{i:03d}" for i in range(365)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("vgg16")
    torch_model = TorchVGG16(seed=0)
    pth = str(d / "vgg16_places365-test.pth")
    save_state_dict(torch_model, pth)
    (d / "classes.txt").write_text("".join(f"/{c[0]}/{c} {i}\n" for i, c in enumerate(CLASSES)))
    meta = vgg16_places365.convert(pth, str(d / "flax"), str(d / "classes.txt"))
    os.unlink(pth)
    module, variables = jaxdissect.load_model(str(d / "flax"))
    return torch_model, module, variables, meta, str(d / "flax")


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).standard_normal((1, 224, 224, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(models, images):
    """PyTorch logits and layer outputs on ``images``, computed once."""
    return run_torch(models[0], images, capture=VGG_CONV_LAYERS + ("pool5", "fc6", "fc7"))


def capture_all(module, variables, x):
    f = jax.jit(lambda v, x: module.apply(v, x, capture_intermediates=True, mutable=["intermediates"]))
    out, state = f(variables, x)
    return out, {k: v["__call__"][0] for k, v in state["intermediates"].items() if k != "__call__"}


@pytest.mark.slow
def test_logits_and_every_conv_layer_match_pytorch(models, images, reference):
    _, module, variables, _, _ = models
    ref_out, ref = reference
    out, acts = capture_all(module, variables, images)
    assert out.shape == (1, 365) and out.dtype == jnp.float32
    assert rel_err(out, ref_out) < 1e-4
    for name in ref:
        assert acts[name].shape == ref[name].shape, name
        assert rel_err(acts[name], ref[name]) < 1e-4, name
    # Conv captures are post-ReLU (spec 1.3 quirk) and not trivially zero.
    assert all(float(acts[n].min()) == 0.0 and float(acts[n].max()) > 0.0 for n in VGG_CONV_LAYERS)
    assert set(acts) >= set(jaxdissect.models.VGG16.layers)


@pytest.mark.slow
def test_intercepting_a_named_layer_ablates_units_like_pytorch(models, images, reference):
    torch_model, module, variables, _, _ = models
    units = [0, 5, 77, 300, 511]

    def zero(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "conv4_2" and context.method_name == "__call__":
            out = out.at[..., jnp.asarray(units)].set(0)
        return out

    with nn.intercept_methods(zero):
        out = jax.jit(module.apply)(variables, images)
    ref_out, _ = run_torch(torch_model, images, zero_units={"conv4_2": units})
    assert rel_err(out, ref_out) < 1e-4
    assert rel_err(ref_out, reference[0]) > 1e-3  # the ablation matters, so the check can fail


@pytest.mark.slow
def test_other_input_sizes_use_adaptive_average_pool(models):
    torch_model, module, variables, _, _ = models
    x = np.random.RandomState(1).standard_normal((1, 64, 96, 3)).astype(np.float32)
    ref_out, ref = run_torch(torch_model, x, capture=("fc6",))
    out, acts = capture_all(module, variables, x)
    assert acts["pool5"].shape == (1, 2, 3, 512) and acts["avgpool"].shape == (1, 7, 7, 512)
    assert rel_err(out, ref_out) < 1e-4
    assert rel_err(acts["fc6"], ref["fc6"]) < 1e-4


@pytest.mark.slow
def test_bfloat16_compute_is_close(models, images, reference):
    _, module, variables, _, _ = models
    out = jax.jit(module.clone(dtype=jnp.bfloat16).apply)(variables, images)
    assert out.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out, np.float32), reference[0]) < 0.1


@pytest.mark.slow
def test_check_model_on_image_files(models, tmp_path):
    from launch.check_model import check

    torch_model, *_, directory = models
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (200, 260, 3)).astype(np.uint8)).save(paths[-1])
    lines = []
    result = check(directory, images=paths, log=lines.append)
    ref, _ = run_torch(torch_model, np.stack([vgg_preprocess(p) for p in paths]))
    assert rel_err(result["output"], ref) < 1e-4
    text = "\n".join(lines)
    assert "conv5_3" in text and "(2, 14, 14, 512)" in text
    best = CLASSES[int(np.argmax(ref[1]))]                    # model.json's name of the top class, not its number
    assert f"sample 1: top-5 classes /{best[0]}/{best} (" in text


@pytest.mark.slow
def test_metadata(models):
    *_, meta, directory = models
    stored = jaxdissect.load_metadata(directory)
    assert stored["source_file"] == "vgg16_places365-test.pth"
    assert len(stored["source_sha256"]) == 64
    assert stored["preprocessing"]["normalization"] == "imagenet" and stored["preprocessing"]["crop"] == 224
    assert stored["layers"] == VGG_CONV_LAYERS  # JSON lists come back as tuples
    assert list(stored["classes"]) == [f"/{c[0]}/{c}" for c in CLASSES]  # first word of each line, in order


@pytest.mark.parametrize(
    "shape, words",
    [
        ((1, 3, 224, 224), "NCHW"),
        ((224, 224, 3), "batch axis"),
        ((1, 16, 16, 3), "at least 32x32"),
        ((1, 224, 224, 1), "[N, 224, 224, 3]"),
    ],
)
@pytest.mark.slow
def test_wrong_input_shape_is_a_clear_error(models, shape, words):
    _, module, variables, _, _ = models
    with pytest.raises(ValueError, match="VGG16 expects") as e:
        module.apply(variables, jnp.zeros(shape))
    assert words in str(e.value) and str(shape) in str(e.value)


# ---- preprocessing (spec 1.2) -------------------------------------------------

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.mark.parametrize("crop, offset", [(224, 16), (227, 14)])
def test_vgg_preprocess_matches_hand_computation(tmp_path, crop, offset):
    rng = np.random.RandomState(2)
    pixels = rng.randint(0, 256, (190, 300, 4)).astype(np.uint8)  # non-square RGBA
    path = tmp_path / "img.png"
    Image.fromarray(pixels, "RGBA").save(path)
    rgb = Image.fromarray(pixels, "RGBA").convert("RGB")
    resized = np.asarray(rgb.resize((256, 256), Image.BILINEAR), np.float64)
    expected = (resized[offset : offset + crop, offset : offset + crop] / 255.0 - MEAN) / STD
    for source in (str(path), Image.open(path)):
        x = vgg_preprocess(source, crop=crop)
        assert x.shape == (crop, crop, 3) and x.dtype == np.float32
        np.testing.assert_allclose(x, expected, atol=1e-5, rtol=0)


def test_vgg_preprocess_greyscale_becomes_rgb(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.fromarray(np.full((300, 300), 128, np.uint8), "L").save(path)
    x = vgg_preprocess(str(path))
    np.testing.assert_allclose(x[0, 0], (128 / 255 - MEAN) / STD, atol=1e-5)


def test_corrupt_image_names_the_file(tmp_path):
    good = tmp_path / "ok.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:60])
    for path in (bad, tmp_path / "missing.jpg"):
        with pytest.raises(ValueError, match="cannot read image") as e:
            vgg_preprocess(str(path))
        assert str(path) in str(e.value)


def test_renormalize_table():
    rng = np.random.RandomState(3)
    pt = rng.uniform(0, 1, (2, 5, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(renormalize(pt, "pt", "zc"), pt * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(renormalize(pt, "pt", "imagenet"), (pt - MEAN) / STD, atol=1e-5)
    np.testing.assert_allclose(renormalize(pt, "pt", "places_meanonly"),
                               (pt - [0.475, 0.441, 0.408]) * 255, atol=1e-4)
    np.testing.assert_allclose(renormalize(jnp.asarray(pt * 2 - 1), "zc", "imagenet"), (pt - MEAN) / STD, atol=1e-5)
    # byte target: clamp then truncate, as the original does.
    zc = np.array([[[[-1.5, 0.99, 0.5]]]], np.float32)  # -> -63.75, 253.72, 191.25
    assert renormalize(zc, "zc", "byte").tolist() == [[[[0, 253, 191]]]]
    np.testing.assert_allclose(renormalize(np.array([[[255, 0, 51]]], np.uint8), "byte", "pt"), [[[1, 0, 0.2]]],
                               atol=1e-6)
    with pytest.raises(ValueError, match="unknown image convention"):
        renormalize(pt, "pt", "caffe")


def test_set_cpu_xla_flags(monkeypatch):
    from importlib.metadata import version

    from jaxdissect.models import CPU_XLA_FLAGS, set_cpu_xla_flags

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    got = set_cpu_xla_flags()
    if version("jaxlib").startswith("0.10."):
        assert got == "--xla_force_host_platform_device_count=2 " + CPU_XLA_FLAGS == os.environ["XLA_FLAGS"]
    assert set_cpu_xla_flags() == got  # idempotent
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert set_cpu_xla_flags() == "--xla_cpu_experimental_ynn_fusion_type=dot"  # an explicit choice wins
