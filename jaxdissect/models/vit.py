"""Vision transformers as dissected models: torchvision's ``vit_b_16`` layout in Flax.

:class:`VisionTransformer` is ``torchvision.models.VisionTransformer``
(``vit_b_16``: 224 pixels, patch 16, 12 layers, 12 heads, width 768, MLP 3072,
LayerNorm eps 1e-6, exact GELU). Inputs are ImageNet-normalised NHWC images at
``image_size``. Layer names are torchvision's module paths:

* ``conv_proj``: the patch embedding, already a map ``[B, 14, 14, 768]``;
* ``encoder.layers.encoder_layer_N`` (``N`` = 0 .. 11): a block's output tokens
  ``[B, 197, 768]``, and its parts ``ln_1``, ``self_attention``, ``ln_2``,
  ``mlp`` (``mlp.0``, ``mlp.1`` the GELU, ``mlp.3``);
* the dissectable views of each block (see :mod:`jaxdissect.models.transformer`):
  ``encoder.layers.encoder_layer_N.residual`` (residual stream),
  ``.attention`` (attention output) and ``.mlp.neurons`` (MLP neurons after the
  GELU, 3072 units), each ``[B, 14, 14, C]`` with the CLS token dropped, and the
  CLS token of each as ``[B, C]`` (``.residual_cls``, ``.attention_cls``,
  ``.mlp.neurons_cls``);
* ``encoder.ln`` (tokens), ``heads.head`` (logits).

The grid is the patch grid: 14x14 at 224/16, token ``(i, j)`` over pixels
``[16 i, 16 i + 16) x [16 j, 16 j + 16)``; a dissection upsamples a
``[B, h, w, U]`` map to the segmentation grid with its usual geometry, so
these layers dissect like a CNN's (14x14 is the size of a ResNet's ``layer3``
at 224). Token layers that are not on the grid (``encoder_layer_N`` itself,
``encoder.ln``) raise :class:`jaxdissect.models.transformer.GridError` from
:func:`~jaxdissect.models.transformer.tokens_to_grid`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdissect.models.blocks import Conv
from jaxdissect.models.transformer import Blocks, LayerNorm, patch_grid, with_cls_token

# torchvision's architectures: (patch, layers, heads, width, MLP width).
ARCHS = {
    "vit_b_16": (16, 12, 12, 768, 3072),
    "vit_b_32": (32, 12, 12, 768, 3072),
    "vit_l_16": (16, 24, 16, 1024, 4096),
    "vit_l_32": (32, 24, 16, 1024, 4096),
}


class Encoder(nn.Module):
    """``encoder``: position embedding ``pos_embedding`` ``[1, T, C]``, ``layers``, final ``ln``."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    grid: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:], jnp.float32)
        x = x + pos.astype(x.dtype)
        x = Blocks(self.num_layers, self.num_heads, self.mlp_dim, "encoder_layer_{}", "torchvision", "gelu", 1e-6,
                   grid=self.grid, dtype=self.dtype, name="layers")(x)
        return LayerNorm(1e-6, name="ln")(x)


class Heads(nn.Module):
    """``heads``: the classifier ``head``."""

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class VisionTransformer(nn.Module):
    """torchvision's ViT classifier: ImageNet-normalised NHWC ``[N, image_size, image_size, 3]`` -> logits."""

    image_size: int = 224
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @nn.compact
    def __call__(self, x):
        patch_grid(x.shape, self.patch_size, self.image_size, "VisionTransformer")
        x = Conv(self.hidden_dim, self.patch_size, self.patch_size, dtype=self.dtype, name="conv_proj")(x)
        cls = self.param("class_token", nn.initializers.zeros, (1, 1, self.hidden_dim), jnp.float32)
        x = with_cls_token(x, cls)
        x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.grid, self.dtype, name="encoder")(x)
        return Heads(self.num_classes, self.dtype, name="heads")(x[:, 0])


def vit(arch: str = "vit_b_16", num_classes: int = 1000, image_size: int = 224, dtype=jnp.float32):
    """A :class:`VisionTransformer` of torchvision's named architecture."""
    if arch not in ARCHS:
        raise ValueError(f"unknown ViT architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    patch, layers, heads, width, mlp = ARCHS[arch]
    return VisionTransformer(image_size, patch, layers, heads, width, mlp, num_classes, dtype)
