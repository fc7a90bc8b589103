"""CLIP (Radford et al., 2021) in Flax: both image towers, the text tower, logit scale.

:class:`CLIP` follows OpenAI's ``clip/model.py`` module for module, so its
variables correspond one to one to the published state dict (see
:mod:`jaxdissect.convert.clip`):

* image tower ``visual``: a ViT (:class:`VisionTransformer`: ``conv1`` patch
  embedding without bias, ``class_embedding``, ``positional_embedding``,
  ``ln_pre``, ``transformer.resblocks.N``, ``ln_post``, ``proj``) or CLIP's
  modified ResNet (:class:`ModifiedResNet`: a 3-conv stem with an average pool,
  bottlenecks whose stride is an average pool before ``conv3`` and before the
  shortcut's conv (anti-aliased downsampling), and an attention pool
  ``attnpool`` in place of the global average pool);
* text tower: ``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.N`` (causal), ``ln_final``, ``text_projection``,
  pooled at the end-of-text token (the highest token id of each row);
* ``logit_scale`` (a log; ``exp(logit_scale)`` multiplies the cosines).

Blocks are :mod:`jaxdissect.models.transformer`'s (QuickGELU, LayerNorm eps
1e-5), shared with the ViT classifier. ``module.apply(v, images)`` is
:meth:`CLIP.encode_image` (what a dissection runs; layer names are the PyTorch
module paths: ``visual.layer4`` for the ResNet, or
``visual.transformer.resblocks.N.residual`` / ``.attention`` /
``.mlp.neurons`` on the 14x14 patch grid and their ``_cls`` tokens for the
ViT); ``module.apply(v, tokens, method="encode_text")`` embeds text tokens
(:mod:`jaxdissect.tokenizer`). Images are NHWC at ``image_resolution``,
normalised with CLIP's mean and std (:data:`CLIP_MEAN`, :data:`CLIP_STD`)
after a bicubic resize of the short side and a centre crop.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.models.blocks import AvgPool, Conv, ConvBN, batch_norm
from jaxdissect.models.transformer import Blocks, LayerNorm, patch_grid, with_cls_token

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# OpenAI's released models: embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
# context_length, vocab_size, transformer_width, transformer_heads, transformer_layers.
CONFIGS = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, 0, 77, 49408, 512, 8, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
}


class Transformer(nn.Module):
    """``transformer``: the blocks ``resblocks.N`` (CLIP names, QuickGELU)."""

    width: int
    layers: int
    heads: int
    causal: bool = False
    grid: tuple[int, int] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Blocks(self.layers, self.heads, 4 * self.width, "{}", "clip", "quick_gelu", 1e-5, self.causal,
                      self.grid, self.dtype, name="resblocks")(x)


class VisionTransformer(nn.Module):
    """CLIP's ViT image tower: NHWC ``[N, R, R, 3]`` -> ``[N, output_dim]``."""

    input_resolution: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        grid = patch_grid(x.shape, self.patch_size, self.input_resolution, "CLIP's ViT image tower")
        x = Conv(self.width, self.patch_size, self.patch_size, use_bias=False, dtype=self.dtype, name="conv1")(x)
        _, gh, gw, c = x.shape
        scale = c ** -0.5
        cls = self.param("class_embedding", nn.initializers.normal(scale), (c,), jnp.float32)
        pos = self.param("positional_embedding", nn.initializers.normal(scale), (gh * gw + 1, c), jnp.float32)
        x = LayerNorm(name="ln_pre")(with_cls_token(x, cls) + pos.astype(x.dtype))
        x = Transformer(c, self.layers, self.heads, grid=grid, dtype=self.dtype, name="transformer")(x)
        x = LayerNorm(name="ln_post")(x[:, 0])
        proj = self.param("proj", nn.initializers.normal(scale), (c, self.output_dim), jnp.float32)
        return x @ proj.astype(x.dtype)


