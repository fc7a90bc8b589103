"""A small convolutional scene classifier for the synthetic default dataset.

Four 3x3 conv blocks named ``conv1`` .. ``conv4`` whose outputs are post-ReLU
(what dissection reads, as for VGG), 2x2 max pooling after the first three,
then global max (or average) pooling and a linear layer ``fc``; max pooling
asks "is the object anywhere", which suits scene classes defined by object presence. On 64x64 inputs the
feature maps are 64, 32, 16 and 8 pixels wide. All fields are JSON-able, so
``jaxdissect.checkpoint.save_model`` records the architecture.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class ConvReLU(nn.Module):
    """3x3 same-padded convolution followed by ReLU; its output is the layer's units."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype, name="conv")(x)
        return nn.relu(x)


class SmallCNN(nn.Module):
    """``[B, H, W, 3]`` images in [-1, 1] -> ``[B, num_classes]`` logits."""

    num_classes: int = 6
    widths: tuple[int, ...] = (16, 32, 64, 64)
    global_pool: str = "max"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.asarray(x, self.dtype)
        for i, width in enumerate(self.widths):
            x = ConvReLU(width, dtype=self.dtype, name=f"conv{i + 1}")(x)
            if i < len(self.widths) - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        if self.global_pool not in ("max", "mean"):
            raise ValueError(f"global_pool must be 'max' or 'mean', got {self.global_pool!r}")
        x = jnp.max(x, axis=(1, 2)) if self.global_pool == "max" else jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(f"conv{i + 1}" for i in range(len(self.widths)))
