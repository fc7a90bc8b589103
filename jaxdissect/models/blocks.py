"""Building blocks shared by the zoo classifiers (AlexNet, ResNet, DenseNet): NHWC, float32 parameters.

Each block is its own Linen submodule so :func:`jaxdissect.capture` can read
and edit its output by name. Parameters follow the converters' layout: conv
``kernel`` ``[kh, kw, in / groups, out]`` (+ ``bias``), BatchNorm ``scale``,
``bias`` and ``batch_stats`` ``mean``, ``var`` (always inference mode: the
running statistics, never the batch's).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class Conv(nn.Module):
    """Square convolution as PyTorch's ``Conv2d`` (symmetric zero padding, groups, dilation), optionally + ReLU."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    use_bias: bool = True
    relu: bool = False
    dtype: Any = jnp.float32
    dilation: int = 1

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.he_normal(), (k, k, cin // self.groups, self.features),
                            jnp.float32)
        y = lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=((self.padding, self.padding), (self.padding, self.padding)),
            rhs_dilation=(self.dilation, self.dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return nn.relu(y) if self.relu else y


def batch_norm(name: str, dtype) -> nn.BatchNorm:
    """PyTorch ``BatchNorm2d`` in eval mode (eps 1e-5): running statistics from ``batch_stats``."""
    return nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


class ConvBN(nn.Module):
    """Conv (no bias) ``'0'`` + BatchNorm ``'1'`` (+ ReLU): PyTorch's ``Sequential(conv, bn[, relu])``.

    Padding ``kernel // 2`` (a 1x1 conv has none), so stride 1 keeps the size.
    """

    features: int
    kernel: int = 3
    stride: int = 1
    relu: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv(self.features, self.kernel, self.stride, self.kernel // 2, use_bias=False, dtype=self.dtype,
                 name="0")(x)
        x = batch_norm("1", self.dtype)(x)
        return nn.relu(x) if self.relu else x


class ReLU(nn.Module):
    """A ReLU as its own (parameter-free) layer, so its output has a name."""

    @nn.compact
    def __call__(self, x):
        return nn.relu(x)


class MaxPool(nn.Module):
    """PyTorch ``MaxPool2d(k, stride, padding)`` (floor mode; padding never wins the max)."""

    window: int
    stride: int
    padding: int = 0

    @nn.compact
    def __call__(self, x):
        p = self.padding
        return nn.max_pool(x, (self.window, self.window), strides=(self.stride, self.stride),
                           padding=((p, p), (p, p)))


class AvgPool(nn.Module):
    """PyTorch ``AvgPool2d(k, stride)`` without padding (floor mode)."""

    window: int
    stride: int

    @nn.compact
    def __call__(self, x):
        return nn.avg_pool(x, (self.window, self.window), strides=(self.stride, self.stride), padding="VALID")


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes, ``[N, H, W, C] -> [N, C]`` (``AdaptiveAvgPool2d(1)`` + flatten)."""

    @nn.compact
    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


def check_images(x, model: str, min_size: int, example: int = 224) -> None:
    """Raise a one-line ``ValueError`` unless ``x`` is an NHWC RGB batch with sides >= ``min_size``."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) == 4 and shape[-1] == 3 and min(shape[1:3]) >= min_size:
        return
    hint = ""
    if len(shape) == 4 and shape[1] == 3 and shape[-1] != 3:
        hint = " (this looks like NCHW: transpose with x.transpose(0, 2, 3, 1))"
    elif len(shape) == 3:
        hint = " (a single image: add a batch axis with x[None])"
    elif len(shape) == 4 and shape[-1] == 3:
        hint = f" (images must be at least {min_size}x{min_size})"
    raise ValueError(
        f"{model} expects ImageNet-normalised NHWC RGB images [N, {example}, {example}, 3], got shape {shape}{hint}; "
        f"make inputs with jaxdissect.preprocess.vgg_preprocess(image, crop={example})"
    )
