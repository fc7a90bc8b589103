"""Segmenter encoders: ResNet-50 and dilated ResNet-18 with the three-conv "deep stem".

Both follow the CSAIL scene-parsing code used by the original dissect: the
usual 7x7 stem is replaced by three 3x3 convs (3->64 stride 2, 64->64,
64->128) and a 3x3 max pool. Submodule names mirror the PyTorch state_dict
keys (``layer1.0.conv1``, ``layer1.0.downsample.0``), so a converted key
``a.b.c.weight`` lives at Flax path ``a/b/c`` and captured layer names read
like the original's. BatchNorm runs in inference mode (running statistics in
the ``batch_stats`` collection, eps 1e-5). Activations are NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any
BN_EPS = 1e-5


def conv(features: int, kernel: int, *, stride: int = 1, dilation: int = 1, bias: bool = False,
         dtype: Dtype = jnp.float32, name: str) -> nn.Conv:
    """PyTorch-style conv with symmetric padding ``dilation * (kernel // 2)``."""
    pad = dilation * (kernel // 2)
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                   kernel_dilation=dilation, use_bias=bias, dtype=dtype, name=name)


def batchnorm(dtype: Dtype, name: str) -> nn.BatchNorm:
    """Inference-mode BatchNorm with PyTorch's epsilon."""
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=dtype, name=name)


class ConvBN(nn.Module):
    """Conv (no bias) ``'0'`` + BatchNorm ``'1'`` (+ ReLU): PyTorch's ``Sequential(conv, bn[, relu])``."""

    features: int
    kernel: int = 3
    stride: int = 1
    relu: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = conv(self.features, self.kernel, stride=self.stride, dtype=self.dtype, name="0")(x)
        x = batchnorm(self.dtype, "1")(x)
        return nn.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride) -> 1x1 to ``4 * planes``, plus the shortcut."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        y = nn.relu(batchnorm(d, "bn1")(conv(self.planes, 1, dtype=d, name="conv1")(x)))
        y = nn.relu(batchnorm(d, "bn2")(conv(self.planes, 3, stride=self.stride, dtype=d, name="conv2")(y)))
        y = batchnorm(d, "bn3")(conv(4 * self.planes, 1, dtype=d, name="conv3")(y))
        if self.downsample:
            x = ConvBN(4 * self.planes, 1, self.stride, relu=False, dtype=d, name="downsample")(x)
        return nn.relu(y + x)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus the shortcut; ``dilation1``/``dilation`` give the dilated variant."""

    planes: int
    stride: int = 1
    dilation1: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        y = conv(self.planes, 3, stride=self.stride, dilation=self.dilation1, dtype=d, name="conv1")(x)
        y = nn.relu(batchnorm(d, "bn1")(y))
        y = batchnorm(d, "bn2")(conv(self.planes, 3, dilation=self.dilation, dtype=d, name="conv2")(y))
        if self.downsample:
            x = ConvBN(self.planes, 1, self.stride, relu=False, dtype=d, name="downsample")(x)
        return nn.relu(y + x)


class BottleneckStage(nn.Module):
    """``layerK``: ``blocks`` bottlenecks named ``'0'``, ``'1'``, ...; block 0 strides and projects."""

    planes: int
    blocks: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.blocks):
            x = Bottleneck(self.planes, self.stride if i == 0 else 1, downsample=i == 0,
                           dtype=self.dtype, name=str(i))(x)
        return x


class DilatedBasicStage(nn.Module):
    """``layerK`` of the dilated ResNet-18: block 0's first conv uses ``dilation1``, every other 3x3 ``dilation``."""

    planes: int
    blocks: int
    stride: int = 1
    dilation1: int = 1
    dilation: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.blocks):
            first = i == 0
            x = BasicBlock(self.planes, self.stride if first else 1,
                           dilation1=self.dilation1 if first else self.dilation, dilation=self.dilation,
                           downsample=first, dtype=self.dtype, name=str(i))(x)
        return x


def deep_stem(x, dtype: Dtype):
    """conv1/bn1 (3->64, stride 2), conv2/bn2 (64->64), conv3/bn3 (64->128), 3x3/2 max pool.

    Called inside an encoder's compact ``__call__``, so the layers are that encoder's children.
    """
    for i, (features, stride) in enumerate(((64, 2), (64, 1), (128, 1)), start=1):
        x = conv(features, 3, stride=stride, dtype=dtype, name=f"conv{i}")(x)
        x = nn.relu(batchnorm(dtype, f"bn{i}")(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet50(nn.Module):
    """Unified-parsing encoder: deep-stem ResNet-50 returning ``(C2, C3, C4, C5)`` (strides 4, 8, 16, 32)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = deep_stem(x.astype(self.dtype), self.dtype)
        features = []
        for k, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            x = BottleneckStage(planes, blocks, stride, dtype=self.dtype, name=f"layer{k}")(x)
            features.append(x)
        return tuple(features)


class DilatedResNet18(nn.Module):
    """Colour-segmenter encoder: deep-stem ResNet-18 dilated to output stride 8; returns the four stage outputs.

    Dilation scale 8 as in ``ResnetDilated``: layer3 and layer4 keep stride 1;
    layer3's first 3x3 conv has dilation 1 and its others 2, layer4's first 2 and its others 4.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = deep_stem(x.astype(self.dtype), self.dtype)
        features = []
        stages = ((64, 1, 1, 1), (128, 2, 1, 1), (256, 1, 1, 2), (512, 1, 2, 4))
        for k, (planes, stride, dilation1, dilation) in enumerate(stages, 1):
            x = DilatedBasicStage(planes, 2, stride, dilation1, dilation, dtype=self.dtype, name=f"layer{k}")(x)
            features.append(x)
        return tuple(features)
