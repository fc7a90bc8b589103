r"""Convert the PNAS code's AlexNet-Places365 weights (``alexnet_places365-92864cf6.pth``) to a jaxdissect model.

    python -m converters.alexnet_places365 --input=alexnet_places365-92864cf6.pth --output=DIR

Every key and shape of ``experiment/oldalexnet.py``'s state_dict is checked
(netdissect2017.md 5.2): ``conv1`` ... ``conv5`` (grouped ``conv2``, ``conv4``,
``conv5``: ``[out, in / 2, k, k]``), ``fc6``, ``fc7``, ``fc8``, each with a bias.
Re-layout: conv ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``; linear
``[out, in]`` -> ``[in, out]``; ``fc6``'s 9216 input columns are permuted from
PyTorch's (c, h, w) flatten to the NHWC (h, w, c) flatten of
:class:`jaxdissect.models.AlexNet`. Inputs are 227x227 (crop 227 of the 256x256 resize).
"""

from __future__ import annotations



from jaxdissect.convert import common
from jaxdissect.models.alexnet import CONV_LAYERS, PLACES_UPSAMPLE_CONVOLUTIONS, AlexNet

WHAT = "AlexNet-Places365 (experiment/oldalexnet.py)"
CROP = 227


def _layout(num_classes: int):
    module = AlexNet(num_classes=num_classes)
    return module, common.flax_layout(module, (1, CROP, CROP, 3), ".".join)


def expected_shapes(num_classes: int = 365) -> dict[str, tuple[int, ...]]:
    """The exact PyTorch state_dict keys and shapes of AlexNet-Places365."""
    return {k: v[3] for k, v in _layout(num_classes)[1].items()}


def _identify_other_model(state) -> str:
    keys = set(state)
    if "features.0.weight" in keys and "features.10.weight" in keys:
        return " It uses torchvision's AlexNet keys: use python -m converters.torchvision --arch=alexnet."
    if "features.conv1_1.weight" in keys:
        return " It is a VGG16-Places365 checkpoint: use python -m converters.vgg16_places365."
    if "10.1.weight" in keys:
        return " It is a ResNet152-Places365 checkpoint: use python -m converters.resnet152_places365."
    return ""


def convert_state_dict(state) -> tuple[AlexNet, dict]:
    """Checked PyTorch state_dict (NumPy arrays) -> ``(AlexNet module, Flax variables)``."""
    fc8 = state.get("fc8.bias")
    num_classes = int(fc8.shape[0]) if fc8 is not None and fc8.ndim == 1 else 365
    module, layout = _layout(num_classes)
    try:
        common.check_state_dict(state, {k: v[3] for k, v in layout.items()}, what=WHAT)
    except common.ConversionError as e:
        raise common.ConversionError(str(e) + _identify_other_model(state)) from None
    fc6 = {"fc6.weight": common.chw_rows_to_hwc(state["fc6.weight"], 256, 6, 6)}
    return module, common.build_variables(state, layout, fc6)


def convert(input_path: str, output_dir: str, classes_path: str | None = None) -> dict:
    """Convert ``input_path`` (.pth) into the model directory ``output_dir``; returns the metadata written."""
    # The original upsampled every layer with the pool5 receptive-field grid (dissect-spec.md 2.2).
    return common.convert_classifier(
        "alexnet_places365", input_path, output_dir, convert_state_dict, crop=CROP, classes_path=classes_path,
        layers=list(CONV_LAYERS), layer_note="conv layer outputs are post-ReLU, as the original's retained tensors",
        upsample={"convolutions": [list(c) for c in PLACES_UPSAMPLE_CONVOLUTIONS], "image_size": CROP})