class Bottleneck(nn.Module):
    """CLIP's bottleneck: convs at stride 1, an average pool (the stride) before ``conv3`` and the shortcut."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d, s, out_ch = self.dtype, self.stride, 4 * self.planes
        y = nn.relu(batch_norm("bn1", d)(Conv(self.planes, 1, use_bias=False, dtype=d, name="conv1")(x)))
        y = nn.relu(batch_norm("bn2", d)(Conv(self.planes, 3, 1, 1, use_bias=False, dtype=d, name="conv2")(y)))
        if s > 1:
            y = AvgPool(s, s, name="avgpool")(y)
        y = batch_norm("bn3", d)(Conv(out_ch, 1, use_bias=False, dtype=d, name="conv3")(y))
        if s > 1 or x.shape[-1] != out_ch:
            # The shortcut: average pool (the stride; PyTorch's "downsample.-1"), then 1x1 conv "0" + BN "1".
            if s > 1:
                x = nn.avg_pool(x, (s, s), strides=(s, s), padding="VALID")
            x = ConvBN(out_ch, 1, relu=False, dtype=d, name="downsample")(x)
        return nn.relu(y + x)


class Stage(nn.Module):
    """``layerK``: ``blocks`` bottlenecks ``0`` .. ``blocks - 1``, the first with the stride."""

    planes: int
    blocks: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.blocks):
            x = Bottleneck(self.planes, self.stride if i == 0 else 1, self.dtype, name=str(i))(x)
        return x


class AttentionPool2d(nn.Module):
    """``attnpool``: one query (the mean token plus its position) attends over all ``HW + 1`` tokens."""

    spacial_dim: int
    heads: int
    output_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        pos = self.param("positional_embedding", nn.initializers.normal(c ** -0.5), (self.spacial_dim ** 2 + 1, c),
                         jnp.float32)
        t = x.reshape(b, h * w, c)
        t = jnp.concatenate([jnp.mean(t, axis=1, keepdims=True), t], axis=1) + pos.astype(x.dtype)
        hd = c // self.heads
        q = nn.Dense(c, dtype=self.dtype, name="q_proj")(t[:, :1]).reshape(b, 1, self.heads, hd)
        k = nn.Dense(c, dtype=self.dtype, name="k_proj")(t).reshape(b, -1, self.heads, hd)
        v = nn.Dense(c, dtype=self.dtype, name="v_proj")(t).reshape(b, -1, self.heads, hd)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q * hd ** -0.5, k).astype(jnp.float32), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v).reshape(b, c)
        return nn.Dense(self.output_dim, dtype=self.dtype, name="c_proj")(out)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: NHWC ``[N, R, R, 3]`` -> ``[N, output_dim]``.

    Layers: ``conv1``/``bn1``, ``conv2``/``bn2``, ``conv3``/``bn3`` (stem, each
    followed by ReLU), ``avgpool``, ``layer1`` .. ``layer4`` (stage outputs,
    post-ReLU; ``layer4`` is ``[N, R/32, R/32, 32 * width]``), ``attnpool``.
    """

    layers: tuple[int, int, int, int]
    output_dim: int
    heads: int
    input_resolution: int = 224
    width: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        r = self.input_resolution
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1:3] != (r, r):
            raise ValueError(f"CLIP's ResNet image tower expects NHWC RGB images [N, {r}, {r}, 3], got shape "
                             f"{tuple(x.shape)}; resize and centre-crop to {r} first")
        d, w = self.dtype, self.width
        for i, (ch, stride) in enumerate(((w // 2, 2), (w // 2, 1), (w, 1)), start=1):
            x = Conv(ch, 3, stride, 1, use_bias=False, dtype=d, name=f"conv{i}")(x)
            x = nn.relu(batch_norm(f"bn{i}", d)(x))
        x = AvgPool(2, 2, name="avgpool")(x)
        for i, n in enumerate(self.layers):
            x = Stage(w * 2 ** i, n, 1 if i == 0 else 2, d, name=f"layer{i + 1}")(x)
        return AttentionPool2d(r // 32, self.heads, self.output_dim, d, name="attnpool")(x)


class CLIP(nn.Module):
    """CLIP's image and text towers; ``vision_layers`` an int (ViT) or four stage depths (ResNet)."""

    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: Any = 12
    vision_width: int = 768
    vision_patch_size: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    vision_heads: int = 0  # 0: OpenAI's rule, width // 64 (ViT) or 32 * width // 64 (ResNet)
    dtype: Any = jnp.float32

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision_layers, (tuple, list))

    def setup(self):
        if self.is_resnet:
            heads = self.vision_heads or self.vision_width * 32 // 64
            self.visual = ModifiedResNet(tuple(self.vision_layers), self.embed_dim, heads, self.image_resolution,
                                         self.vision_width, self.dtype)
        else:
            heads = self.vision_heads or self.vision_width // 64
            self.visual = VisionTransformer(self.image_resolution, self.vision_patch_size, self.vision_width,
                                            self.vision_layers, heads, self.embed_dim, self.dtype)
        w = self.transformer_width
        self.transformer = Transformer(w, self.transformer_layers, self.transformer_heads, causal=True,
                                       dtype=self.dtype)
        self.token_embedding = nn.Embed(self.vocab_size, w, embedding_init=nn.initializers.normal(0.02))
        self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(0.01),
                                               (self.context_length, w), jnp.float32)
        self.ln_final = LayerNorm()
        self.text_projection = self.param("text_projection", nn.initializers.normal(w ** -0.5),
                                          (w, self.embed_dim), jnp.float32)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), (), jnp.float32)

    def __call__(self, images):
        """The image embedding (unnormalised); the forward pass a dissection runs."""
        return self.encode_image(images)

    def encode_image(self, images):
        """NHWC CLIP-normalised images ``[N, R, R, 3]`` -> ``[N, embed_dim]``."""
        return self.visual(images.astype(self.dtype))

    def encode_text(self, tokens):
        """Token ids ``[N, context_length]`` (start, text, end, zero padding) -> ``[N, embed_dim]``."""
        tokens = jnp.asarray(tokens)
        x = self.token_embedding(tokens).astype(self.dtype) + self.positional_embedding.astype(self.dtype)
        x = self.ln_final(self.transformer(x))
        x = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
        return x @ self.text_projection.astype(x.dtype)

    def logits(self, images, tokens):
        """``(logits_per_image, logits_per_text)``: ``exp(logit_scale)`` times the cosines, as CLIP's forward."""
        img = self.encode_image(images)
        txt = self.encode_text(tokens)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        per_image = jnp.exp(self.logit_scale) * img @ txt.T
        return per_image, per_image.T


