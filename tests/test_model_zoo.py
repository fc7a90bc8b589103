"""AlexNet-Places365, ResNet152-Places365 and the torchvision layouts against PyTorch references from the spec.

Each architecture: random weights and BatchNorm statistics in a reference
module with the published key names, converted, then logits and captured
layers compared (max relative error < 1e-4). Inputs are small where the
architecture allows (the nets are fully convolutional up to an adaptive pool)
to keep the suite fast.
"""

import os
import subprocess

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import launcher_cli  # noqa: E402
import torch_zoo_reference as ref  # noqa: E402

import jaxdissect  # noqa: E402
from jaxdissect.convert import torchvision as tv_converter  # noqa: E402
from jaxdissect.convert.common import ConversionError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.abs(a - b).max() / np.abs(b).max()


def images(n, size, seed=0):
    return np.random.RandomState(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def cli(module, *args):
    """``python -m module *args`` run in this process (tests/launcher_cli.py), as a CompletedProcess."""
    return subprocess.CompletedProcess(args, *launcher_cli.cli(module, *args))


def compare(torch_model, module, variables, x, pairs, jit=False):
    """Logits and each (flax layer, torch path) pair agree to TOL.

    Eager by default: for a deep net with few distinct layer shapes (ResNet152)
    that costs less CPU than compiling the whole net; DenseNet, whose every
    layer has a new channel count, is cheaper compiled once (``jit=True``).
    """
    ref_out, ref_acts = ref.run_torch(torch_model, x, capture=[t for _, t in pairs])
    run = lambda v, x: jaxdissect.capture(module, v, x, layers=[f for f, _ in pairs])  # noqa: E731
    out, acts = (jax.jit(run) if jit else run)(variables, x)
    assert rel_err(out, ref_out) < TOL
    for f, t in pairs:
        assert rel_err(acts[f], ref_acts[t]) < TOL, f


@pytest.mark.slow
def test_torchvision_vgg16_dataparallel():
    model = ref.tv_vgg16(num_classes=10, seed=1)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    module, variables = tv_converter.convert_state_dict(state, "vgg16", 10)
    compare(model, module, variables, images(2, 64),
            [("conv1_1", "features.0"), ("conv4_2", "features.19"), ("pool5", "features.30"), ("fc7", "classifier.4")])


def test_alexnet_places365_matches_reference():
    from jaxdissect.convert import alexnet_places365

    model = ref.places_alexnet(seed=2)
    module, variables = alexnet_places365.convert_state_dict(
        {k: v.numpy() for k, v in model.state_dict().items()})
    compare(model, module, variables, images(2, 227),
            [(f"conv{i}", f"conv{i}") for i in range(1, 6)]
            + [("lrn2", "lrn2"), ("pool5", "pool5"), ("fc6", "fc6"), ("fc7", "fc7"), ("fc8", "fc8")])


@pytest.mark.slow
def test_resnet152_places365_matches_reference_and_torchvision_layout():
    """The Torch7 numeric layout against its reference; the same weights in torchvision's layout convert alike."""
    from jaxdissect.convert import resnet152_places365

    model = ref.old_resnet152(seed=3, pool=torch.nn.AdaptiveAvgPool2d(1))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert len(resnet152_places365.expected_shapes()) == 777  # the released file's tensor count (spec 5.3)
    module, variables = resnet152_places365.convert_state_dict(state)
    compare(model, module, variables, images(1, 64),
            [("0", "0"), ("4", "4"), ("5", "5"), ("6", "6"), ("7", "7"), ("6.35", "6.35")])

    # torchvision resnet152 keys of the same tensors, renamed by the spec's table (not by the converter's).
    part = {"0.0.0": "conv1", "0.0.1": "bn1", "0.0.3": "conv2", "0.0.4": "bn2", "0.0.6": "conv3", "0.0.7": "bn3",
            "0.1.0": "downsample.0", "0.1.1": "downsample.1"}
    tv_state = {}
    for k, v in state.items():
        head, leaf = k.rsplit(".", 1)
        top = head.split(".")
        if top[0] in ("4", "5", "6", "7"):
            name = f"layer{int(top[0]) - 3}.{top[1]}.{part['.'.join(top[2:])]}"
        else:
            name = {"0": "conv1", "1": "bn1", "10.1": "fc"}[head]
        tv_state[f"{name}.{leaf}"] = v
    tv_module, tv_variables = tv_converter.convert_state_dict(tv_state, "resnet152", 365)
    rename = {"0": "conv1", "1": "bn1", "10": "fc", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
    for col in ("params", "batch_stats"):
        mapped = {rename[k]: v for k, v in variables[col].items()}
        assert jax.tree.structure(mapped) == jax.tree.structure(tv_variables[col])
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mapped), jax.tree.leaves(tv_variables[col])))
    assert tv_module.depth == 152 and tv_module.num_classes == 365


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet(depth):
    model = ref.tv_resnet(depth, num_classes=7, seed=depth)
    module, variables = tv_converter.convert_state_dict(model.state_dict(), f"resnet{depth}", 7)
    compare(model, module, variables, images(1, 64), [("conv1", "conv1"), ("layer1", "layer1"), ("layer4", "layer4")])


