"""AdaIN style transfer (Huang & Belongie 2017) as Flax modules, NHWC, for the shape-bias experiment (spec 3.5).

* :class:`AdaINEncoder`: the normalised VGG-19 up to ``relu4_1``: a 1x1 3->3
  conv (``conv0``), then reflection-padded 3x3 convs with ReLU (``conv1_1``,
  ``conv1_2``, ``conv2_1``, ``conv2_2``, ``conv3_1`` .. ``conv3_4``,
  ``conv4_1``) and 2x2 max pools with PyTorch's ``ceil_mode=True``. Input:
  RGB in ``[0, 1]`` (no other normalisation: the 1x1 conv does it).
* :class:`AdaINDecoder`: the mirror (``dec4_1``, ``dec3_4`` .. ``dec3_1``,
  ``dec2_2``, ``dec2_1``, ``dec1_2``, ``dec1_1``; nearest 2x upsampling after
  ``dec4_1``, ``dec3_1`` and ``dec2_1``; reflection padding; no ReLU after
  the last conv).
* :func:`adain`: per-channel ``(c - mean_c) / std_c * std_s + mean_s`` with
  the unbiased spatial variance plus 1e-5, as the original's ``calc_mean_std``.
* :class:`AdaIN`: both, ``__call__(content, style, alpha=1.0)`` -> the
  stylized image (unclamped, as the decoder emits it; :func:`to_uint8`
  rounds it as torchvision's ``save_image`` does).

Content and style may differ in size (AdaIN uses only the style's channel
statistics); :meth:`AdaIN.encode` and :meth:`AdaIN.stylize_features` let a
caller encode a style once and reuse it.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

# (name, input channels, output channels); a pool follows the names in ENCODER_POOL_AFTER.
ENCODER_CONVS = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256),
    ("conv4_1", 256, 512),
)  # fmt: skip
ENCODER_POOL_AFTER = ("conv1_2", "conv2_2", "conv3_4")
DECODER_CONVS = (
    ("dec4_1", 512, 256),
    ("dec3_4", 256, 256), ("dec3_3", 256, 256), ("dec3_2", 256, 256), ("dec3_1", 256, 128),
    ("dec2_2", 128, 128), ("dec2_1", 128, 64),
    ("dec1_2", 64, 64), ("dec1_1", 64, 3),
)  # fmt: skip
DECODER_UPSAMPLE_AFTER = ("dec4_1", "dec3_1", "dec2_1")
EPS = 1e-5


class ReflectConv(nn.Module):
    """Reflection pad 1 (for 3x3), conv, bias, optional ReLU; params ``kernel`` [k, k, in, out], ``bias``."""

    features: int
    size: int = 3
    relu: bool = True

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.size, self.size, x.shape[-1],
                                                                        self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        p = self.size // 2
        if p:
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
        y = lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + bias
        return nn.relu(y) if self.relu else y


def max_pool_ceil(x):
    """2x2 max pool, stride 2, ``ceil_mode=True``: an odd last row/column is pooled on its own."""
    h, w = x.shape[1:3]
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def upsample_nearest(x):
    """Nearest-neighbour 2x upsampling (PyTorch ``nn.Upsample(scale_factor=2)``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class AdaINEncoder(nn.Module):
    """Normalised VGG-19 to ``relu4_1``: ``[N, H, W, 3]`` in [0, 1] -> ``[N, ~H/8, ~W/8, 512]``."""

    @nn.compact
    def __call__(self, x):
        x = ReflectConv(3, size=1, relu=False, name="conv0")(x)
        for name, _, out in ENCODER_CONVS:
            x = ReflectConv(out, name=name)(x)
            if name in ENCODER_POOL_AFTER:
                x = max_pool_ceil(x)
        return x


class AdaINDecoder(nn.Module):
    """``relu4_1`` features -> an RGB image (about [0, 1]; not clamped)."""

    @nn.compact
    def __call__(self, x):
        for name, _, out in DECODER_CONVS:
            x = ReflectConv(out, relu=name != "dec1_1", name=name)(x)
            if name in DECODER_UPSAMPLE_AFTER:
                x = upsample_nearest(x)
        return x


def mean_std(feat, eps: float = EPS):
    """Per image and channel: spatial mean and sqrt(unbiased variance + eps), shaped ``[N, 1, 1, C]``."""
    n, c = feat.shape[0], feat.shape[-1]
    flat = feat.reshape(n, -1, c)
    mean = flat.mean(1)
    var = flat.var(1, ddof=1) + eps
    return mean[:, None, None, :], jnp.sqrt(var)[:, None, None, :]


def adain(content_feat, style_feat, eps: float = EPS):
    """Adaptive instance normalisation: content features with the style's channel mean and std."""
    cm, cs = mean_std(content_feat, eps)
    sm, ss = mean_std(style_feat, eps)
    return (content_feat - cm) / cs * ss + sm


class AdaIN(nn.Module):
    """Encoder + AdaIN + decoder; ``alpha`` blends stylized and content features as the original."""

    def setup(self):
        self.encoder = AdaINEncoder()
        self.decoder = AdaINDecoder()

    def __call__(self, content, style, alpha: float = 1.0):
        return self.stylize_features(self.encode(content), self.encode(style), alpha)

    def encode(self, images):
        return self.encoder(images)

    def stylize_features(self, content_feat, style_feat, alpha: float = 1.0):
        feat = adain(content_feat, style_feat)
        feat = feat * alpha + content_feat * (1 - alpha)
        return self.decoder(feat)


def to_uint8(images) -> np.ndarray:
    """Float RGB (about [0, 1]) -> uint8 as torchvision's ``save_image``: ``clamp(x * 255 + 0.5, 0, 255)``."""
    return np.clip(np.asarray(images, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
