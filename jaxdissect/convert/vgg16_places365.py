r"""Convert the original VGG16-Places365 weights (``vgg16_places365-0bafbc55.pth``) to a jaxdissect model.

    python -m converters.vgg16_places365 --input=vgg16_places365-0bafbc55.pth --output=DIR \
        [--classes=categories_places365.txt]

Every key and shape of ``experiment/oldvgg16.py``'s state_dict is checked
(spec 1.3). Re-layout: conv ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``;
linear ``[out, in]`` -> ``[in, out]``; ``fc6``'s 25088 input columns are
permuted from PyTorch's channel-major flatten (c, h, w) to the NHWC flatten
(h, w, c) of :class:`jaxdissect.models.VGG16`; ``classifier.fc8a`` becomes ``fc8``.
"""

from __future__ import annotations


import numpy as np

from jaxdissect.convert import common
from jaxdissect.models.vgg16 import CONV_LAYERS, CONV_WIDTHS, VGG16

WHAT = "VGG16-Places365 (experiment/oldvgg16.py)"


def expected_shapes(num_classes: int = 365) -> dict[str, tuple[int, ...]]:
    """The exact PyTorch state_dict keys and shapes of VGG16-Places365."""
    shapes = {}
    in_ch = 3
    for name, width in zip(CONV_LAYERS, CONV_WIDTHS):
        shapes[f"features.{name}.weight"] = (width, in_ch, 3, 3)
        shapes[f"features.{name}.bias"] = (width,)
        in_ch = width
    for name, n_in, n_out in (("fc6", 512 * 7 * 7, 4096), ("fc7", 4096, 4096), ("fc8a", 4096, num_classes)):
        shapes[f"classifier.{name}.weight"] = (n_out, n_in)
        shapes[f"classifier.{name}.bias"] = (n_out,)
    return shapes


def _identify_other_model(state) -> str:
    keys = set(state)
    if "layer1.conv.weight" in keys or "features.0.conv.weight" in keys:
        return " It is a Progressive GAN generator checkpoint: use python -m converters.proggan."
    if "features.0.weight" in keys:
        return (" It uses torchvision's numbered VGG/AlexNet keys (features.0.weight), not the "
                "Places365 release's named layers (features.conv1_1.weight).")
    if "fc.weight" in keys or "layer4.0.conv1.weight" in keys:
        return " It looks like a ResNet checkpoint."
    return ""


def convert_state_dict(state) -> tuple[VGG16, dict]:
    """Checked PyTorch state_dict (NumPy arrays) -> ``(VGG16 module, Flax variables)``."""
    fc8 = state.get("classifier.fc8a.bias")
    num_classes = int(fc8.shape[0]) if fc8 is not None and fc8.ndim == 1 else 365
    try:
        common.check_state_dict(state, expected_shapes(num_classes), what=WHAT)
    except common.ConversionError as e:
        raise common.ConversionError(str(e) + _identify_other_model(state)) from None
    params = {}
    for name in CONV_LAYERS:
        params[name] = {
            "kernel": common.conv_kernel(state[f"features.{name}.weight"]),
            "bias": np.asarray(state[f"features.{name}.bias"], np.float32),
        }
    fc6 = np.asarray(state["classifier.fc6.weight"], np.float32)
    # (out, c, h, w) -> (h, w, c, out): rows of the Flax kernel follow the NHWC flatten.
    fc6 = fc6.reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0).reshape(512 * 7 * 7, 4096)
    params["fc6"] = {"kernel": np.ascontiguousarray(fc6), "bias": np.asarray(state["classifier.fc6.bias"], np.float32)}
    for ours, theirs in (("fc7", "fc7"), ("fc8", "fc8a")):
        params[ours] = {
            "kernel": common.dense_kernel(state[f"classifier.{theirs}.weight"]),
            "bias": np.asarray(state[f"classifier.{theirs}.bias"], np.float32),
        }
    return VGG16(num_classes=num_classes), {"params": params}


def convert(input_path: str, output_dir: str, classes_path: str | None = None) -> dict:
    """Convert ``input_path`` (.pth) into the model directory ``output_dir``; returns the metadata written.

    ``classes_path``: a class-name file (first word a line, e.g. ``categories_places365.txt``); the
    names go to ``model.json`` so launchers can match class folders to outputs by name.
    """
    return common.convert_classifier(
        "vgg16_places365", input_path, output_dir, convert_state_dict, classes_path=classes_path,
        layers=list(CONV_LAYERS), layer_note="conv layer outputs are post-ReLU, as the original's retained tensors")
