"""OpenAI CLIP state dicts (OpenAI key names) -> :class:`jaxdissect.models.clip.CLIP`.

Reads the published state dict's key names and shapes (``visual.*``,
``transformer.resblocks.N.*``, ``token_embedding.weight``,
``positional_embedding``, ``ln_final.*``, ``text_projection``,
``logit_scale``), the layout of OpenAI's ``clip/model.py`` and of open_clip's
``open_clip_model.safetensors`` for the ``openai`` weights. The architecture
is read off the shapes as OpenAI's ``build_model`` does (ViT when
``visual.proj`` exists, else the modified ResNet; heads = width / 64). A state
dict taken from OpenAI's TorchScript archive also has ``input_resolution``,
``context_length`` and ``vocab_size`` entries; they are ignored. Tensors are
stored float32 (the releases are float16).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

import jax
import numpy as np

from jaxdissect.convert import common
from jaxdissect.convert.common import ConversionError
from jaxdissect.convert.state import build_variables, check_state, count, save, shape_of, torch_layout
from jaxdissect.models.clip import CLIP, CLIP_MEAN, CLIP_STD, init_variables

WHAT = "OpenAI CLIP (clip/model.py)"
IGNORED = ("num_batches_tracked", "input_resolution", "context_length", "vocab_size")
HEAD_WIDTH = 64
_SIZES = {768: "B", 1024: "L", 1280: "H"}


def architecture(state: Mapping[str, np.ndarray], head_width: int = HEAD_WIDTH) -> CLIP:
    """The :class:`CLIP` whose variables ``state`` holds, from its shapes (OpenAI's ``build_model`` rules)."""
    if "visual.proj" in state:
        width, _, patch, _ = shape_of(state, "visual.conv1.weight", WHAT)
        grid = round((shape_of(state, "visual.positional_embedding", WHAT)[0] - 1) ** 0.5)
        vision = {"vision_layers": count(state, "visual.transformer.resblocks.", ".attn.in_proj_weight"),
                  "vision_width": width, "vision_patch_size": patch, "image_resolution": patch * grid,
                  "vision_heads": width // head_width}
    else:
        width = shape_of(state, "visual.layer1.0.conv1.weight", WHAT)[0]
        side = round((shape_of(state, "visual.attnpool.positional_embedding", WHAT)[0] - 1) ** 0.5)
        layers = tuple(count(state, f"visual.layer{b}.", ".conv1.weight") for b in (1, 2, 3, 4))
        vision = {"vision_layers": layers, "vision_width": width, "vision_patch_size": 0,
                  "image_resolution": 32 * side, "vision_heads": width * 32 // head_width}
    text_width = shape_of(state, "ln_final.weight", WHAT)[0]
    return CLIP(embed_dim=shape_of(state, "text_projection", WHAT)[1],
                context_length=shape_of(state, "positional_embedding", WHAT)[0],
                vocab_size=shape_of(state, "token_embedding.weight", WHAT)[0],
                transformer_width=text_width, transformer_heads=text_width // head_width,
                transformer_layers=count(state, "transformer.resblocks.", ".attn.in_proj_weight"), **vision)


def layout(module: CLIP) -> dict:
    """PyTorch key -> (Flax path, shape) of every variable of ``module`` (both towers)."""
    return torch_layout(jax.eval_shape(lambda: init_variables(module)))


def convert_state_dict(state: Mapping[str, np.ndarray], head_width: int = HEAD_WIDTH):
    """A CLIP state dict (NumPy arrays) -> ``(CLIP module, Flax variables, metadata)``; every key and shape checked."""
    module = architecture(state, head_width)
    expected = layout(module)
    check_state(state, expected, what=WHAT, ignore=IGNORED)
    variables = build_variables(state, expected)
    r = module.image_resolution
    metadata = {
        "model": "clip",
        "architecture": f"RN{sum(module.vision_layers) * 3 + 2}" if module.is_resnet else
        f"ViT-{_SIZES.get(module.vision_width, module.vision_width)}/{module.vision_patch_size}",
        "embed_dim": module.embed_dim,
        "preprocessing": {"normalization": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
                          "resize": r, "crop": r, "interpolation": "bicubic"},
        "input": {"layout": "NHWC", "shape": [None, r, r, 3], "dtype": "float32"},
        "layers": (["visual.layer1", "visual.layer2", "visual.layer3", "visual.layer4"] if module.is_resnet else
                   [f"visual.transformer.resblocks.{i}.residual" for i in range(module.vision_layers)]),
        "pooled_layer_note": "a ViT block's '<block>.residual_cls' (and '.attention_cls', '.mlp.neurons_cls') is "
                             "its CLS token",
        "tokenizer": {"context_length": module.context_length, "vocab_size": module.vocab_size},
    }
    return module, variables, metadata


RELEASE = ("open_clip_model.safetensors of timm/vit_base_patch16_clip_224.openai (ViT-B/16) or "
           "timm/resnet50_clip.openai (RN50)")


def convert(input_path: str, output_dir: str, vocab_path: str | None = None, head_width: int = HEAD_WIDTH) -> dict:
    """Convert ``input_path`` into the model directory ``output_dir``; returns the metadata written.

    ``input_path``: a ``.safetensors`` file with OpenAI's key names (open_clip's release of the
    ``openai`` weights) or a PyTorch state dict; OpenAI's TorchScript archives are refused (reading
    them runs their code). ``vocab_path``: CLIP's BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``),
    copied into the model directory so its tokenizer travels with it
    (:func:`jaxdissect.tokenizer.ClipTokenizer.from_model_dir`).
    """
    common.require_empty_output(output_dir)
    state = common.load_state_dict(input_path, release=RELEASE)
    module, variables, metadata = convert_state_dict(state, head_width)
    if vocab_path:
        from jaxdissect.tokenizer import ClipTokenizer

        ClipTokenizer.from_bpe_file(vocab_path)  # a vocabulary that does not read is refused before anything is written
        metadata["tokenizer"]["bpe_file"] = os.path.basename(vocab_path)
        metadata["tokenizer"]["bpe_sha256"] = common.sha256(vocab_path)
    metadata = save(output_dir, (module, variables, metadata), input_path, common.sha256(input_path))
    if vocab_path:
        shutil.copyfile(vocab_path, os.path.join(output_dir, os.path.basename(vocab_path)))
    return metadata


__all__ = ["ConversionError", "convert", "architecture", "convert_state_dict", "layout"]
