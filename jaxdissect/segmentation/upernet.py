"""Unified Perceptual Parsing segmenter (Xiao et al. 2018): deep-stem ResNet-50 + UPerNet, in Flax.

``UnifiedParsing(...).apply(variables, x, seg_size)`` maps preprocessed images
(:func:`jaxdissect.segmentation.preprocess.upp_preprocess`) to per-pixel logits
for objects, materials and object parts, bilinearly resized to ``seg_size``,
plus per-image scene logits. Probabilities and label maps are left to the
caller (softmax over objects and materials, softmax within each part group).
Submodule names mirror the original ``encoder_epoch_*.pth`` /
``decoder_epoch_*.pth`` keys under ``encoder`` and ``decoder``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdissect.models.blocks import Conv, ConvBN
from jaxdissect.models.resnet import DeepStemResNet50
from jaxdissect.segmentation.preprocess import resize_bilinear
from jaxdissect.segmentation.prroi import prroi_pool

Dtype = Any
POOL_SCALES = (1, 2, 3, 6)
FPN_DIM = 512


class ConvBNList(nn.Module):
    """One :class:`ConvBN` per input, named ``'0'``, ``'1'``, ...; ``nested`` adds ``fpn_out``'s extra ``'0'`` level."""

    features: int
    kernel: int
    nested: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, xs):
        outs = []
        for i, x in enumerate(xs):
            if self.nested:
                outs.append(_Nested(self.features, self.kernel, dtype=self.dtype, name=str(i))(x))
            else:
                outs.append(ConvBN(self.features, self.kernel, dtype=self.dtype, name=str(i))(x))
        return outs


class _Nested(nn.Module):
    """``Sequential(conv3x3_bn_relu)``: a :class:`ConvBN` under the name ``'0'``."""

    features: int
    kernel: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return ConvBN(self.features, self.kernel, dtype=self.dtype, name="0")(x)


class Head(nn.Module):
    """3x3 conv-BN-ReLU ``'0'``, then a biased 1x1 conv to ``classes`` (``'1'``, or ``'2'`` after global pooling)."""

    classes: int
    global_pool: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ConvBN(FPN_DIM, 3, dtype=self.dtype, name="0")(x)
        if self.global_pool:
            x = jnp.mean(x, axis=(1, 2), keepdims=True)
        return Conv(self.classes, 1, dtype=self.dtype, name="2" if self.global_pool else "1")(x)


class UPerNet(nn.Module):
    """UPerNet decoder over ``(C2, C3, C4, C5)``: pyramid pooling, top-down FPN, fusion, four heads.

    Returns un-resized logits ``{'object', 'part', 'material'}`` at C2's size
    and ``'scene'`` ``[N, n_scene]``.
    """

    n_object: int
    n_material: int
    n_scene: int
    n_part: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features):
        c5 = features[-1]
        size5 = c5.shape[1:3]
        # Pyramid pooling: precise RoI pooling over the whole map, resize back, *then* conv-BN-ReLU.
        pooled = [resize_bilinear(prroi_pool(c5, s), size5) for s in POOL_SCALES]
        pooled = ConvBNList(FPN_DIM, 1, dtype=self.dtype, name="ppm_conv")(pooled)
        p5 = ConvBN(FPN_DIM, 3, dtype=self.dtype, name="ppm_last_conv")(jnp.concatenate([c5, *pooled], -1))
        scene = Head(self.n_scene, global_pool=True, dtype=self.dtype, name="scene_head")(p5)[:, 0, 0, :]

        # Top-down: the running sum (not fpn_out's output) is carried to the next level.
        laterals = ConvBNList(FPN_DIM, 1, dtype=self.dtype, name="fpn_in")(features[:-1])
        sums = [None] * len(laterals)
        f = p5
        for i in reversed(range(len(laterals))):
            f = resize_bilinear(f, laterals[i].shape[1:3]) + laterals[i]
            sums[i] = f
        pyramid = ConvBNList(FPN_DIM, 3, nested=True, dtype=self.dtype, name="fpn_out")(sums) + [p5]

        material = Head(self.n_material, dtype=self.dtype, name="material_head")(pyramid[0])
        size2 = pyramid[0].shape[1:3]
        fused = jnp.concatenate([pyramid[0]] + [resize_bilinear(p, size2) for p in pyramid[1:]], -1)
        x = ConvBN(FPN_DIM, 3, dtype=self.dtype, name="conv_fusion")(fused)
        obj = Head(self.n_object, dtype=self.dtype, name="object_head")(x)
        part = Head(self.n_part, dtype=self.dtype, name="part_head")(x)
        return {"object": obj, "material": material, "part": part, "scene": scene}


class UnifiedParsing(nn.Module):
    """The UPP segmenter: ``__call__(x, seg_size)`` -> logits resized to ``seg_size`` (float32).

    ``x``: :func:`~jaxdissect.segmentation.preprocess.upp_preprocess` output (NHWC,
    BGR, mean-subtracted, 0..255 scale, normally 256x256); ``seg_size``: static
    ``(h, w)``. Returns ``'object' [N, h, w, n_object]``, ``'material' [N, h, w,
    n_material]``, ``'part' [N, h, w, sum(part_sizes)]`` (consecutive groups,
    one per object with parts, in increasing object index; softmax within a
    group) and ``'scene' [N, n_scene]``. Resizing is PyTorch bilinear with
    ``align_corners=False``. Encoder stages are the submodules
    ``encoder.layer1`` .. ``encoder.layer4``.
    """

    n_object: int
    n_material: int
    n_scene: int
    part_sizes: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, seg_size):
        features = DeepStemResNet50(dtype=self.dtype, name="encoder")(x)
        out = UPerNet(self.n_object, self.n_material, self.n_scene, int(sum(self.part_sizes)),
                      dtype=self.dtype, name="decoder")(features)
        result = {k: resize_bilinear(out[k], tuple(seg_size)).astype(jnp.float32)
                  for k in ("object", "material", "part")}
        result["scene"] = out["scene"].astype(jnp.float32)
        return result