def clip_preprocess(images, resolution: int = 224):
    """Images NHWC in [0, 1] (``pt`` convention) -> CLIP's input: short side to ``resolution``, centre crop, normalised.

    The resize is ``jax.image.resize``'s antialiased bicubic, close to (not
    bit-equal with) the PIL bicubic of OpenAI's pipeline; jit-friendly (the
    shapes are static), so the display images of a dissection batch can be
    embedded on the device.
    """
    images = jnp.asarray(images, jnp.float32)
    b, h, w, _ = images.shape
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    images = jax.image.resize(images, (b, nh, nw, 3), method="cubic", antialias=True)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    images = images[:, top:top + resolution, left:left + resolution]
    return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def clip_model(name: str, dtype=jnp.float32) -> CLIP:
    """One of OpenAI's released architectures (:data:`CONFIGS`: ``RN50``, ``ViT-B/32``, ``ViT-B/16``)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown CLIP model {name!r}; choose one of {', '.join(CONFIGS)}")
    return CLIP(*CONFIGS[name], dtype=dtype)


def init_variables(module: CLIP, key=None):
    """Random variables of both towers (``module.init`` on a dummy image batch and token batch)."""
    key = jax.random.PRNGKey(0) if key is None else key
    r = module.image_resolution
    images = jnp.zeros((1, r, r, 3), jnp.float32)
    tokens = jnp.zeros((1, module.context_length), jnp.int32)
    return module.init(key, images, tokens, method=CLIP.logits)
