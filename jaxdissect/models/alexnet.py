"""AlexNet as Flax Linen modules, NHWC: the Places365 release (CaffeNet) and torchvision's variant.

:class:`AlexNet` is AlexNet-Places365 as the PNAS code's ``experiment/oldalexnet.py``
defines it (netdissect2017.md 5.2, dissect-spec.md 1.4): CaffeNet order
conv -> ReLU -> max pool -> LRN, grouped convolutions (groups 1, 2, 1, 2, 2),
227x227 input (the only size whose ``pool5`` is 6x6, as ``fc6`` needs). Layers:

* ``conv1`` ... ``conv5``: conv + bias + ReLU. POST-ReLU, as the original's
  retained tensors were (its in-place ReLUs overwrite them).
* ``pool1``, ``lrn1``, ``pool2``, ``lrn2``, ``pool5``: 3x3 stride-2 max pools
  and the cross-channel LRN (size 5, alpha 1e-4, beta 0.75, k 1).
* ``fc6``, ``fc7`` (post-ReLU), ``fc8`` (the logits).

:class:`TorchvisionAlexNet` is ``torchvision.models.alexnet`` (no groups, no
LRN, widths 64/192/384/256/256, 224 input, ``AdaptiveAvgPool2d((6, 6))``)
with the same layer naming plus ``avgpool``.

The flatten before ``fc6`` is NHWC order (h, w, c); the converters permute
the PyTorch columns from (c, h, w).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from jaxdissect.models.blocks import Conv, MaxPool, check_images
from jaxdissect.models.vgg16 import AdaptiveAvgPool, Dense

# (name, out channels, kernel, stride, padding, groups) of AlexNet-Places365.
PLACES_CONVS = (
    ("conv1", 96, 11, 4, 0, 1),
    ("conv2", 256, 5, 1, 2, 2),
    ("conv3", 384, 3, 1, 1, 1),
    ("conv4", 384, 3, 1, 1, 2),
    ("conv5", 256, 3, 1, 1, 2),
)
# The same for torchvision's AlexNet (no groups).
TORCHVISION_CONVS = (
    ("conv1", 64, 11, 4, 2, 1),
    ("conv2", 192, 5, 1, 2, 1),
    ("conv3", 384, 3, 1, 1, 1),
    ("conv4", 256, 3, 1, 1, 1),
    ("conv5", 256, 3, 1, 1, 1),
)
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
# (kernel, stride, padding, dilation) of every conv and pool up to pool5: the receptive-field
# geometry the original upsamples every AlexNet layer with (dissect-spec.md 2.2, AlexNet quirk);
# for jaxdissect.kernels.upsample.make_taps(..., convolutions=..., image_size=227).
PLACES_UPSAMPLE_CONVOLUTIONS = (
    (11, 4, 0, 1), (3, 2, 0, 1), (5, 1, 2, 1), (3, 2, 0, 1),
    (3, 1, 1, 1), (3, 1, 1, 1), (3, 1, 1, 1), (3, 2, 0, 1),
)  # fmt: skip


class LRN(nn.Module):
    """Caffe's across-channel LRN: ``x / (k + alpha * mean_5(x^2))^beta``.

    The mean is over a window of ``size`` channels centred on each channel,
    zero padded at the ends and always divided by ``size`` (as the original's
    ``AvgPool3d`` over channels with the padding counted).
    """

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0

    @nn.compact
    def __call__(self, x):
        half = (self.size - 1) // 2
        sq = lax.reduce_window(
            x * x, jnp.zeros((), x.dtype), lax.add, (1, 1, 1, self.size), (1, 1, 1, 1),
            ((0, 0), (0, 0), (0, 0), (half, self.size - 1 - half)),
        )
        return x / (self.k + self.alpha * sq / self.size) ** self.beta


def _pool5_check(x, model: str, crop: int) -> None:
    if x.shape[1:3] != (6, 6):
        raise ValueError(
            f"{model} needs {crop}x{crop} inputs (pool5 must be 6x6 for fc6), got pool5 "
            f"{x.shape[1]}x{x.shape[2]}; make inputs with jaxdissect.preprocess.vgg_preprocess(image, crop={crop})"
        )


class AlexNet(nn.Module):
    """AlexNet-Places365 (CaffeNet order, grouped convs, LRN); input ImageNet-normalised ``[N, 227, 227, 3]``."""

    num_classes: int = 365
    dtype: Any = jnp.float32

    conv_layers = CONV_LAYERS

    @nn.compact
    def __call__(self, x):
        check_images(x, "AlexNet-Places365", 227, example=227)
        x = jnp.asarray(x).astype(self.dtype)
        for i, (name, width, k, s, p, g) in enumerate(PLACES_CONVS):
            x = Conv(width, k, s, p, groups=g, relu=True, dtype=self.dtype, name=name)(x)
            if i < 2:
                x = MaxPool(3, 2, name=f"pool{i + 1}")(x)
                x = LRN(name=f"lrn{i + 1}")(x)
        x = MaxPool(3, 2, name="pool5")(x)
        _pool5_check(x, "AlexNet-Places365", 227)
        x = x.reshape(x.shape[0], -1)
        x = Dense(4096, relu=True, dtype=self.dtype, name="fc6")(x)
        x = Dense(4096, relu=True, dtype=self.dtype, name="fc7")(x)
        return Dense(self.num_classes, dtype=self.dtype, name="fc8")(x)


class TorchvisionAlexNet(nn.Module):
    """``torchvision.models.alexnet``; input ImageNet-normalised ``[N, 224, 224, 3]`` (any side >= 63)."""

    num_classes: int = 1000
    dtype: Any = jnp.float32

    conv_layers = CONV_LAYERS

    @nn.compact
    def __call__(self, x):
        check_images(x, "AlexNet (torchvision)", 63)
        x = jnp.asarray(x).astype(self.dtype)
        for i, (name, width, k, s, p, g) in enumerate(TORCHVISION_CONVS):
            x = Conv(width, k, s, p, groups=g, relu=True, dtype=self.dtype, name=name)(x)
            if i < 2:
                x = MaxPool(3, 2, name=f"pool{i + 1}")(x)
        x = MaxPool(3, 2, name="pool5")(x)
        x = AdaptiveAvgPool((6, 6), name="avgpool")(x)
        x = x.reshape(x.shape[0], -1)
        x = Dense(4096, relu=True, dtype=self.dtype, name="fc6")(x)
        x = Dense(4096, relu=True, dtype=self.dtype, name="fc7")(x)
        return Dense(self.num_classes, dtype=self.dtype, name="fc8")(x)
