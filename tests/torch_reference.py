"""PyTorch reference modules for tests, written from the spec (dissect-spec.md 1.3, 1.6) with ``torch.nn`` only.

They reproduce the original models' state_dict key names and forward passes,
so a random-init instance saved with :func:`save_state_dict` stands in for the
published ``.pth`` files, and :func:`run_torch` gives the independent
reference for layer outputs and unit ablations.

* :class:`TorchVGG16`: keys ``features.conv1_1.weight`` ... ``features.conv5_3.bias``,
  ``classifier.fc6.*``, ``classifier.fc7.*``, ``classifier.fc8a.*``.
* :class:`TorchProGAN`: keys ``layerK.conv.weight``, ``layerK.wscale.b``,
  ``output_RxR.conv.weight``, ``output_RxR.wscale.b``; :func:`to_old_format`
  renames them to the old ``features.{K-1}.*`` / ``output.*`` layout.

Layer names are the Flax ones (``conv5_3``, ``fc8``, ``layer4``,
``output_256x256``); :func:`run_torch` maps them onto the PyTorch modules.
Arrays cross the boundary as NumPy, images NHWC, like the Flax models.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.nn.utils import skip_init

VGG_CONV_LAYERS = (
    "conv1_1", "conv1_2",
    "conv2_1", "conv2_2",
    "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3",
    "conv5_1", "conv5_2", "conv5_3",
)  # fmt: skip
_VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)

# The official LSUN PGGAN widths (spec 1.6, first column): a 256x256 generator.
PROGGAN_SIZES = (512, 512, 512, 512, 512, 256, 128, 64)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class TorchVGG16(nn.Module):
    """VGG16-Places365 as ``experiment/oldvgg16.py`` builds it (eval mode, in-place ReLUs).

    Weights are He-normal (biases N(0, 0.05)) so activations keep their scale
    through all 13 ReLU layers and relative-error comparisons stay meaningful.
    """

    def __init__(self, num_classes: int = 365, seed: int = 0):
        super().__init__()
        features = OrderedDict()
        in_ch = 3
        for name, width in zip(VGG_CONV_LAYERS, _VGG_WIDTHS):
            block, idx = name[4:].split("_")
            if idx == "1" and block != "1":
                features[f"pool{int(block) - 1}"] = nn.MaxPool2d(kernel_size=2, stride=2)
            features[name] = skip_init(nn.Conv2d, in_ch, width, kernel_size=3, padding=1)
            features[f"relu{block}_{idx}"] = nn.ReLU(inplace=True)
            in_ch = width
        features["pool5"] = nn.MaxPool2d(kernel_size=2, stride=2)
        self.features = nn.Sequential(features)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=skip_init(nn.Linear, 512 * 7 * 7, 4096),
                relu6=nn.ReLU(inplace=True),
                drop6=nn.Dropout(0.5),
                fc7=skip_init(nn.Linear, 4096, 4096),
                relu7=nn.ReLU(inplace=True),
                drop7=nn.Dropout(0.5),
                fc8a=skip_init(nn.Linear, 4096, num_classes),
            )
        )
        # Every weight and bias is drawn here (skip_init leaves PyTorch's default init out: 2-3 s for fc6 alone).
        g = _generator(seed)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    fan_in = m.weight[0].numel()
                    gain = 1.0 if m is self.classifier.fc8a else 2.0
                    m.weight.normal_(0.0, math.sqrt(gain / fan_in), generator=g)
                    m.bias.normal_(0.0, 0.05, generator=g)
        self.eval()

    layer_names = VGG_CONV_LAYERS

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)

    def module_named(self, name: str) -> nn.Module:
        """The module behind a Flax layer name (``conv5_3``, ``pool5``, ``avgpool``, ``fc6``, ``fc8``)."""
        name = name.split(".")[-1]
        if name == "fc8":
            name = "fc8a"
        if name == "avgpool":
            return self.avgpool
        for seq in (self.features, self.classifier):
            if name in seq._modules:
                return seq._modules[name]
        raise KeyError(f"TorchVGG16 has no layer {name!r}")


class PixelNorm(nn.Module):
    def forward(self, x):
        return x / torch.sqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class WScale(nn.Module):
    """Equalized learning rate: ``x * gain / sqrt(fan_in) + b``; only ``b`` is stored."""

    def __init__(self, size: int, fan_in: int, gain: float):
        super().__init__()
        self.scale = gain / math.sqrt(fan_in)
        self.b = nn.Parameter(torch.zeros(size))

    def forward(self, x):
        return x * self.scale + self.b.view(1, -1, 1, 1)


class NormConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int):
        super().__init__()
        self.norm = PixelNorm()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, 1, padding, bias=False)
        self.wscale = WScale(out_ch, in_ch, gain=math.sqrt(2) / kernel_size)
        self.relu = nn.LeakyReLU(inplace=True, negative_slope=0.2)

    def forward(self, x):
        return self.relu(self.wscale(self.conv(self.norm(x))))


class NormUpscaleConvBlock(NormConvBlock):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, padding: int = 1):
        super().__init__(in_ch, out_ch, kernel_size, padding)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        return self.relu(self.wscale(self.conv(self.up(self.norm(x)))))


class OutputConvBlock(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.norm = PixelNorm()
        self.conv = nn.Conv2d(in_ch, 3, kernel_size=1, padding=0, bias=False)
        self.wscale = WScale(3, in_ch, gain=1)

    def forward(self, x):
        return self.wscale(self.conv(self.norm(x)))


class TorchProGAN(nn.Sequential):
    """The Progressive GAN generator of ``experiment/proggan.py`` for ``sizes = [latent, widths...]``.

    Conv weights are N(0, 1) (the runtime WScale gives them He scale), biases
    N(0, 0.1).
    """

    def __init__(self, sizes=PROGGAN_SIZES, seed: int = 0):
        sizes = tuple(sizes)
        layers = [NormConvBlock(sizes[0], sizes[1], 4, 3), NormConvBlock(sizes[1], sizes[1], 3, 1)]
        for si, so in zip(sizes[1:-1], sizes[2:]):
            layers += [NormUpscaleConvBlock(si, so), NormConvBlock(so, so, 3, 1)]
        res = 4 * 2 ** (len(layers) // 2 - 1)
        named = OrderedDict((f"layer{i + 1}", m) for i, m in enumerate(layers))
        named[f"output_{res}x{res}"] = OutputConvBlock(sizes[-1])
        super().__init__(named)
        self.sizes = sizes
        self.resolution = res
        g = _generator(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.normal_(0.0, 1.0 if name.endswith("conv.weight") else 0.1, generator=g)
        self.eval()

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self._modules)

    def forward(self, z):
        return super().forward(z.view(z.shape[0], z.shape[1], 1, 1))

    def module_named(self, name: str) -> nn.Module:
        if name not in self._modules:
            raise KeyError(f"TorchProGAN has no layer {name!r}")
        return self._modules[name]


def to_old_format(state_dict) -> OrderedDict:
    """Rename ProGAN keys to the old layout: ``layerK.*`` -> ``features.{K-1}.*``, ``output_RxR.*`` -> ``output.*``."""
    out = OrderedDict()
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head.startswith("layer"):
            key = f"features.{int(head[5:]) - 1}.{rest}"
        elif head.startswith("output_"):
            key = f"output.{rest}"
        out[key] = value
    return out


def save_state_dict(module_or_state, path, wrap: bool = False) -> None:
    """``torch.save`` a module's (or a given) state_dict, optionally wrapped as ``{'state_dict': ...}``."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    torch.save({"state_dict": state} if wrap else state, path)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if a.ndim == 4 else a.copy()


