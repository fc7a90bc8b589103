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

Both share the blocks, whose parts carry torchvision's names (``conv1``,
``bn1``, ``conv2``, ``bn2``, ``conv3``, ``bn3``, ``downsample.0``/``.1``);
the converters map the Torch7 numeric keys onto them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdissect.models.blocks import Conv, GlobalAvgPool, MaxPool, ReLU, batch_norm, check_images
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


class Downsample(nn.Module):
    """Projection shortcut: 1x1 conv (stride) ``0`` + BatchNorm ``1``."""

    features: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv(self.features, 1, self.stride, use_bias=False, dtype=self.dtype, name="0")(x)
        return batch_norm("1", self.dtype)(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; output ``relu(residual + shortcut)``."""

    width: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        y = Conv(self.width, 3, self.stride, 1, use_bias=False, dtype=d, name="conv1")(x)
        y = nn.relu(batch_norm("bn1", d)(y))
        y = Conv(self.width, 3, 1, 1, use_bias=False, dtype=d, name="conv2")(y)
        y = batch_norm("bn2", d)(y)
        shortcut = Downsample(self.width, self.stride, d, name="downsample")(x) if self.downsample else x
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here), 1x1 expand to ``4 * width``, BatchNorm after each; ``relu(residual + shortcut)``."""

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
        shortcut = Downsample(4 * self.width, self.stride, d, name="downsample")(x) if self.downsample else x
        return nn.relu(y + shortcut)


class Stage(nn.Module):
    """``num_blocks`` blocks named ``0``, ``1``, ...; the first strides and projects the shortcut if needed."""

    block: str
    num_blocks: int
    width: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cls = BasicBlock if self.block == "basic" else Bottleneck
        out = self.width * EXPANSION[self.block]
        for b in range(self.num_blocks):
            stride = self.stride if b == 0 else 1
            project = b == 0 and (stride != 1 or x.shape[-1] != out)
            x = cls(self.width, stride, project, self.dtype, name=str(b))(x)
        return x


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
        kind, sizes = DEPTHS[self.depth]
        d = self.dtype
        x = jnp.asarray(x).astype(d)
        x = Conv(64, 7, 2, 3, use_bias=False, dtype=d, name="conv1")(x)
        x = batch_norm("bn1", d)(x)
        x = ReLU(name="relu")(x)
        x = MaxPool(3, 2, 1, name="maxpool")(x)
        for i, (n, width) in enumerate(zip(sizes, WIDTHS)):
            x = Stage(kind, n, width, 1 if i == 0 else 2, d, name=f"layer{i + 1}")(x)
        x = GlobalAvgPool(name="avgpool")(x)
        return Dense(self.num_classes, dtype=d, name="fc")(x)


class OldResNet152(nn.Module):
    """ResNet152-Places365 with the original's numeric layer names; input ImageNet-normalised ``[N, 224, 224, 3]``."""

    num_classes: int = 365
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        check_images(x, "ResNet152-Places365", 32)
        d = self.dtype
        x = jnp.asarray(x).astype(d)
        x = Conv(64, 7, 2, 3, use_bias=False, dtype=d, name="0")(x)
        x = batch_norm("1", d)(x)
        x = ReLU(name="2")(x)
        x = MaxPool(3, 2, 1, name="3")(x)
        for i, (n, width) in enumerate(zip(DEPTHS[152][1], WIDTHS)):
            x = Stage("bottleneck", n, width, 1 if i == 0 else 2, d, name=str(4 + i))(x)
        x = GlobalAvgPool(name="8")(x)
        return Dense(self.num_classes, dtype=d, name="10")(x)
