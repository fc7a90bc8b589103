"""ResNets as Flax Linen modules, NHWC, BatchNorm in inference mode (running statistics).

:class:`ResNet` is ``torchvision.models.resnet18/34/50/101/152`` (stride on the
3x3 conv of a bottleneck, "v1.5"). Layer names follow torchvision's modules:
``conv1`` (before BN), ``bn1``, ``relu``, ``maxpool``, ``layer1`` ... ``layer4``
(stage outputs, post-ReLU; NetDissect-Lite dissects ``layer4``), the blocks
``layerS.B`` and their parts (``layer4.2.conv3``), ``avgpool`` and ``fc``.

:class:`OldResNet152` is ResNet152-Places365 as the PNAS code loads it
(``experiment/oldresnet152.py``, converted from Torch7; netdissect2017.md 5.3,
dissect-spec.md 1.5): a flat sequence with numeric names, so the original's
layer names work unchanged, e.g. ``jaxdissect.capture(model, v, x, layers=['7'])``:

* ``0``: the 7x7 stem conv, **before** BatchNorm (what the original retained);
* ``1`` BatchNorm, ``2`` ReLU, ``3`` 3x3 stride-2 max pool;
* ``4`` ... ``7``: the four stages (3, 8, 36, 3 bottlenecks), post-ReLU;
  ``7`` is the 2017 papers' ``res5c`` (+ ReLU); blocks are ``S.B``;
* ``8``: the average pool (Torch's 7x7 pool, the global mean at 224 input:
  here the global mean at any input size), ``10``: the 365 logits.

:class:`DeepStemResNet50` and :class:`DilatedResNet18` are the segmenters'
encoders (the CSAIL scene-parsing code the original dissect uses): the 7x7
stem replaced by three 3x3 convs (:func:`deep_stem`), the ResNet-18 dilated to
output stride 8; they return the four stage outputs.

All share the blocks, whose parts carry torchvision's names (``conv1``,
``bn1``, ``conv2``, ``bn2``, ``conv3``, ``bn3``, ``downsample.0``/``.1``), so a
PyTorch key ``a.b.c.weight`` lives at Flax path ``a/b/c``; the converters map
the Torch7 numeric keys onto them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdissect.models.blocks import Conv, ConvBN, GlobalAvgPool, MaxPool, ReLU, batch_norm, check_images
from jaxdissect.models.vgg16 import Dense

# torchvision's depths: (block kind, blocks per stage).
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
WIDTHS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; output ``relu(residual + shortcut)``.

    ``dilation1`` / ``dilation`` dilate the first / second conv (the segmenters' dilated ResNet-18).
    """

    width: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    dilation1: int = 1
    dilation: int = 1

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        y = Conv(self.width, 3, self.stride, self.dilation1, use_bias=False, dtype=d, dilation=self.dilation1,
                 name="conv1")(x)
        y = nn.relu(batch_norm("bn1", d)(y))
        y = Conv(self.width, 3, 1, self.dilation, use_bias=False, dtype=d, dilation=self.dilation, name="conv2")(y)
        y = batch_norm("bn2", d)(y)
        shortcut = (ConvBN(self.width, 1, self.stride, relu=False, dtype=d, name="downsample")(x)
                    if self.downsample else x)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here), 1x1 expand to ``4 * width``, BatchNorm after each.

    Output ``relu(residual + shortcut)``.
    """

    width: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        y = Conv(self.width, 1, use_bias=False, dtype=d, name="conv1")(x)
        y = nn.relu(batch_norm("bn1", d)(y))
        y = Conv(self.width, 3, self.stride, 1, use_bias=False, dtype=d, name="conv2")(y)
        y = nn.relu(batch_norm("bn2", d)(y))
        y = Conv(4 * self.width, 1, use_bias=False, dtype=d, name="conv3")(y)
        y = batch_norm("bn3", d)(y)
        shortcut = (ConvBN(4 * self.width, 1, self.stride, relu=False, dtype=d, name="downsample")(x)
                    if self.downsample else x)
        return nn.relu(y + shortcut)


class Stage(nn.Module):
    """``num_blocks`` blocks named ``0``, ``1``, ...; the first strides and projects the shortcut if needed.

    Dilated stages (basic blocks only, as ``ResnetDilated``): block 0's first
    conv uses ``dilation1``, every other 3x3 conv ``dilation``.
    """

    block: str
    num_blocks: int
    width: int
    stride: int
    dtype: Any = jnp.float32
    dilation1: int = 1
    dilation: int = 1

    @nn.compact
    def __call__(self, x):
        dilated = (self.dilation1, self.dilation) != (1, 1)
        if dilated and self.block != "basic":
            raise ValueError(f"dilated stages are made of basic blocks, not {self.block!r} blocks")
        out = self.width * EXPANSION[self.block]
        for b in range(self.num_blocks):
            stride = self.stride if b == 0 else 1
            project = b == 0 and (stride != 1 or x.shape[-1] != out)
            if self.block == "basic":
                x = BasicBlock(self.width, stride, project, self.dtype, dilation1=self.dilation1 if b == 0
                               else self.dilation, dilation=self.dilation, name=str(b))(x)
            else:
                x = Bottleneck(self.width, stride, project, self.dtype, name=str(b))(x)
        return x


# Layer names of the torchvision layout and of the PNAS code's flat ResNet152-Places365, in network order:
# stem conv, BatchNorm, ReLU, max pool, the four stages, average pool, classifier.
TORCHVISION_NAMES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
OLD_RESNET152_NAMES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "10")


def classifier_resnet(x, depth: int, num_classes: int, dtype, names: tuple[str, ...]):
    """The 7x7-stem classifier ResNet with layers named ``names``.

    Called inside a module's compact ``__call__``, so the layers are that module's children.
    """
    kind, sizes = DEPTHS[depth]
    conv, bn, relu, pool, *stages, avgpool, fc = names
    x = jnp.asarray(x).astype(dtype)
    x = Conv(64, 7, 2, 3, use_bias=False, dtype=dtype, name=conv)(x)
    x = batch_norm(bn, dtype)(x)
    x = ReLU(name=relu)(x)
    x = MaxPool(3, 2, 1, name=pool)(x)
    for i, (n, width, name) in enumerate(zip(sizes, WIDTHS, stages)):
        x = Stage(kind, n, width, 1 if i == 0 else 2, dtype, name=name)(x)
    x = GlobalAvgPool(name=avgpool)(x)
    return Dense(num_classes, dtype=dtype, name=fc)(x)


class ResNet(nn.Module):
    """torchvision ResNet (``depth`` 18, 34, 50, 101 or 152); input ImageNet-normalised ``[N, 224, 224, 3]``."""

    depth: int = 50
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.depth not in DEPTHS:
            raise ValueError(f"ResNet depth {self.depth} is not one of {sorted(DEPTHS)}")
        check_images(x, f"ResNet{self.depth}", 32)
        return classifier_resnet(x, self.depth, self.num_classes, self.dtype, TORCHVISION_NAMES)


class OldResNet152(nn.Module):
    """ResNet152-Places365 with the original's numeric layer names; input ImageNet-normalised ``[N, 224, 224, 3]``."""

    num_classes: int = 365
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        check_images(x, "ResNet152-Places365", 32)
        return classifier_resnet(x, 152, self.num_classes, self.dtype, OLD_RESNET152_NAMES)

