"""Colour segmenter: dilated ResNet-18 + pyramid pooling ("ppm_deepsup" head), in Flax.

``ColorSegmenter(n_labels).apply(variables, x, seg_size)`` maps preprocessed
images (:func:`jaxdissect.segmentation.preprocess.color_preprocess`) to logits
``[N, h, w, n_labels]`` bilinearly resized to ``seg_size``. The deep-supervision
branch of the original decoder (``cbr_deepsup``, ``conv_last_deepsup``) only
serves training and is not built. Submodule names mirror the original keys.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdissect.models.blocks import Conv, batch_norm
from jaxdissect.models.resnet import DilatedResNet18
from jaxdissect.segmentation.preprocess import adaptive_avg_pool, resize_bilinear

Dtype = Any
POOL_SCALES = (1, 2, 3, 6)
PPM_DIM = 512


class PoolConvBN(nn.Module):
    """``ppm.i``: adaptive average pool to ``scale`` (``'0'``, no weights), 1x1 conv ``'1'``, BN ``'2'``, ReLU."""

    scale: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = adaptive_avg_pool(x, self.scale)
        x = batch_norm("2", self.dtype)(Conv(PPM_DIM, 1, use_bias=False, dtype=self.dtype, name="1")(x))
        return nn.relu(x)


class PyramidPooling(nn.Module):
    """``ppm``: one :class:`PoolConvBN` per scale, each resized back to the input size after conv-BN-ReLU."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        size = x.shape[1:3]
        return [resize_bilinear(PoolConvBN(s, dtype=self.dtype, name=str(i))(x), size)
                for i, s in enumerate(POOL_SCALES)]


class ConvLast(nn.Module):
    """``conv_last``: 3x3 conv ``'0'``, BN ``'1'``, ReLU, (dropout, identity at inference), biased 1x1 conv ``'4'``."""

    n_labels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(batch_norm("1", self.dtype)(Conv(PPM_DIM, 3, 1, 1, use_bias=False, dtype=self.dtype, name="0")(x)))
        return Conv(self.n_labels, 1, dtype=self.dtype, name="4")(x)


class PPMDeepSup(nn.Module):
    """Inference path of ``PPMDeepsup``: ``conv_last(concat[C5, ppm(C5)])`` -> logits at C5's size."""

    n_labels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features):
        c5 = features[-1]
        pooled = PyramidPooling(dtype=self.dtype, name="ppm")(c5)
        return ConvLast(self.n_labels, dtype=self.dtype, name="conv_last")(jnp.concatenate([c5, *pooled], -1))


class ColorSegmenter(nn.Module):
    """Colour segmenter: ``__call__(x, seg_size)`` -> float32 logits ``[N, h, w, n_labels]``.

    ``x``: :func:`~jaxdissect.segmentation.preprocess.color_preprocess` output
    (NHWC); ``seg_size``: static ``(h, w)``; PyTorch bilinear resizing with
    ``align_corners=False``. Softmax (per category) is left to the caller.
    """

    n_labels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, seg_size):
        features = DilatedResNet18(dtype=self.dtype, name="encoder")(x)
        logits = PPMDeepSup(self.n_labels, dtype=self.dtype, name="decoder")(features)
        return resize_bilinear(logits, tuple(seg_size)).astype(jnp.float32)
