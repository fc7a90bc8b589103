"""The Progressive GAN generator of the original (``experiment/proggan.py``, spec 1.6) in Flax Linen.

``sizes = (latent, w1, ..., wL)``: ``layer1`` (4x4 conv, padding 3, turns the
1x1 latent into 4x4) and ``layer2`` (3x3) at width w1, then for each next
width an upscale block (nearest 2x, 3x3 conv) and a plain 3x3 block, and
finally ``output_RxR`` (1x1 conv to RGB). Each block is PixelNorm (eps 1e-8)
-> conv without bias -> equalized-learning-rate constant scale
``gain / sqrt(fan_in channels)`` plus bias -> LeakyReLU(0.2) (none on the
output block). A block's output, what ``capture_intermediates`` records under
``layerK``, is after the LeakyReLU, as the original's retained layers are.
Zeroing units there changes the next block's PixelNorm denominator, as in
the original.

Params per block: ``kernel`` [k, k, in, out] (PyTorch ``conv.weight``) and
``bias`` (PyTorch ``wscale.b``), float32; ``dtype`` sets the compute dtype.
The image is NHWC RGB, nominally in [-1, 1] ("zc"), not clamped.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

# The official LSUN 256x256 PGGAN widths (latent size first).
LSUN_SIZES = (512, 512, 512, 512, 512, 256, 128, 64)


def pixel_norm(x, eps: float = 1e-8):
    """``x / sqrt(mean over channels of x^2 + eps)``, computed in float32."""
    x32 = x.astype(jnp.float32)
    return (x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class NormConvBlock(nn.Module):
    """PixelNorm -> [nearest 2x upsample] -> conv (no bias) -> ``* gain/sqrt(in) + bias`` -> [LeakyReLU 0.2]."""

    features: int
    kernel_size: int
    padding: int
    gain: float
    upscale: bool = False
    activation: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, in_ch = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.normal(1.0), (k, k, in_ch, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x = pixel_norm(x)
        if self.upscale:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        p = self.padding
        y = lax.conv_general_dilated(
            x,
            kernel.astype(self.dtype),
            window_strides=(1, 1),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y * jnp.asarray(self.gain / math.sqrt(in_ch), self.dtype) + bias.astype(self.dtype)
        return nn.leaky_relu(y, 0.2) if self.activation else y


def num_layers(sizes) -> int:
    return 2 * (len(sizes) - 1)


def resolution(sizes) -> int:
    return 4 * 2 ** (num_layers(sizes) // 2 - 1)


def layer_names(sizes) -> tuple[str, ...]:
    """Block names in forward order: ``layer1`` ... ``layerN``, ``output_RxR``."""
    r = resolution(sizes)
    return tuple(f"layer{i + 1}" for i in range(num_layers(sizes))) + (f"output_{r}x{r}",)


class ProgressiveGenerator(nn.Module):
    """z ``[N, sizes[0]]`` (or ``[N, sizes[0], 1, 1]``) -> NHWC RGB image ``[N, R, R, 3]`` in ~[-1, 1]."""

    sizes: tuple = LSUN_SIZES
    dtype: Any = jnp.float32

    @property
    def resolution(self) -> int:
        return resolution(self.sizes)

    @property
    def layers(self) -> tuple[str, ...]:
        return layer_names(self.sizes)

    @nn.compact
    def __call__(self, z):
        sizes = tuple(self.sizes)
        if len(sizes) < 2:
            raise ValueError(f"ProgressiveGenerator needs sizes = (latent, width, ...), got {sizes}")
        z = jnp.asarray(z)
        c = sizes[0]
        if not (z.ndim == 2 and z.shape[1] == c) and not (z.ndim == 4 and z.shape[1:] == (c, 1, 1)):
            raise ValueError(
                f"ProgressiveGenerator expects latents z of shape [N, {c}] (or [N, {c}, 1, 1]), "
                f"got {tuple(z.shape)}; sample them with jaxdissect.data.latents.standard_z_sample"
            )
        x = z.reshape(z.shape[0], 1, 1, c).astype(self.dtype)
        names = self.layers
        blocks = [(sizes[1], 4, 3, False), (sizes[1], 3, 1, False)]
        for width in sizes[2:]:
            blocks += [(width, 3, 1, True), (width, 3, 1, False)]
        for name, (width, k, pad, up) in zip(names, blocks):
            x = NormConvBlock(width, k, pad, math.sqrt(2) / k, upscale=up, dtype=self.dtype, name=name)(x)
        return NormConvBlock(3, 1, 0, 1.0, activation=False, dtype=self.dtype, name=names[-1])(x)