@pytest.mark.slow
def test_torchvision_densenet161_old_key_spelling():
    model = ref.tv_densenet161(num_classes=5, seed=4)
    state = ref.old_densenet_keys(model.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in state
    module, variables = tv_converter.convert_state_dict(state, "densenet161", 5)
    compare(model, module, variables, images(1, 64),
            [("features", "features"), ("features.denseblock2", "features.denseblock2"),
             ("features.transition3", "features.transition3")], jit=True)


@pytest.mark.slow
def test_torchvision_alexnet():
    model = ref.tv_alexnet(num_classes=11, seed=5)
    module, variables = tv_converter.convert_state_dict(model.state_dict(), "alexnet", 11)
    compare(model, module, variables, images(2, 224),
            [("conv2", "features.3"), ("conv5", "features.10"), ("pool5", "features.12"), ("fc6", "classifier.1")])


def test_cli_torchvision_checkpoint_wrapped_dataparallel(tmp_path):
    """A NetDissect-Lite style .pth.tar ({'state_dict': DataParallel keys, 'epoch': ...}) on the command line."""
    model = ref.tv_resnet(18, num_classes=6, seed=6)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state}, tmp_path / "r18.pth.tar")
    (tmp_path / "classes.txt").write_text("".join(f"/a/class{i} {i}\n" for i in range(6)))
    result = cli("converters.torchvision", "--arch=resnet18", "--num_classes=6", f"--input={tmp_path / 'r18.pth.tar'}",
                 f"--output={tmp_path / 'm'}", f"--classes={tmp_path / 'classes.txt'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torchvision resnet18, 6 classes" in result.stdout
    module, variables = jaxdissect.load_model(str(tmp_path / "m"))
    meta = jaxdissect.load_metadata(str(tmp_path / "m"))
    assert meta["preprocessing"] == {"normalization": "imagenet", "resize": 256, "crop": 224,
                                     "function": "jaxdissect.preprocess.vgg_preprocess"}
    assert list(meta["classes"][:2]) == ["/a/class0", "/a/class1"] and meta["arch"] == "resnet18"
    x = images(1, 64, seed=7)
    ref_out, ref_acts = ref.run_torch(model, x, capture=["layer4"])
    out, acts = jaxdissect.capture(module, variables, x, layers=["layer4"])
    assert rel_err(out, ref_out) < TOL and rel_err(acts["layer4"], ref_acts["layer4"]) < TOL


def test_whole_pickled_model_is_refused_with_how_to_resave(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3)), tmp_path / "whole.pth")
    with pytest.raises(ConversionError, match=r"whole pickled model.*torch\.save\(model\.state_dict\(\)"):
        tv_converter.convert(str(tmp_path / "whole.pth"), str(tmp_path / "out"), "resnet18", 1000)
    assert not (tmp_path / "out").exists()


def test_torchvision_bad_inputs(tmp_path):
    small = ref.tv_resnet(18, num_classes=4).state_dict()
    with pytest.raises(ConversionError, match="use --arch=resnet18"):
        tv_converter.convert_state_dict(small, "resnet50", 4)
    with pytest.raises(ConversionError, match=r"wrong shape.*fc\.weight: file has \(4, 512\), .* needs \(9, 512\)"):
        tv_converter.convert_state_dict(small, "resnet18", 9)
    broken = dict(small)
    del broken["layer2.0.downsample.1.running_var"]
    broken["layer9.extra"] = broken["fc.bias"]
    with pytest.raises(ConversionError, match=r"missing \(1\): layer2\.0\.downsample\.1\.running_var[\s\S]*"
                                              r"unexpected \(1\): layer9\.extra"):
        tv_converter.convert_state_dict(broken, "resnet18", 4)
    with pytest.raises(ConversionError, match="unknown --arch='resnet19'"):
        tv_converter.convert_state_dict(small, "resnet19", 4)
    with pytest.raises(ConversionError, match="positive integer"):
        tv_converter.convert_state_dict(small, "resnet18", 0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConversionError, match="not empty"):
        tv_converter.convert(str(tmp_path / "nothing.pth"), str(tmp_path / "full"), "resnet18", 4)
    with pytest.raises(ConversionError, match="nothing.pth does not exist"):
        tv_converter.convert(str(tmp_path / "nothing.pth"), str(tmp_path / "new"), "resnet18", 4)


