"""PyTorch reference modules for the model zoo, written from the spec with ``torch.nn`` only.

Each reproduces a published state_dict key layout and forward pass, so a
random-init instance saved with ``torch.save(m.state_dict(), path)`` stands in
for the real ``.pth`` file:

* :func:`tv_vgg16`, :func:`tv_alexnet`, :func:`tv_resnet`, :func:`tv_densenet161`:
  ``torchvision.models`` layouts (``features.28.weight``, ``layer4.2.conv3.weight``,
  ``features.denseblock4.denselayer24.conv2.weight``, ``classifier.6.bias``).
* :class:`PlacesAlexNet`: ``experiment/oldalexnet.py`` (netdissect2017.md 5.2,
  dissect-spec.md 1.4): CaffeNet order conv-relu-pool-LRN, groups [1, 2, 1, 2, 2].
* :func:`old_resnet152`: ``experiment/oldresnet152.py``, the Torch7-converted
  flat ``nn.Sequential`` with numeric keys (netdissect2017.md 5.3, dissect-spec.md 1.5).

Weights are He-normal, biases and BatchNorm parameters and running statistics
random (so inference-mode BN is really exercised); everything in eval mode.
:func:`run_torch` captures any submodule by its PyTorch dotted path with a
forward hook (an alias of the output, as the originals retained layers: an
in-place ReLU after a conv makes the capture post-ReLU).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-normal conv/linear weights, N(0, 0.05) biases, random BN affine and running stats; eval mode."""
    g = torch.Generator()
    g.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.weight[0].numel()), generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.05, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


# --------------------------------------------------------------------------
# torchvision layouts


class TVVGG16(nn.Module):
    """torchvision ``vgg16``: ``features`` (numbered), ``avgpool`` (7x7 adaptive), ``classifier.{0,3,6}``."""

    def __init__(self, num_classes=1000):
        super().__init__()
        layers, in_ch = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )  # fmt: skip

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def tv_vgg16(num_classes=1000, seed=0):
    return randomize(TVVGG16(num_classes), seed)


# --------------------------------------------------------------------------
# Running and capturing


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if a.ndim == 4 else a.copy()


def run_torch(model: nn.Module, x, capture=()):
    """Run ``model`` on NHWC NumPy images; returns ``(logits, {torch_path: activation NHWC})``."""
    x = torch.as_tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2).contiguous()
    retained, handles = {}, []
    modules = dict(model.named_modules())
    try:
        for name in capture:
            handles.append(modules[name].register_forward_hook(
                lambda m, i, o, name=name: retained.__setitem__(name, o)))
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return _to_numpy(out), {k: _to_numpy(v) for k, v in retained.items()}
