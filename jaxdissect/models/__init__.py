"""Pretrained-model architectures (Flax Linen, NHWC) for the converted checkpoints.

* :class:`VGG16` (VGG16-Places365, spec 1.3): captured layers ``conv1_1`` ...
  ``conv5_3`` are POST-ReLU (what the original's aliased retained tensors
  held), also ``pool1..5``, ``avgpool``, ``fc6``/``fc7`` (post-ReLU), ``fc8`` logits.
* :class:`ProgressiveGenerator` (Progressive GAN, spec 1.6): captured layers
  ``layer1`` ... ``layerN`` are block outputs after the LeakyReLU(0.2);
  ``output_RxR`` is the RGB image (zc, unclamped).

Load converted weights with :func:`jaxdissect.load_model`.
"""

from jaxdissect.models.proggan import ProgressiveGenerator
from jaxdissect.models.vgg16 import VGG16

__all__ = ["VGG16", "ProgressiveGenerator"]
