r"""Convert a torchvision-layout classifier state_dict (your own model, or NetDissect-Lite's zoo) to jaxdissect.

    python -m converters.torchvision --arch=resnet18 --num_classes=365 --input=resnet18_places365.pth --output=DIR

``--arch`` is one of ``resnet18``, ``resnet50``, ``resnet152``, ``densenet161``,
``alexnet``, ``vgg16``: the key layouts of ``torchvision.models`` (e.g.
``layer4.1.conv2.weight``, ``features.denseblock4.denselayer24.conv2.weight``,
``features.28.weight``). A plain state_dict, a ``DataParallel`` one (every key
prefixed ``module.``) and one wrapped as ``{'state_dict': ...}`` (a training
checkpoint ``.pth.tar``) are all read. A whole pickled model is refused: it
cannot be read without running its pickled code; re-save it as a state dict with
``torch.save(model.state_dict(), path)``. DenseNet's pre-0.4 key spelling
(``denselayer1.norm.1.weight``) is renamed as torchvision itself does.

Every key and shape is checked against the architecture. Layer names of the
converted models (capture them with :func:`jaxdissect.capture`):

* ``vgg16`` -> :class:`jaxdissect.models.VGG16`: ``conv1_1`` ... ``conv5_3``
  (post-ReLU), ``pool1..5``, ``avgpool``, ``fc6``, ``fc7`` (post-ReLU), ``fc8``.
  torchvision's ``features.N`` index of each conv is in :data:`VGG16_FEATURE_INDEX`
  (``conv4_2`` is ``features.19``, its ReLU ``features.20``).
* ``alexnet`` -> :class:`jaxdissect.models.TorchvisionAlexNet`: ``conv1`` ...
  ``conv5`` (post-ReLU), ``pool1``, ``pool2``, ``pool5`` (= torchvision's
  ``features`` output), ``avgpool``, ``fc6``, ``fc7`` (post-ReLU), ``fc8``.
* ``resnet*`` -> :class:`jaxdissect.models.ResNet`: ``conv1`` (pre-BN), ``bn1``,
  ``relu``, ``maxpool``, ``layer1`` ... ``layer4`` (post-ReLU), ``layerS.B``
  (block outputs), ``avgpool``, ``fc``.
* ``densenet161`` -> :class:`jaxdissect.models.DenseNet`: ``features`` (the
  ``norm5`` output before the final ReLU, what NetDissect-Lite's hook records),
  ``features.denseblock1`` ... ``features.transition3``, ``classifier``.

Use :func:`convert_state_dict` to convert in memory.
"""

from __future__ import annotations

import re

import numpy as np

from jaxdissect.convert import common

ARCHS = ("resnet18", "resnet50", "resnet152", "densenet161", "alexnet", "vgg16")

# torchvision's features.N index of each VGG16 conv (its ReLU is N + 1).
VGG16_FEATURE_INDEX = {
    "conv1_1": 0, "conv1_2": 2,
    "conv2_1": 5, "conv2_2": 7,
    "conv3_1": 10, "conv3_2": 12, "conv3_3": 14,
    "conv4_1": 17, "conv4_2": 19, "conv4_3": 21,
    "conv5_1": 24, "conv5_2": 26, "conv5_3": 28,
}  # fmt: skip
_VGG16_FC = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}
_ALEXNET_NAMES = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8",
                  "conv5": "features.10", "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}


def _renamer(table):
    return lambda path: table.get(".".join(path), ".".join(path))


def _fc6_override(key: str, c: int, hw: int):
    return lambda state: {key: common.chw_rows_to_hwc(state[key], c, hw, hw)}


def _vgg16(num_classes):
    from jaxdissect.models.vgg16 import VGG16

    table = {name: f"features.{i}" for name, i in VGG16_FEATURE_INDEX.items()} | _VGG16_FC
    return VGG16(num_classes=num_classes), 32, _renamer(table), _fc6_override("classifier.0.weight", 512, 7)


def _alexnet(num_classes):
    from jaxdissect.models.alexnet import TorchvisionAlexNet

    return (TorchvisionAlexNet(num_classes=num_classes), 63, _renamer(_ALEXNET_NAMES),
            _fc6_override("classifier.1.weight", 256, 6))


