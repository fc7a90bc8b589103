"""Converters: every accepted layout, the command line, and clear errors for bad checkpoints.

Full-size numerical equivalence lives in test_vgg16.py / test_proggan.py; here a
256x256 ProGAN with narrow widths (same 14-layer names) keeps conversions cheap.
"""

import os
import subprocess

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import launcher_cli  # noqa: E402
from torch_reference import TorchProGAN, run_torch, save_state_dict, to_old_format  # noqa: E402

import jaxdissect  # noqa: E402
from jaxdissect.convert import proggan as proggan_converter  # noqa: E402
from jaxdissect.convert import vgg16_places365 as vgg_converter  # noqa: E402
from jaxdissect.convert.common import ConversionError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NARROW = (32, 32, 32, 32, 16, 16, 8, 8)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def cli(module, *args):
    """``python -m module *args`` run in this process (tests/launcher_cli.py), as a CompletedProcess."""
    return subprocess.CompletedProcess(args, *launcher_cli.cli(module, *args))


@pytest.fixture(scope="module")
def generator():
    return TorchProGAN(sizes=NARROW, seed=1)


@pytest.fixture(scope="module")
def cli_converted(generator, tmp_path_factory):
    """The old-format, wrapped state_dict converted on the command line."""
    d = tmp_path_factory.mktemp("cli")
    save_state_dict(to_old_format(generator.state_dict()), str(d / "old.pth"), wrap=True)
    result = cli("converters.proggan", f"--input={d / 'old.pth'}", f"--output={d / 'flax'}")
    assert result.returncode == 0, result.stderr
    return str(d / "flax")


def test_cli_old_format_wrapped_matches_pytorch(generator, cli_converted):
    module, variables = jaxdissect.load_model(cli_converted)
    assert module.sizes == NARROW and module.layers[-1] == "output_256x256"
    z = np.random.RandomState(3).standard_normal((2, 32)).astype(np.float32)
    ref_out, ref = run_torch(generator, z, capture=("layer9",))
    f = jax.jit(lambda v, z: module.apply(v, z, capture_intermediates=True, mutable=["intermediates"]))
    out, state = f(variables, z)
    assert rel_err(out, ref_out) < 1e-4
    assert rel_err(state["intermediates"]["layer9"]["__call__"][0], ref["layer9"]) < 1e-4
    meta = jaxdissect.load_metadata(cli_converted)
    assert meta["source_file"] == "old.pth" and meta["sizes"] == NARROW and meta["output"]["normalization"] == "zc"


@pytest.mark.parametrize("old, wrap", [(False, False), (False, True), (True, False)])
def test_every_layout_gives_the_same_variables(generator, cli_converted, tmp_path, old, wrap):
    state = generator.state_dict()
    save_state_dict(to_old_format(state) if old else state, str(tmp_path / "g.pth"), wrap=wrap)
    proggan_converter.convert(str(tmp_path / "g.pth"), str(tmp_path / "flax"))
    _, got = jaxdissect.load_model(str(tmp_path / "flax"))
    _, want = jaxdissect.load_model(cli_converted)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    # Independent check of the re-layout: PyTorch [out, in, kh, kw] -> [kh, kw, in, out].
    w = state["layer3.conv.weight"].numpy()
    np.testing.assert_array_equal(got["params"]["layer3"]["kernel"][1, 2], w[:, :, 1, 2].T)


def test_truncated_checkpoint(generator, tmp_path):
    path = tmp_path / "cut.pth"
    save_state_dict(generator, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for converter in (proggan_converter, vgg_converter):
        with pytest.raises(ConversionError, match="truncated or corrupt") as e:
            converter.convert(str(path), str(tmp_path / "out"))
        assert str(path) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_proggan_file_to_vgg_converter_says_so(generator, tmp_path):
    path = tmp_path / "proggan.pth"
    save_state_dict(generator, str(path))
    with pytest.raises(ConversionError, match="Progressive GAN generator checkpoint: use python -m converters.proggan"):
        vgg_converter.convert(str(path), str(tmp_path / "out"))
    result = cli("converters.vgg16_places365", f"--input={path}", f"--output={tmp_path / 'out'}")
    assert result.returncode != 0
    assert "does not match VGG16-Places365" in result.stderr and "converters.proggan" in result.stderr
    assert "Traceback" not in result.stderr


def vgg_shaped_state(**overrides):
    """Zero-cost stand-ins (broadcast views) with the published VGG16 keys and shapes."""
    shapes = dict(vgg_converter.expected_shapes(), **overrides)
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items() if s is not None}


def test_vgg_file_to_proggan_converter_says_so():
    with pytest.raises(ConversionError, match="VGG16 checkpoint: use python -m converters.vgg16_places365"):
        proggan_converter.convert_state_dict(vgg_shaped_state())


def test_vgg_missing_key_and_wrong_shape_are_all_reported():
    state = vgg_shaped_state(**{"classifier.fc7.weight": (4096, 4095)})
    del state["features.conv3_2.bias"]
    state["features.conv9_9.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        vgg_converter.convert_state_dict(state)
    msg = str(e.value)
    assert "does not match VGG16-Places365" in msg
    assert "missing (1): features.conv3_2.bias" in msg
    assert "unexpected (1): features.conv9_9.weight" in msg
    assert "classifier.fc7.weight: file has (4096, 4095), VGG16-Places365 (experiment/oldvgg16.py) needs (4096, 4096)" in msg


def test_proggan_missing_key_and_wrong_shape(generator):
    state = {k: v.numpy() for k, v in generator.state_dict().items()}
    del state["layer6.wscale.b"]
    state["layer5.conv.weight"] = np.zeros((16, 32, 3, 4), np.float32)
    with pytest.raises(ConversionError) as e:
        proggan_converter.convert_state_dict(state)
    msg = str(e.value)
    assert "missing (1): layer6.wscale.b" in msg
    assert "layer5.conv.weight: file has (16, 32, 3, 4)" in msg and "needs (16, 32, 3, 3)" in msg
    # A generator whose widths cannot be inferred at all.
    with pytest.raises(ConversionError, match="no 4-D 'layer1.conv.weight'"):
        proggan_converter.convert_state_dict({"layer2.conv.weight": np.zeros((4, 4, 3, 3), np.float32)})


def test_cli_requires_both_flags(tmp_path):
    result = cli("converters.vgg16_places365", f"--output={tmp_path / 'out'}")
    assert result.returncode != 0 and "--input" in result.stderr


def test_check_model_on_a_generator(generator, cli_converted, tmp_path):
    from jaxdissect.data.latents import standard_z_sample
    from launch.check_model import check

    lines = []
    result = check(cli_converted, num_samples=3, output=str(tmp_path / "grid.png"), log=lines.append)
    text = "\n".join(lines)
    for name in ("layer1", "layer14", "output_256x256"):
        assert f"  {name} " in text
    assert "(3, 128, 128, 8)" in text  # layer12's shape
    # The images are the generator's output on the original's seed-1 z's.
    ref, _ = run_torch(generator, standard_z_sample(3, depth=32, seed=1))
    assert rel_err(result["output"], ref) < 1e-4
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (2 * 256, 2 * 256)
    with pytest.raises(ValueError, match="--image is for classifiers"):
        check(cli_converted, images=["x.jpg"], log=lines.append)


def test_non_empty_output_is_refused_before_reading(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("results")
    for converter in (proggan_converter, vgg_converter):
        with pytest.raises(ConversionError, match="is not empty"):
            converter.convert(str(tmp_path / "missing.pth"), str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