def deep_stem(x, dtype):
    """conv1/bn1 (3->64, stride 2), conv2/bn2 (64->64), conv3/bn3 (64->128), 3x3/2 max pool.

    Called inside an encoder's compact ``__call__``, so the layers are that encoder's children.
    """
    for i, (features, stride) in enumerate(((64, 2), (64, 1), (128, 1)), start=1):
        x = Conv(features, 3, stride, 1, use_bias=False, dtype=dtype, name=f"conv{i}")(x)
        x = nn.relu(batch_norm(f"bn{i}", dtype)(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class DeepStemResNet50(nn.Module):
    """Unified-parsing encoder: deep-stem ResNet-50 returning ``(C2, C3, C4, C5)`` (strides 4, 8, 16, 32)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = deep_stem(x.astype(self.dtype), self.dtype)
        features = []
        for i, (n, width) in enumerate(zip(DEPTHS[50][1], WIDTHS)):
            x = Stage("bottleneck", n, width, 1 if i == 0 else 2, self.dtype, name=f"layer{i + 1}")(x)
            features.append(x)
        return tuple(features)


class DilatedResNet18(nn.Module):
    """Colour-segmenter encoder: deep-stem ResNet-18 dilated to output stride 8; returns the four stage outputs.

    Dilation scale 8 as in ``ResnetDilated``: layer3 and layer4 keep stride 1;
    layer3's first 3x3 conv has dilation 1 and its others 2, layer4's first 2 and its others 4.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = deep_stem(x.astype(self.dtype), self.dtype)
        features = []
        stages = ((1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4))  # (stride, dilation1, dilation)
        for i, (width, (stride, dilation1, dilation)) in enumerate(zip(WIDTHS, stages)):
            x = Stage("basic", DEPTHS[18][1][i], width, stride, self.dtype, dilation1, dilation,
                      name=f"layer{i + 1}")(x)
            features.append(x)
        return tuple(features)
