"""Transformer blocks shared by the ViT classifier and both CLIP towers, and patch tokens as feature maps.

A pre-LayerNorm residual block (``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``)
in two spellings: torchvision's ``EncoderBlock`` (``self_attention``, MLP
``0``/``1``/``3``, GELU, LayerNorm eps 1e-6) and CLIP's
``ResidualAttentionBlock`` (``attn``, MLP ``c_fc``/``gelu``/``c_proj``,
QuickGELU, eps 1e-5). Submodule names follow the PyTorch modules, so the
layer names of :func:`jaxdissect.capture` are the PyTorch module paths.

**What a unit is, and the patch grid.** In a vision transformer every layer is
a sequence of tokens ``[B, 1 + gh*gw, C]``: the CLS token, then one token per
image patch in row-major order. A block built with ``grid=(gh, gw)`` also
exposes, as layers of their own:

* ``<block>.residual``: the residual stream after the block (its output);
* ``<block>.attention``: the attention output, before it is added to the stream;
* ``<block>.mlp.neurons``: the MLP neurons after the GELU (``4C`` units);

each as a feature map ``[B, gh, gw, C]`` of the patch tokens (the CLS token
dropped), exactly like a CNN's, and each with a ``_cls`` twin
(``<block>.residual_cls`` ...), the CLS token ``[B, C]``, for pooled scoring
(CLIP-Dissect's unit value for a ViT). Both views sit on the path of the
computation (the network continues from them), so an edit there (ablation,
unit setting) changes what follows. The grid of patch tokens is the patch
grid: at 224 pixels and patch 16 it is 14x14, token ``(i, j)`` covering pixels
``[16 i, 16 i + 16) x [16 j, 16 j + 16)``. A dissection treats it like any
``[B, h, w, U]`` map: upsampled to the segmentation's grid with its usual
geometry, each token's value centred on its patch. That patch tokens
represent their own patch is an assumption (attention mixes information
across the image); it is the standard reading of ViT feature maps, not a
published dissection recipe. :func:`tokens_to_grid` lays any such token layer
on its grid, and raises for one that cannot be.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdissect.errors import JaxDissectError

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU()
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's QuickGELU
}
# PyTorch module names of the two spellings: (attention, MLP in, activation, MLP out).
LAYOUTS = {"torchvision": ("self_attention", "0", "1", "3"), "clip": ("attn", "c_fc", "gelu", "c_proj")}


class GridError(JaxDissectError, ValueError):
    """A token layer that cannot be laid on a patch grid; the message names the layer and what to use."""


def tokens_to_grid(tokens, grid: tuple[int, int] | None = None, *, layer: str = "this layer"):
    """Patch tokens of ``[B, 1 + gh*gw, C]`` as a feature map ``[B, gh, gw, C]`` (CLS token dropped).

    ``grid`` defaults to the square grid the token count implies. Raises
    :class:`GridError` (one line) for anything else: a feature map or vector
    layer, a text tower's tokens, a count that is not 1 + gh*gw.
    """
    shape = tuple(getattr(tokens, "shape", ()))
    if len(shape) != 3:
        raise GridError(f"{layer} has shape {shape}, not tokens [batch, 1 + patches, channels]; only a "
                        "transformer's token layers are laid on the patch grid")
    patches = shape[1] - 1
    if grid is None:
        side = math.isqrt(max(patches, 0))
        grid = (side, side)
    if patches < 1 or grid[0] * grid[1] != patches:
        raise GridError(
            f"{layer} has {shape[1]} tokens, not 1 CLS + {grid[0]}x{grid[1]} patch tokens, so it cannot be laid "
            f"on a patch grid; dissect a vision block's '.residual', '.attention' or '.mlp.neurons' layer, or "
            "score its pooled value (the '_cls' layers)")
    return tokens[:, 1:].reshape(shape[0], grid[0], grid[1], shape[2])


class PatchGrid(nn.Module):
    """Patch tokens as a ``[B, gh, gw, C]`` feature map: a layer of its own, for capture and edits."""

    grid: tuple[int, int]

    @nn.compact
    def __call__(self, tokens):
        return tokens_to_grid(tokens, self.grid, layer="/".join(self.scope.path) or "tokens")


class ClsToken(nn.Module):
    """The CLS token ``[B, C]``: a layer of its own (pooled unit values, as CLIP-Dissect uses for a ViT)."""

    @nn.compact
    def __call__(self, tokens):
        return tokens[:, 0]


def through_views(parent_name: str, tokens, grid):
    """Send ``tokens`` through the grid and CLS views ``<parent_name>`` / ``<parent_name>_cls`` and back.

    Called inside a compact module; without a grid the tokens pass unchanged.
    """
    if grid is None:
        return tokens
    patches = PatchGrid(tuple(grid), name=parent_name)(tokens)
    cls = ClsToken(name=f"{parent_name}_cls")(tokens)
    b, gh, gw, c = patches.shape
    return jnp.concatenate([cls[:, None], patches.reshape(b, gh * gw, c)], axis=1)


class LayerNorm(nn.Module):
    """PyTorch's ``LayerNorm`` (params ``scale``, ``bias``; two-pass variance), in float32 as CLIP does."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        y = x.astype(jnp.float32)
        y = y - jnp.mean(y, axis=-1, keepdims=True)
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.epsilon)
        return (y * scale + bias).astype(x.dtype)


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` self-attention: fused ``in_proj`` ``[C, 3C]``, ``out_proj``; causal optional."""

    heads: int
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, c = x.shape
        hd = c // self.heads
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="in_proj")(x)
        q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, t, self.heads, hd) for i in range(3))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (hd ** -0.5), k)
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, c)
        return nn.Dense(c, dtype=self.dtype, name="out_proj")(out)


class Activation(nn.Module):
    """The MLP's nonlinearity as a named layer (``gelu`` or ``quick_gelu``)."""

    kind: str = "gelu"

    @nn.compact
    def __call__(self, x):
        return ACTIVATIONS[self.kind](x)


class Mlp(nn.Module):
    """``Linear -> activation -> Linear``; with a grid, the post-activation neurons as ``neurons`` (and ``_cls``)."""

    hidden: int
    layout: str = "clip"
    activation: str = "quick_gelu"
    grid: tuple[int, int] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        _, fc_in, act, fc_out = LAYOUTS[self.layout]
        h = nn.Dense(self.hidden, dtype=self.dtype, name=fc_in)(x)
        h = through_views("neurons", Activation(self.activation, name=act)(h), self.grid)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name=fc_out)(h)


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block; ``layout`` picks torchvision's or CLIP's submodule names."""

    heads: int
    mlp_dim: int
    layout: str = "clip"
    activation: str = "quick_gelu"
    epsilon: float = 1e-5
    causal: bool = False
    grid: tuple[int, int] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        attn_name = LAYOUTS[self.layout][0]
        a = MultiheadAttention(self.heads, self.causal, self.dtype, name=attn_name)(
            LayerNorm(self.epsilon, name="ln_1")(x))
        x = x + through_views("attention", a, self.grid)
        y = Mlp(self.mlp_dim, self.layout, self.activation, self.grid, self.dtype, name="mlp")(
            LayerNorm(self.epsilon, name="ln_2")(x))
        return through_views("residual", x + y, self.grid)


class Blocks(nn.Module):
    """A ``torch.nn.Sequential`` of :class:`ResidualBlock`, each named ``name_format.format(i)``."""

    layers: int
    heads: int
    mlp_dim: int
    name_format: str = "{}"
    layout: str = "clip"
    activation: str = "quick_gelu"
    epsilon: float = 1e-5
    causal: bool = False
    grid: tuple[int, int] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = ResidualBlock(self.heads, self.mlp_dim, self.layout, self.activation, self.epsilon, self.causal,
                              self.grid, self.dtype, name=self.name_format.format(i))(x)
        return x


def with_cls_token(patches, cls):
    """A patch embedding ``[B, gh, gw, C]`` as tokens ``[B, 1 + gh*gw, C]``: the learnt CLS token, then the patches."""
    b, gh, gw, c = patches.shape
    cls = jnp.broadcast_to(cls.reshape(1, 1, c).astype(patches.dtype), (b, 1, c))
    return jnp.concatenate([cls, patches.reshape(b, gh * gw, c)], axis=1)


def patch_grid(image_shape, patch_size: int, image_size: int, model: str) -> tuple[int, int]:
    """The ``(gh, gw)`` patch grid of an NHWC batch; raises a one-line ``ValueError`` for a wrong size.

    The position embeddings are learnt for ``image_size`` (no interpolation), so
    inputs must be that size.
    """
    shape = tuple(image_shape)
    if len(shape) != 4 or shape[-1] != 3 or shape[1:3] != (image_size, image_size):
        hint = " (this looks like NCHW: transpose with x.transpose(0, 2, 3, 1))" if len(shape) == 4 and \
            shape[1] == 3 else ""
        raise ValueError(f"{model} expects NHWC RGB images [N, {image_size}, {image_size}, 3], got shape "
                         f"{shape}{hint}; resize and centre-crop to {image_size} first")
    return image_size // patch_size, image_size // patch_size
