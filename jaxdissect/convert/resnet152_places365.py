r"""Convert the PNAS code's ResNet152-Places365 weights (``resnet152_places365-f928166e5c.pth``) to a jaxdissect model.

    python -m converters.resnet152_places365 --input=resnet152_places365-f928166e5c.pth --output=DIR

Every key and shape of ``experiment/oldresnet152.py``'s Torch7-converted
numeric state_dict is checked (netdissect2017.md 5.3; 777 tensors, BatchNorm's
``num_batches_tracked`` tolerated). Key mapping onto
:class:`jaxdissect.models.OldResNet152` (whose top-level names are the
original's ``0`` ... ``10``): ``S.B.0.0.{0,1,3,4,6,7}`` -> ``S.B.{conv1, bn1,
conv2, bn2, conv3, bn3}``, shortcut ``S.0.0.1.{0,1}`` -> ``S.0.downsample.{0,1}``,
``10.1`` -> ``10``; conv ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``,
BatchNorm ``weight``/``running_*`` -> ``scale``/``batch_stats``.
"""

from __future__ import annotations



from jaxdissect.convert import common
from jaxdissect.models.resnet import OldResNet152

WHAT = "ResNet152-Places365 (experiment/oldresnet152.py)"
LAYERS = ("0", "4", "5", "6", "7")
_BLOCK_PART = {"conv1": "0.0.0", "bn1": "0.0.1", "conv2": "0.0.3", "bn2": "0.0.4", "conv3": "0.0.6", "bn3": "0.0.7",
               "downsample": "0.1"}


def torch_name(path: tuple[str, ...]) -> str:
    """Flax module path of :class:`OldResNet152` -> the Torch7-converted PyTorch prefix."""
    if path == ("10",):
        return "10.1"
    if len(path) >= 3:
        return ".".join((path[0], path[1], _BLOCK_PART[path[2]], *path[3:]))
    return ".".join(path)


def _layout(num_classes: int):
    module = OldResNet152(num_classes=num_classes)
    return module, common.flax_layout(module, (1, 224, 224, 3), torch_name)


def expected_shapes(num_classes: int = 365) -> dict[str, tuple[int, ...]]:
    """The exact PyTorch state_dict keys and shapes of ResNet152-Places365 (without ``num_batches_tracked``)."""
    return {k: v[3] for k, v in _layout(num_classes)[1].items()}


def _identify_other_model(state) -> str:
    keys = set(state)
    if "layer4.0.conv3.weight" in keys:
        return " It uses torchvision's ResNet keys: use python -m converters.torchvision --arch=resnet152."
    if "conv1.weight" in keys and "fc8.weight" in keys:
        return " It is an AlexNet-Places365 checkpoint: use python -m converters.alexnet_places365."
    if "features.conv1_1.weight" in keys:
        return " It is a VGG16-Places365 checkpoint: use python -m converters.vgg16_places365."
    return ""


def convert_state_dict(state) -> tuple[OldResNet152, dict]:
    """Checked PyTorch state_dict (NumPy arrays) -> ``(OldResNet152 module, Flax variables)``."""
    fc = state.get("10.1.bias")
    num_classes = int(fc.shape[0]) if fc is not None and fc.ndim == 1 else 365
    module, layout = _layout(num_classes)
    try:
        common.check_state_dict(state, {k: v[3] for k, v in layout.items()}, what=WHAT,
                                ignore=("num_batches_tracked",))
    except common.ConversionError as e:
        raise common.ConversionError(str(e) + _identify_other_model(state)) from None
    return module, common.build_variables(state, layout)


def convert(input_path: str, output_dir: str, classes_path: str | None = None) -> dict:
    """Convert ``input_path`` (.pth) into the model directory ``output_dir``; returns the metadata written."""
    return common.convert_classifier(
        "resnet152_places365", input_path, output_dir, convert_state_dict, classes_path=classes_path,
        layers=list(LAYERS), layer_note="'0' is the stem conv before BatchNorm; '4'..'7' are stage outputs after ReLU")
