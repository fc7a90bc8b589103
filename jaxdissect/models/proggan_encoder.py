"""ganseeing's ProGAN inversion encoder ``HybridLayerNormEncoder`` in Flax Linen (reference gan-editing.md 1.2).

Five named stages, each a capturable layer (``jaxdissect.capture``):

* ``resnet``: a ResNet-18 (conv1 7x7/2, BN, ReLU, max-pool 3/2, ``layer1`` ...
  ``layer4`` of two BasicBlocks) whose pooling/fc head is replaced by
  ``layer5`` (1x1 conv with bias, LeakyReLU 0.2): the image's estimate of the
  generator's ``layer4`` output, ``[N, 8, 8, 512]`` for 256-pixel images;
* ``inv4``: PixelNorm -> conv3x3 -> BN -> LReLU -> conv3x3 -> BN -> LReLU ->
  conv1x1 (an estimate of ``layer3``);
* ``inv3``: the same with a stride-2 conv1x1 (8x8 -> 4x4, ``layer2``);
* ``inv2``: the same without the conv1x1 (``layer1``);
* ``inv1``: PixelNorm -> conv4x4 (no padding, 4x4 -> 1x1) -> BN -> LReLU ->
  conv1x1 -> PixelNorm: the latent z ``[N, 512]``.

``apply(variables, images)``: NHWC RGB in [-1, 1] at 256 px -> z ``[N, 512]``.
BatchNorm always uses the stored running statistics (eps 1e-5), as the
encoder runs in ``eval()`` mode. ``halfsize`` makes the max-pool stride 1 (the
original's option for 128-pixel inputs). ``width`` (r4 channels and z size)
and ``base`` (ResNet's first width; it doubles per stage) are 512 and 64 for
the published encoders; the converter reads them from the checkpoint.
Variables: ``params`` (kernels HWIO, biases, BN ``scale``/``bias``) and
``batch_stats`` (BN ``mean``/``var``).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from jaxdissect.models.proggan import pixel_norm

BN_EPS = 1e-5


def _bn(name):
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, momentum=0.9, name=name)


def _conv(features, k, stride=1, pad=0, bias=True, name=None):
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=bias,
                   name=name)


def _lrelu(x):
    return nn.leaky_relu(x, 0.2)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (``conv1``, ``bn1``, ``conv2``, ``bn2``, optional ``downsample``)."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        y = nn.relu(_bn("bn1")(_conv(self.features, 3, self.stride, 1, False, "conv1")(x)))
        y = _bn("bn2")(_conv(self.features, 3, 1, 1, False, "conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _bn("downsample_bn")(_conv(self.features, 1, self.stride, 0, False, "downsample_conv")(x))
        return nn.relu(y + x)


class Over5ResNet(nn.Module):
    """ResNet-18 with its head replaced by ``layer5`` (1x1 conv + LReLU 0.2): image -> r4 estimate."""

    width: int = 512
    base: int = 64
    halfsize: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(_bn("bn1")(_conv(self.base, 7, 2, 3, False, "conv1")(x)))
        s = 1 if self.halfsize else 2
        x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, s, s, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
        for i in range(4):
            feats = self.base * 2 ** i
            for b in range(2):
                stride = 2 if (i > 0 and b == 0) else 1
                x = BasicBlock(feats, stride, name=f"layer{i + 1}_{b}")(x)
        return _lrelu(_conv(self.width, 1, name="layer5_conv5")(x))


class LayerNormEncoder(nn.Module):
    """PixelNorm -> (conv3x3, BN, LReLU) x 2 -> [conv1x1 with ``stride``] (ganseeing's inverse of one layer)."""

    features: int = 512
    stride: int = 1
    skip_conv3: bool = False

    @nn.compact
    def __call__(self, x):
        x = pixel_norm(x)
        x = _lrelu(_bn("bn1")(_conv(self.features, 3, 1, 1, name="conv1")(x)))
        x = _lrelu(_bn("bn2")(_conv(self.features, 3, 1, 1, name="conv2")(x)))
        if not self.skip_conv3:
            x = _conv(self.features, 1, self.stride, name="conv3")(x)
        return x


class Layer1toZNormEncoder(nn.Module):
    """PixelNorm -> conv4x4 (valid) -> BN -> LReLU -> conv1x1 -> PixelNorm: 4x4 map -> z ``[N, features]``."""

    features: int = 512

    @nn.compact
    def __call__(self, x):
        x = pixel_norm(x)
        x = _lrelu(_bn("bn1")(_conv(self.features, 4, name="conv1")(x)))
        x = pixel_norm(_conv(self.features, 1, name="conv2")(x))
        return x.reshape(x.shape[0], -1)


class HybridLayerNormEncoder(nn.Module):
    """Image NHWC in [-1, 1] (256 px) -> z ``[N, width]``; stages ``resnet``, ``inv4``, ``inv3``, ``inv2``, ``inv1``."""

    width: int = 512
    base: int = 64
    halfsize: bool = False

    @property
    def stages(self) -> tuple[str, ...]:
        return ("resnet", "inv4", "inv3", "inv2", "inv1")

    @nn.compact
    def __call__(self, images):
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"HybridLayerNormEncoder expects NHWC RGB images [N, H, W, 3] in [-1, 1], got "
                             f"shape {tuple(images.shape)}")
        x = Over5ResNet(self.width, self.base, self.halfsize, name="resnet")(images)
        if x.shape[1:3] != (8, 8):
            size = 128 if self.halfsize else 256
            raise ValueError(f"the encoder's layer-4 estimate is {x.shape[1]}x{x.shape[2]}, it must be 8x8: "
                             f"give {size}x{size} images (got {images.shape[1]}x{images.shape[2]})")
        x = LayerNormEncoder(self.width, name="inv4")(x)
        x = LayerNormEncoder(self.width, stride=2, name="inv3")(x)
        x = LayerNormEncoder(self.width, skip_conv3=True, name="inv2")(x)
        return Layer1toZNormEncoder(self.width, name="inv1")(x)
