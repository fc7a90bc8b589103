"""torchvision ``VisionTransformer`` state dicts (``vit_b_16-c867db91.pth``) -> our ``VisionTransformer``.

Keys: ``conv_proj.{weight,bias}``, ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_N.{ln_1, self_attention.{in_proj_weight,
in_proj_bias, out_proj}, ln_2, mlp.0, mlp.3}``, ``encoder.ln``,
``heads.head``. The architecture is read off the shapes (width, patch, depth,
MLP width, classes, image size from the position embedding); the heads are not
stored, so ``heads`` defaults to width / 64 (12 for ViT-B, 16 for ViT-L, as
torchvision's).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.convert import common
from jaxdissect.convert.common import ConversionError
from jaxdissect.convert.state import build_variables, check_state, count, save, shape_of, torch_layout
from jaxdissect.models.vit import VisionTransformer

WHAT = "torchvision VisionTransformer"


def architecture(state: Mapping[str, np.ndarray], heads: int | None = None) -> VisionTransformer:
    """The :class:`VisionTransformer` whose weights ``state`` holds, from its shapes."""
    width, _, patch, _ = shape_of(state, "conv_proj.weight", WHAT)
    tokens = shape_of(state, "encoder.pos_embedding", WHAT)[1]
    side = round((tokens - 1) ** 0.5)
    if side * side != tokens - 1:
        raise ConversionError(f"encoder.pos_embedding has {tokens} tokens, not 1 + a square patch grid")
    return VisionTransformer(
        image_size=side * patch, patch_size=patch,
        num_layers=count(state, "encoder.layers.encoder_layer_", ".self_attention.in_proj_weight"),
        num_heads=heads or width // 64, hidden_dim=width,
        mlp_dim=shape_of(state, "encoder.layers.encoder_layer_0.mlp.0.weight", WHAT)[0],
        num_classes=shape_of(state, "heads.head.weight", WHAT)[0])


def layout(module: VisionTransformer) -> dict:
    """PyTorch key -> (Flax path, shape) of every variable of ``module``."""
    x = jax.ShapeDtypeStruct((1, module.image_size, module.image_size, 3), jnp.float32)
    return torch_layout(jax.eval_shape(module.init, jax.random.PRNGKey(0), x))


def convert_state_dict(state: Mapping[str, np.ndarray], heads: int | None = None, classes=None):
    """A torchvision ViT state dict -> ``(VisionTransformer, variables, metadata)``; all keys and shapes checked."""
    module = architecture(state, heads)
    expected = layout(module)
    check_state(state, expected, what=WHAT)
    if classes is not None and len(classes) != module.num_classes:
        raise ConversionError(f"{len(classes)} class names given but the model has {module.num_classes} classes")
    r, blocks = module.image_size, range(module.num_layers)
    metadata = {
        "model": "vit",
        "num_classes": module.num_classes,
        "preprocessing": {"normalization": "imagenet", "resize": round(r * 256 / 224), "crop": r,
                          "function": "jaxdissect.preprocess.vgg_preprocess"},
        "input": {"layout": "NHWC", "shape": [None, r, r, 3], "dtype": "float32"},
        "layers": [f"encoder.layers.encoder_layer_{i}.residual" for i in blocks],
        "layer_note": (f"'<block>.residual', '.attention', '.mlp.neurons': patch tokens on the "
                       f"{module.grid[0]}x{module.grid[1]} grid; '<block>.residual_cls' etc.: the CLS token"),
    }
    if classes is not None:
        metadata["classes"] = list(classes)
    return module, build_variables(state, expected), metadata


def convert(input_path: str, output_dir: str, classes_path: str | None = None, heads: int | None = None) -> dict:
    """Convert ``input_path`` (a torchvision ViT state dict, ``.pth`` or ``.safetensors``) into the model
    directory ``output_dir``; ``classes_path``: class names (first word a line); returns the metadata written."""
    common.require_empty_output(output_dir)
    state = common.load_state_dict(input_path, release="torchvision's vit_b_16-c867db91.pth state dict")
    module = architecture(state, heads)
    classes = common.read_classes(classes_path, module.num_classes) if classes_path else None
    return save(output_dir, convert_state_dict(state, heads, classes), input_path, common.sha256(input_path))


__all__ = ["ConversionError", "convert", "architecture", "convert_state_dict", "layout"]
