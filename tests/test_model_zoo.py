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
