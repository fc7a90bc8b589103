"""Pretrained-model architectures (Flax Linen, NHWC) for the converted checkpoints.

* :class:`VGG16` (VGG16-Places365, spec 1.3): captured layers ``conv1_1`` ...
  ``conv5_3`` are POST-ReLU (what the original's aliased retained tensors
  held), also ``pool1..5``, ``avgpool``, ``fc6``/``fc7`` (post-ReLU), ``fc8`` logits.
* :class:`HybridLayerNormEncoder` (ganseeing's ProGAN inversion encoder):
  stages ``resnet`` (layer-4 estimate), ``inv4`` ... ``inv1`` (z).
* :class:`ToyGenerator` (``toy_generator``): a 32-pixel ProGAN-like generator
  with planted red/green/blue units at ``layer4`` for tests and demos.
* :class:`ProgressiveGenerator` (Progressive GAN, spec 1.6): captured layers
  ``layer1`` ... ``layerN`` are block outputs after the LeakyReLU(0.2);
  ``output_RxR`` is the RGB image (zc, unclamped).
* :class:`AlexNet` (AlexNet-Places365, CaffeNet order, 227 input): ``conv1`` ...
  ``conv5`` post-ReLU, ``pool5``, ``fc6``/``fc7`` (post-ReLU), ``fc8``;
  :class:`TorchvisionAlexNet` the same names for torchvision's variant.
* :class:`OldResNet152` (ResNet152-Places365): the original's numeric names,
  ``0`` (stem conv, before BN), ``4`` ... ``7`` (stage outputs, post-ReLU).
* :class:`ResNet` (torchvision ResNet-18/34/50/101/152): ``conv1``, ``layer1`` ...
  ``layer4``, ``fc``; :class:`DenseNet` (torchvision DenseNet-161):
  ``features`` (``norm5``, before the last ReLU), ``features.denseblockK``.

Load converted weights with :func:`jaxdissect.load_model`.

On CPU, call :func:`set_cpu_xla_flags` before JAX's first computation: by
default jaxlib 0.10 hands a whole VGG16 (13 convs, pools, fc6, fc7) to
YNNPACK as one fused subgraph, which costs 2-3x the CPU time of XLA's own
convolutions, and even one YNNPACK call per conv leaves the segmenter's wide
decoder convolutions about 1.5x slower than XLA's own (bench/RESULTS.md,
"Forward pass" and "Segmenter").
"""

import os

from jaxdissect.models.alexnet import AlexNet, TorchvisionAlexNet
from jaxdissect.models.densenet import DenseNet
from jaxdissect.models.proggan import ProgressiveGenerator
from jaxdissect.models.proggan_encoder import HybridLayerNormEncoder
from jaxdissect.models.resnet import OldResNet152, ResNet
from jaxdissect.models.toy_generator import ToyGenerator
from jaxdissect.models.vgg16 import VGG16

__all__ = ["VGG16", "ProgressiveGenerator", "ToyGenerator", "HybridLayerNormEncoder", "AlexNet", "TorchvisionAlexNet",
           "OldResNet152", "ResNet", "DenseNet", "CPU_XLA_FLAGS", "set_cpu_xla_flags"]

# Offload nothing to YNNPACK: XLA's own (Eigen) convolutions and dots.
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="
# jaxlib versions where the flag exists and was measured (XLA aborts on unknown flags).
_CPU_FLAG_JAXLIB = ("0.10.",)


def set_cpu_xla_flags() -> str:
    """Append :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS`` (unless set already); returns the value.

    Must run before JAX creates its CPU backend (its first computation) to
    take effect; does nothing on jaxlib versions other than those measured,
    and leaves an explicit ``--xla_cpu_experimental_ynn_fusion_type`` alone.
    """
    from importlib.metadata import PackageNotFoundError, version

    flags = os.environ.get("XLA_FLAGS", "")
    try:
        jaxlib_version = version("jaxlib")
    except PackageNotFoundError:
        return flags
    if jaxlib_version.startswith(_CPU_FLAG_JAXLIB) and "xla_cpu_experimental_ynn_fusion_type" not in flags:
        flags = f"{flags} {CPU_XLA_FLAGS}".strip()
        os.environ["XLA_FLAGS"] = flags
    return flags
