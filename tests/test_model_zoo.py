"""AlexNet-Places365, ResNet152-Places365 and the torchvision layouts against PyTorch references from the spec.

Each architecture: random weights and BatchNorm statistics in a reference
module with the published key names, converted, then logits and captured
layers compared (max relative error < 1e-4). Inputs are small where the
architecture allows (the nets are fully convolutional up to an adaptive pool)
to keep the suite fast.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_zoo_reference as ref  # noqa: E402

import jaxdissect  # noqa: E402
from converters import torchvision as tv_converter  # noqa: E402
from converters.common import ConversionError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.abs(a - b).max() / np.abs(b).max()


def images(n, size, seed=0):
    return np.random.RandomState(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def cli(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def compare(torch_model, module, variables, x, pairs):
    """Logits and each (flax layer, torch path) pair agree to TOL."""
    ref_out, ref_acts = ref.run_torch(torch_model, x, capture=[t for _, t in pairs])
    out, acts = jax.jit(lambda v, x: jaxdissect.capture(module, v, x, layers=[f for f, _ in pairs]))(variables, x)
    assert rel_err(out, ref_out) < TOL
    for f, t in pairs:
        assert rel_err(acts[f], ref_acts[t]) < TOL, f


def test_torchvision_vgg16_dataparallel():
    model = ref.tv_vgg16(num_classes=10, seed=1)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    module, variables = tv_converter.convert_state_dict(state, "vgg16", 10)
    compare(model, module, variables, images(2, 64),
            [("conv1_1", "features.0"), ("conv4_2", "features.19"), ("pool5", "features.30"), ("fc7", "classifier.4")])


def test_alexnet_places365_matches_reference():
    from converters import alexnet_places365

    model = ref.places_alexnet(seed=2)
    module, variables = alexnet_places365.convert_state_dict(
        {k: v.numpy() for k, v in model.state_dict().items()})
    compare(model, module, variables, images(2, 227),
            [(f"conv{i}", f"conv{i}") for i in range(1, 6)]
            + [("lrn2", "lrn2"), ("pool5", "pool5"), ("fc6", "fc6"), ("fc7", "fc7"), ("fc8", "fc8")])


def test_resnet152_places365_matches_reference_and_torchvision_layout():
    """The Torch7 numeric layout against its reference; the same weights in torchvision's layout convert alike."""
    from converters import resnet152_places365

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
    shapes = jaxdissect.layers.layer_shapes(tv_module, tv_variables, images(1, 64))
    assert shapes["layer4"].shape == (1, 2, 2, 2048) and shapes["fc"].shape == (1, 365)


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet(depth):
    model = ref.tv_resnet(depth, num_classes=7, seed=depth)
    module, variables = tv_converter.convert_state_dict(model.state_dict(), f"resnet{depth}", 7)
    compare(model, module, variables, images(1, 64), [("conv1", "conv1"), ("layer1", "layer1"), ("layer4", "layer4")])


def test_torchvision_densenet161_old_key_spelling():
    model = ref.tv_densenet161(num_classes=5, seed=4)
    state = ref.old_densenet_keys(model.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in state
    module, variables = tv_converter.convert_state_dict(state, "densenet161", 5)
    compare(model, module, variables, images(1, 64),
            [("features", "features"), ("features.denseblock2", "features.denseblock2"),
             ("features.transition3", "features.transition3")])


def test_torchvision_alexnet():
    model = ref.tv_alexnet(num_classes=11, seed=5)
    module, variables = tv_converter.convert_state_dict(model.state_dict(), "alexnet", 11)
    compare(model, module, variables, images(2, 224),
            [("conv2", "features.3"), ("conv5", "features.10"), ("pool5", "features.12"), ("fc6", "classifier.1")])
