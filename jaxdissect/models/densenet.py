"""torchvision DenseNet (DenseNet-161 by default) as a Flax Linen module, NHWC, BatchNorm in inference mode.

Layer names follow torchvision's modules: ``features`` is the whole feature
extractor and its output is ``norm5``'s, **before** the final ReLU (the
forward pass applies that ReLU outside ``features``, and NetDissect-Lite's
hook on ``features`` recorded the value before it); inside it
``features.conv0``, ``features.norm0``, ``features.pool0``,
``features.denseblock1`` ... ``features.denseblock4`` (the concatenated
features), ``features.transition1`` ... ``features.transition3``,
``features.denseblock4.denselayer24`` (one layer's ``growth_rate`` new
channels concatenated onto its input); ``classifier`` is the logits.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdissect.models.blocks import AvgPool, Conv, MaxPool, batch_norm, check_images
from jaxdissect.models.vgg16 import Dense


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (``bn_size * growth_rate``), BN-ReLU-conv3x3 (``growth_rate``); returns input ++ new channels."""

    growth_rate: int
    bn_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        y = nn.relu(batch_norm("norm1", d)(x))
        y = Conv(self.bn_size * self.growth_rate, 1, use_bias=False, dtype=d, name="conv1")(y)
        y = nn.relu(batch_norm("norm2", d)(y))
        y = Conv(self.growth_rate, 3, 1, 1, use_bias=False, dtype=d, name="conv2")(y)
        return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nn.Module):
    num_layers: int
    growth_rate: int
    bn_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = DenseLayer(self.growth_rate, self.bn_size, self.dtype, name=f"denselayer{i + 1}")(x)
        return x


class Transition(nn.Module):
    """BN-ReLU-conv1x1 to ``features`` channels, 2x2 average pool."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(batch_norm("norm", self.dtype)(x))
        x = Conv(self.features, 1, use_bias=False, dtype=self.dtype, name="conv")(x)
        return AvgPool(2, 2, name="pool")(x)


class DenseFeatures(nn.Module):
    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        x = Conv(self.num_init_features, 7, 2, 3, use_bias=False, dtype=d, name="conv0")(x)
        x = nn.relu(batch_norm("norm0", d)(x))
        x = MaxPool(3, 2, 1, name="pool0")(x)
        for i, n in enumerate(self.block_config):
            x = DenseBlock(n, self.growth_rate, self.bn_size, d, name=f"denseblock{i + 1}")(x)
            if i + 1 < len(self.block_config):
                x = Transition(x.shape[-1] // 2, d, name=f"transition{i + 1}")(x)
        return batch_norm("norm5", d)(x)


class DenseNet(nn.Module):
    """torchvision DenseNet; defaults are DenseNet-161. Input ImageNet-normalised ``[N, 224, 224, 3]``."""

    growth_rate: int = 48
    block_config: tuple[int, ...] = (6, 12, 36, 24)
    num_init_features: int = 96
    bn_size: int = 4
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        check_images(x, "DenseNet", 32)
        x = jnp.asarray(x).astype(self.dtype)
        x = DenseFeatures(self.growth_rate, tuple(self.block_config), self.num_init_features, self.bn_size,
                          self.dtype, name="features")(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        return Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