def test_places_converters_name_the_other_model():
    from jaxdissect.convert import alexnet_places365, resnet152_places365

    tv_alex = {k: v.numpy() for k, v in ref.TVAlexNet(3).state_dict().items()}
    with pytest.raises(ConversionError, match="converters.torchvision --arch=alexnet"):
        alexnet_places365.convert_state_dict(tv_alex)
    places_alex = {k: v.numpy() for k, v in ref.PlacesAlexNet().state_dict().items()}
    places_alex["conv2.weight"] = np.zeros((256, 96, 5, 5), np.float32)  # groups=1 instead of 2
    with pytest.raises(ConversionError, match=r"conv2\.weight: file has \(256, 96, 5, 5\), .* needs \(256, 48, 5, 5\)"):
        alexnet_places365.convert_state_dict(places_alex)
    with pytest.raises(ConversionError, match="AlexNet-Places365 checkpoint: use python -m converters.alexnet_places365"):
        resnet152_places365.convert_state_dict(places_alex)


def test_models_reject_bad_images():
    from jaxdissect.models import AlexNet, OldResNet152

    v = jax.eval_shape(AlexNet().init, jax.random.PRNGKey(0), np.zeros((1, 227, 227, 3), np.float32))
    with pytest.raises(ValueError, match=r"needs 227x227 inputs \(pool5 must be 6x6.*crop=227"):
        jax.eval_shape(AlexNet().apply, v, np.zeros((1, 259, 259, 3), np.float32))
    with pytest.raises(ValueError, match="looks like NCHW"):
        jax.eval_shape(AlexNet().apply, v, np.zeros((1, 3, 227, 227), np.float32))
    with pytest.raises(ValueError, match="add a batch axis"):
        jax.eval_shape(OldResNet152().init, jax.random.PRNGKey(0), np.zeros((224, 224, 3), np.float32))


def test_dilated_stages_are_basic_block_stages():
    """The segmenters' dilation is that of basic-block stages; a dilated bottleneck stage is refused, not built undilated."""
    from jaxdissect.models.resnet import Stage

    with pytest.raises(ValueError, match="dilated stages are made of basic blocks"):
        jax.eval_shape(Stage("bottleneck", 1, 8, 1, dilation=2).init, jax.random.PRNGKey(0),
                       np.zeros((1, 8, 8, 3), np.float32))


def test_alexnet_upsample_geometry_is_the_pool5_grid():
    """The recorded receptive field is the spec's: scale 32, offset 33 at 227 pixels (dissect-spec.md 2.2)."""
    from jaxdissect.kernels.upsample import conv_output_size, receptive_field
    from jaxdissect.models.alexnet import PLACES_UPSAMPLE_CONVOLUTIONS

    assert receptive_field(PLACES_UPSAMPLE_CONVOLUTIONS) == (32.0, 33.0)
    assert conv_output_size(227, PLACES_UPSAMPLE_CONVOLUTIONS) == 6


@pytest.mark.parametrize("model, size, spec, expected", [
    ("vgg16", 224, "conv", ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                            "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]),
    ("alexnet", 227, "conv", ["conv1", "conv2", "conv3", "conv4", "conv5"]),
    ("resnet152", 224, "0,4,5,6,7", ["0", "4", "5", "6", "7"]),
    ("proggan", None, "layer1..layer14", [f"layer{i}" for i in range(1, 15)]),
])
def test_dissect_all_layer_lists(model, size, spec, expected):
    """The README's dissect_all.sh commands: each --layers spec gives the original's layer list."""
    from jaxdissect.layers import layer_shapes
    from jaxdissect.models import VGG16, AlexNet, OldResNet152, ProgressiveGenerator
    from launch import common
    from launch import dissect as launcher

    module = {"vgg16": VGG16(), "alexnet": AlexNet(), "resnet152": OldResNet152(),
              "proggan": ProgressiveGenerator()}[model]
    x = np.zeros((1, 512) if size is None else (1, size, size, 3), np.float32)
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    shapes = layer_shapes(module, variables, x)
    dissectable = [n for n, s in shapes.items() if len(getattr(s, "shape", ())) == 4]
    assert launcher.parse_layers(spec, dissectable) == expected
    if model == "alexnet":
        assert [shapes[n].shape[1] for n in expected] == [55, 27, 13, 13, 13]
        assert common.model_kind({"preprocessing": {"crop": 227}}, module) == "classifier"
    if model == "resnet152":
        assert [shapes[n].shape[1:] for n in expected] == [(112, 112, 64), (56, 56, 256), (28, 28, 512),
                                                           (14, 14, 1024), (7, 7, 2048)]