def run_torch(model, x, capture=(), zero_units=None):
    """Run ``model`` on NumPy input ``x``; returns ``(output, {layer: activation})`` as NumPy.

    ``x`` is an NHWC image batch for :class:`TorchVGG16` and ``z`` ``[N, C]``
    for :class:`TorchProGAN`; 4-D outputs come back NHWC. ``capture`` lists
    layer names to return; ``zero_units`` maps layer names to unit indices set
    to zero in that layer's output (in place, as the experiments' rules do).

    Captures are aliases of the module output taken by a forward hook, as in
    the original ``retain_layer``; a VGG conv or fc layer's in-place ReLU
    therefore makes its capture post-ReLU (spec 1.3 quirk). Zeroing a conv
    output before its ReLU equals zeroing after it.
    """
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if x.ndim == 4 and isinstance(model, TorchVGG16):
        x = x.permute(0, 3, 1, 2).contiguous()
    zero_units = dict(zero_units or {})
    retained = {}
    handles = []

    def make_hook(name):
        units = zero_units.get(name)

        def hook(module, inputs, output):
            if units is not None:
                output[:, list(units)] = 0
            if name in capture:
                retained[name] = output

        return hook

    try:
        for name in set(capture) | set(zero_units):
            handles.append(model.module_named(name).register_forward_hook(make_hook(name)))
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return _to_numpy(out), {name: _to_numpy(t) for name, t in retained.items()}
