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


class TVAlexNet(nn.Module):
    """torchvision ``alexnet``: ``features.{0,3,6,8,10}`` convs, ``avgpool`` (6x6 adaptive), ``classifier.{1,4,6}``."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )  # fmt: skip

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def tv_alexnet(num_classes=1000, seed=0):
    return randomize(TVAlexNet(num_classes), seed)


class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TVResNet(nn.Module):
    """torchvision ``ResNet``: ``conv1``, ``bn1``, ``layer1..4`` (``S.B.convK``/``bnK``/``downsample.0/1``), ``fc``."""

    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tv_resnet(depth, num_classes=1000, seed=0):
    block, layers = {18: (TVBasicBlock, [2, 2, 2, 2]), 50: (TVBottleneck, [3, 4, 6, 3]),
                     152: (TVBottleneck, [3, 8, 36, 3])}[depth]
    return randomize(TVResNet(block, layers, num_classes), seed)


class TVDenseLayer(nn.Module):
    def __init__(self, in_ch, growth_rate, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class TVDenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, in_ch, bn_size, growth_rate):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", TVDenseLayer(in_ch + i * growth_rate, growth_rate, bn_size))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class TVDenseNet(nn.Module):
    """torchvision ``DenseNet``: ``features.conv0/norm0/denseblockK/transitionK/norm5``, ``classifier``."""

    def __init__(self, growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96, bn_size=4,
                 num_classes=1000):
        super().__init__()
        f = OrderedDict(conv0=nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False),
                        norm0=nn.BatchNorm2d(num_init_features), relu0=nn.ReLU(inplace=True),
                        pool0=nn.MaxPool2d(3, 2, 1))
        n = num_init_features
        for i, num_layers in enumerate(block_config):
            f[f"denseblock{i + 1}"] = TVDenseBlock(num_layers, n, bn_size, growth_rate)
            n += num_layers * growth_rate
            if i != len(block_config) - 1:
                f[f"transition{i + 1}"] = nn.Sequential(OrderedDict(
                    norm=nn.BatchNorm2d(n), relu=nn.ReLU(inplace=True), conv=nn.Conv2d(n, n // 2, 1, bias=False),
                    pool=nn.AvgPool2d(2, 2)))
                n //= 2
        f["norm5"] = nn.BatchNorm2d(n)
        self.features = nn.Sequential(f)
        self.classifier = nn.Linear(n, num_classes)

    def forward(self, x):
        # A copy, so a hook on ``features`` keeps the pre-ReLU value (NetDissect-Lite copied it to the host).
        out = F.relu(self.features(x).clone())
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


def tv_densenet161(num_classes=1000, seed=0):
    return randomize(TVDenseNet(num_classes=num_classes), seed)


def old_densenet_keys(state):
    """torchvision's pre-0.4 DenseNet spelling: ``denselayerN.norm1.weight`` -> ``denselayerN.norm.1.weight``."""
    import re

    return OrderedDict((re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k), v)
                       for k, v in state.items())


# --------------------------------------------------------------------------
# The PNAS code's Places365 classifiers


class LRN(nn.Module):
    """Across-channel LRN as ``oldalexnet.py`` computes it: x / (1 + alpha * avg5(x^2))^beta (padding counted)."""

    def __init__(self, size=5, alpha=1e-4, beta=0.75):
        super().__init__()
        self.avg = nn.AvgPool3d((size, 1, 1), stride=1, padding=((size - 1) // 2, 0, 0))
        self.alpha, self.beta = alpha, beta

    def forward(self, x):
        div = self.avg(x.pow(2).unsqueeze(1)).squeeze(1)
        return x / div.mul(self.alpha).add(1.0).pow(self.beta)


class PlacesAlexNet(nn.Sequential):
    """AlexNet-Places365: conv1, relu1, pool1, lrn1, conv2, ..., pool5, flatten, fc6, relu6, drop6, fc7, ..., fc8."""

    def __init__(self, num_classes=365):
        w = [3, 96, 256, 384, 384, 256]
        groups = [1, 2, 1, 2, 2]
        kernel = [11, 5, 3, 3, 3]
        stride = [4, 1, 1, 1, 1]
        pad = [0, 2, 1, 1, 1]
        layers = OrderedDict()
        for i in range(5):
            n = i + 1
            layers[f"conv{n}"] = nn.Conv2d(w[i], w[n], kernel[i], stride[i], pad[i], groups=groups[i])
            layers[f"relu{n}"] = nn.ReLU(inplace=True)
            if n in (1, 2, 5):
                layers[f"pool{n}"] = nn.MaxPool2d(3, 2)
            if n in (1, 2):
                layers[f"lrn{n}"] = LRN()
        layers["flatten"] = nn.Flatten()
        layers["fc6"] = nn.Linear(256 * 6 * 6, 4096)
        layers["relu6"] = nn.ReLU(inplace=True)
        layers["dropout6"] = nn.Dropout()
        layers["fc7"] = nn.Linear(4096, 4096)
        layers["relu7"] = nn.ReLU(inplace=True)
        layers["dropout7"] = nn.Dropout()
        layers["fc8"] = nn.Linear(4096, num_classes)
        super().__init__(layers)


def places_alexnet(num_classes=365, seed=0):
    return randomize(PlacesAlexNet(num_classes), seed)


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _Add(nn.Module):
    """Torch7's ``CAddTable`` after a ``ConcatTable`` of the residual and shortcut branches."""

    def forward(self, pair):
        return pair[0] + pair[1]


class _Branches(nn.Module):
    """Torch7's ``ConcatTable``: children ``0`` (residual) and ``1`` (shortcut) applied to the same input."""

    def __init__(self, residual, shortcut):
        super().__init__()
        self.add_module("0", residual)
        self.add_module("1", shortcut)

    def forward(self, x):
        return self._modules["0"](x), self._modules["1"](x)


def _old_bottleneck(inplanes, mid, stride, project):
    residual = nn.Sequential(
        nn.Conv2d(inplanes, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, 4 * mid, 1, bias=False), nn.BatchNorm2d(4 * mid),
    )  # fmt: skip
    shortcut = (nn.Sequential(nn.Conv2d(inplanes, 4 * mid, 1, stride, bias=False), nn.BatchNorm2d(4 * mid))
                if project else nn.Identity())
    return nn.Sequential(_Branches(residual, shortcut), _Add(), nn.ReLU())


class OldResNet152(nn.Sequential):
    """ResNet152-Places365 in the Torch7-converted numeric layout (``7.0.0.1.0.weight``, ``10.1.weight``).

    ``pool`` is the average pool at child ``8``: the original's ``AvgPool2d(7, 1)``
    works only at 224 input; tests at smaller inputs pass the global mean it
    equals there.
    """

    def __init__(self, num_classes=365, pool=None):
        mods = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        inplanes = 64
        for s, (blocks, mid) in enumerate(zip((3, 8, 36, 3), (64, 128, 256, 512))):
            stage = []
            for b in range(blocks):
                stage.append(_old_bottleneck(inplanes, mid, 2 if (b == 0 and s > 0) else 1, b == 0))
                inplanes = 4 * mid
            mods.append(nn.Sequential(*stage))
        mods += [pool or nn.AvgPool2d(7, 1), _Lambda(lambda x: x.view(x.size(0), -1)),
                 nn.Sequential(_Lambda(lambda x: x), nn.Linear(2048, num_classes))]
        super().__init__(*mods)


def old_resnet152(num_classes=365, seed=0, pool=None):
    return randomize(OldResNet152(num_classes, pool), seed)


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
