r"""Convert an original Progressive GAN generator (e.g. ``proggan_churchoutdoor-7e701dd5.pth``) to a jaxdissect model.

    python -m converters.proggan --input=proggan_churchoutdoor-7e701dd5.pth --output=DIR

Accepts the three layouts ``experiment/proggan.py`` reads (spec 1.6): a
``{'state_dict': ...}`` wrapper, current keys (``layerK.conv.weight``,
``layerK.wscale.b``, ``output_RxR.*``) and old keys (``features.{K-1}.*``,
``output.*``). Widths are inferred as the original does
(``sizes[0] = layer1.conv.weight.shape[1]``, then ``layerK.conv.weight.shape[0]``
for K = 1, 3, 5, ... while present); every key is then checked against that
architecture. Re-layout: ``conv.weight`` ``[out, in, kh, kw]`` -> ``kernel``
``[kh, kw, in, out]``; ``wscale.b`` -> ``bias``.
"""

from __future__ import annotations

import os
import re

import numpy as np

from jaxdissect.convert import common
from jaxdissect.checkpoint import save_model
from jaxdissect.models import proggan

WHAT = "a Progressive GAN generator (experiment/proggan.py)"


def rename_old_format(state) -> dict:
    """Old keys (``features.{K-1}.*``, ``output.*``) -> current keys; anything else unchanged."""
    if "features.0.conv.weight" not in state:
        return dict(state)
    n = sum(1 for k in state if re.fullmatch(r"features\.\d+\.conv\.weight", k))
    r = proggan.resolution((0,) * (n // 2 + 1))
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"features\.(\d+)\.(.*)", key)
        if m:
            key = f"layer{int(m.group(1)) + 1}.{m.group(2)}"
        elif key.startswith("output."):
            key = f"output_{r}x{r}." + key[len("output."):]
        out[key] = value
    return out


def infer_sizes(state) -> tuple[int, ...]:
    """``(latent, widths...)`` from the conv weights, as ``from_state_dict`` does."""
    w = state.get("layer1.conv.weight")
    if w is None or w.ndim != 4:
        hint = ""
        if "features.conv1_1.weight" in state:
            hint = " It is a VGG16 checkpoint: use python -m converters.vgg16_places365."
        elif any(k.startswith("features.") for k in state):
            hint = " It looks like a classifier checkpoint, not a generator."
        raise common.ConversionError(
            f"this checkpoint is not {WHAT}: it has no 4-D 'layer1.conv.weight' "
            f"(nor 'features.0.conv.weight' in the old layout).{hint}"
        )
    sizes = [int(w.shape[1])]
    k = 1
    while f"layer{k}.conv.weight" in state:
        sizes.append(int(state[f"layer{k}.conv.weight"].shape[0]))
        k += 2
    return tuple(sizes)


def expected_shapes(sizes) -> dict[str, tuple[int, ...]]:
    """Exact current-format keys and shapes of the generator with these ``sizes``."""
    shapes = {}
    convs = [(sizes[0], sizes[1], 4), (sizes[1], sizes[1], 3)]
    for si, so in zip(sizes[1:-1], sizes[2:]):
        convs += [(si, so, 3), (so, so, 3)]
    names = proggan.layer_names(sizes)
    for name, (cin, cout, k) in zip(names, convs + [(sizes[-1], 3, 1)]):
        shapes[f"{name}.conv.weight"] = (cout, cin, k, k)
        shapes[f"{name}.wscale.b"] = (cout,)
    return shapes


def convert_state_dict(state) -> tuple[proggan.ProgressiveGenerator, dict]:
    """Checked PyTorch state_dict (NumPy arrays, either layout) -> ``(module, Flax variables)``."""
    state = rename_old_format(state)
    sizes = infer_sizes(state)
    if len(sizes) < 2:
        raise common.ConversionError(f"cannot infer the generator widths from this checkpoint (got {sizes})")
    common.check_state_dict(state, expected_shapes(sizes), what=f"{WHAT} with sizes {list(sizes)}")
    params = {
        name: {
            "kernel": common.conv_kernel(state[f"{name}.conv.weight"]),
            "bias": np.asarray(state[f"{name}.wscale.b"], np.float32),
        }
        for name in proggan.layer_names(sizes)
    }
    return proggan.ProgressiveGenerator(sizes=sizes), {"params": params}


def convert(input_path: str, output_dir: str) -> dict:
    """Convert ``input_path`` (.pth) into the model directory ``output_dir``; returns the metadata written."""
    common.require_empty_output(output_dir)
    state = common.load_state_dict(input_path)
    module, variables = convert_state_dict(state)
    r = module.resolution
    metadata = {
        "model": "proggan",
        "source_file": os.path.basename(input_path),
        "source_sha256": common.sha256(input_path),
        "sizes": list(module.sizes),
        "resolution": r,
        "output": {"normalization": "zc", "layout": "NHWC", "shape": [None, r, r, 3], "clamped": False},
        "input": {"name": "z", "shape": [None, module.sizes[0]], "dtype": "float32",
                  "sampler": "jaxdissect.data.latents.standard_z_sample", "seed": 1},
        "layers": list(module.layers[:-1]),
        "layer_note": "block outputs after LeakyReLU(0.2)",
    }
    save_model(output_dir, module, variables, metadata)
    return metadata
