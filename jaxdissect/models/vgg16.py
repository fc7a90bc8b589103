"""VGG16-Places365 (spec 1.3) as a Flax Linen module, NHWC.

Every named layer is its own submodule, so ``capture_intermediates`` records
its ``__call__`` output under the layer name and ``nn.intercept_methods`` can
rewrite it (unit ablation):

* ``conv1_1`` ... ``conv5_3``: 3x3 conv + bias + ReLU. The output is
  POST-ReLU: the original's retained conv tensors are aliased by the
  following in-place ReLU (spec 1.3 quirk), so that is what dissection saw.
  Zeroing units here equals zeroing them before the ReLU. ``conv5_3:pre``
  (the child ``conv5_3.preact``, a parameterless
  :class:`jaxdissect.layers.PreActivation`) is the value before the ReLU.
* ``pool1`` ... ``pool5``: 2x2 max pool, stride 2 (floor).
* ``avgpool``: PyTorch's ``AdaptiveAvgPool2d((7, 7))`` (identity at 224 input).
* ``fc6``, ``fc7``: dense + ReLU (dropout is off at inference, so absent);
  ``fc8``: the 365 logits (PyTorch key ``classifier.fc8a``).

The flatten before ``fc6`` is NHWC order (h, w, c); the converter permutes
the PyTorch ``fc6`` columns from the original (c, h, w) order.

Parameters are always float32; ``dtype`` sets the compute dtype (e.g.
``jnp.bfloat16``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdissect.layers import PreActivation
from jaxdissect.models.blocks import check_images

CONV_LAYERS = (
    "conv1_1", "conv1_2",
    "conv2_1", "conv2_2",
    "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3",
    "conv5_1", "conv5_2", "conv5_3",
)  # fmt: skip
CONV_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
# Layer outputs in forward order; the named submodules of VGG16.
LAYERS = (
    "conv1_1", "conv1_2", "pool1",
    "conv2_1", "conv2_2", "pool2",
    "conv3_1", "conv3_2", "conv3_3", "pool3",
    "conv4_1", "conv4_2", "conv4_3", "pool4",
    "conv5_1", "conv5_2", "conv5_3", "pool5",
    "avgpool", "fc6", "fc7", "fc8",
)  # fmt: skip
MIN_SIZE = 32  # five 2x2 pools need at least 32 pixels to leave one


class ConvReLU(nn.Module):
    """3x3 convolution, padding 1, plus bias, then ReLU (params ``kernel`` [3, 3, in, out], ``bias``)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", nn.initializers.he_normal(), (3, 3, x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(1, 1),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return nn.relu(PreActivation(name="preact")(y + bias.astype(self.dtype)))


class MaxPool(nn.Module):
    """2x2 max pool, stride 2, odd edges dropped (PyTorch ``MaxPool2d(2, 2)``)."""

    @nn.compact
    def __call__(self, x):
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Row i averages input cells floor(i*n_in/n_out) .. ceil((i+1)*n_in/n_out) - 1, as PyTorch does."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class AdaptiveAvgPool(nn.Module):
    """PyTorch ``AdaptiveAvgPool2d(size)`` on NHWC; the identity when the input already has that size."""

    size: tuple[int, int] = (7, 7)

    @nn.compact
    def __call__(self, x):
        h, w = x.shape[1:3]
        if (h, w) == tuple(self.size):
            return x
        mh = jnp.asarray(_adaptive_pool_matrix(h, self.size[0]), x.dtype)
        mw = jnp.asarray(_adaptive_pool_matrix(w, self.size[1]), x.dtype)
        return jnp.einsum("ph,qw,nhwc->npqc", mh, mw, x)


class Dense(nn.Module):
    """Fully connected layer (params ``kernel`` [in, out], ``bias``), optionally followed by ReLU."""

    features: int
    relu: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.he_normal(), (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
        return nn.relu(PreActivation(name="preact")(y)) if self.relu else y


class VGG16(nn.Module):
    """VGG16 classifier; input ImageNet-normalised NHWC RGB ``[N, H, W, 3]`` (224x224 for Places365).

    Use :func:`jaxdissect.preprocess.vgg_preprocess` to make inputs. Returns
    ``num_classes`` logits.
    """

    num_classes: int = 365
    dtype: Any = jnp.float32

    conv_layers = CONV_LAYERS
    layers = LAYERS

    @nn.compact
    def __call__(self, x):
        _check_input(x)
        x = jnp.asarray(x).astype(self.dtype)
        for name, width in zip(CONV_LAYERS, CONV_WIDTHS):
            block, idx = name[4:].split("_")
            if idx == "1" and block != "1":
                x = MaxPool(name=f"pool{int(block) - 1}")(x)
            x = ConvReLU(width, dtype=self.dtype, name=name)(x)
        x = MaxPool(name="pool5")(x)
        x = AdaptiveAvgPool((7, 7), name="avgpool")(x)
        x = x.reshape(x.shape[0], -1)  # (h, w, c) order; see the module docstring
        x = Dense(4096, relu=True, dtype=self.dtype, name="fc6")(x)
        x = Dense(4096, relu=True, dtype=self.dtype, name="fc7")(x)
        return Dense(self.num_classes, dtype=self.dtype, name="fc8")(x)


def _check_input(x) -> None:
    check_images(x, "VGG16", MIN_SIZE)