def _resnet(depth):
    def build(num_classes):
        from jaxdissect.models.resnet import ResNet

        return ResNet(depth=depth, num_classes=num_classes), 32, ".".join, None

    return build


def _densenet161(num_classes):
    from jaxdissect.models.densenet import DenseNet

    return DenseNet(num_classes=num_classes), 32, ".".join, None


_BUILDERS = {"resnet18": _resnet(18), "resnet50": _resnet(50), "resnet152": _resnet(152),
             "densenet161": _densenet161, "alexnet": _alexnet, "vgg16": _vgg16}


# --------------------------------------------------------------------------
# Reading and dispatch


def _strip_module_prefix(state):
    """``DataParallel`` keys ``module.x`` -> ``x`` (only when every key has the prefix)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _rename_old_densenet(state):
    """Pre-0.4 DenseNet keys ``denselayerN.norm.1.weight`` -> ``denselayerN.norm1.weight`` (torchvision's rule)."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    out = {}
    for k, v in state.items():
        m = pattern.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _layout(arch: str, num_classes: int):
    module, size, torch_name, override = _BUILDERS[arch](num_classes)
    return module, common.flax_layout(module, (1, size, size, 3), torch_name), override


def expected_shapes(arch: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The exact torchvision state_dict keys and shapes of ``arch`` with ``num_classes`` outputs."""
    _check_arch(arch)
    return {k: v[3] for k, v in _layout(arch, num_classes)[1].items()}


def _check_arch(arch):
    if arch not in _BUILDERS:
        raise common.ConversionError(f"unknown --arch={arch!r}; choose one of {', '.join(ARCHS)}")


def _guess_arch(state) -> str:
    """The architecture whose distinctive keys the state_dict has ('' if none)."""
    keys = set(state)
    if "features.denseblock1.denselayer1.conv1.weight" in keys:
        return "densenet161"
    if "layer4.0.conv3.weight" in keys:
        blocks = {k.split(".")[1] for k in keys if k.startswith("layer3.")}
        return "resnet152" if len(blocks) == 36 else "resnet50" if len(blocks) == 6 else ""
    if "layer4.0.conv2.weight" in keys:
        return "resnet18" if "layer1.2.conv1.weight" not in keys else ""
    if "features.28.weight" in keys:
        return "vgg16"
    if "features.10.weight" in keys and "classifier.6.weight" in keys:
        return "alexnet"
    return ""


def convert_state_dict(state, arch: str, num_classes: int):
    """A torchvision-layout state_dict (NumPy or torch tensors) -> ``(module, variables)``; every key checked.

    ``module.``-prefixed (``DataParallel``) keys, DenseNet's pre-0.4 key
    spelling and BatchNorm's ``num_batches_tracked`` are accepted. Raises
    :class:`converters.common.ConversionError` naming missing, unexpected and
    mis-shaped keys.
    """
    _check_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise common.ConversionError(f"--num_classes must be a positive integer, got {num_classes!r}")
    state = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in state.items()}
    state = _rename_old_densenet(_strip_module_prefix(state))
    module, layout, override = _layout(arch, int(num_classes))
    try:
        common.check_state_dict(state, {k: v[3] for k, v in layout.items()},
                                what=f"torchvision {arch} with {num_classes} classes", ignore=("num_batches_tracked",))
    except common.ConversionError as e:
        guess = _guess_arch(state)
        hint = f" It looks like a torchvision {guess} checkpoint: use --arch={guess}." if guess and guess != arch else ""
        raise common.ConversionError(str(e) + hint) from None
    return module, common.build_variables(state, layout, override(state) if override else None)


def convert(input_path: str, output_dir: str, arch: str, num_classes: int, classes_path: str | None = None) -> dict:
    """Convert ``input_path`` (.pth) into the model directory ``output_dir``; returns the metadata written."""
    _check_arch(arch)
    common.require_empty_output(output_dir)
    if classes_path:
        common.read_classes(classes_path, num_classes)  # a bad class file is refused before the weights are read
    return common.convert_classifier(f"{arch}_torchvision", input_path, output_dir,
                                     lambda state: convert_state_dict(state, arch, num_classes),
                                     classes_path=classes_path, arch=arch)
