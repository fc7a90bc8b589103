"""PyTorch reference segmenters and fake published checkpoints, written from the spec (section 1.7).

Independent of the Flax code under test: plain ``torch.nn`` modules with the
published state_dict key names (deep-stem ResNet-50 + UPerNet with a direct
precise-RoI-pooling integral; dilated ResNet-18 + PPM deep-sup head), random
weights with non-trivial BatchNorm statistics, and ``labels.json`` files in
the published format.

Other tests use :func:`make_upp_checkpoint` / :func:`make_color_checkpoint`
to obtain ``encoder_epoch_*.pth``, ``decoder_epoch_*.pth`` and ``labels.json``
in a temporary directory, and :func:`load_upp_reference` /
:func:`load_color_reference` + :func:`upp_reference_forward` /
:func:`color_reference_forward` for reference outputs (NCHW tensors).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

UPP_BGR_MEAN = (102.9801, 115.9465, 122.7717)
POOL_SCALES = (1, 2, 3, 6)


# ----------------------------------------------------------------------------- building blocks

def _conv(cin, cout, k, stride=1, dilation=1, bias=False):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, bias=bias)


def _cbr(cin, cout, k=3):
    return nn.Sequential(_conv(cin, cout, k), nn.BatchNorm2d(cout), nn.ReLU())


class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride=1, downsample=False):
        super().__init__()
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, 4 * planes, 1)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = (nn.Sequential(_conv(cin, 4 * planes, 1, stride), nn.BatchNorm2d(4 * planes))
                           if downsample else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class BasicBlock(nn.Module):
    def __init__(self, cin, planes, stride=1, dilation1=1, dilation=1, downsample=False):
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride, dilation1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = (nn.Sequential(_conv(cin, planes, 1, stride), nn.BatchNorm2d(planes))
                           if downsample else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class DeepStemResNet(nn.Module):
    """Stem conv1..bn3 + maxpool, then ``layer1..layer4``; forward returns the four stage outputs."""

    def __init__(self, layers):
        super().__init__()
        self.conv1, self.bn1 = _conv(3, 64, 3, 2), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = _conv(64, 64, 3), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = _conv(64, 128, 3), nn.BatchNorm2d(128)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out


def resnet50_encoder():
    cin, stages = 128, []
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        stage = [Bottleneck(cin, planes, stride, downsample=True)]
        stage += [Bottleneck(4 * planes, planes) for _ in range(blocks - 1)]
        stages.append(nn.Sequential(*stage))
        cin = 4 * planes
    return DeepStemResNet(stages)


def resnet18_dilated_encoder():
    """Dilation scale 8 (``ResnetDilated``): layer3/4 un-strided, 3x3 dilations 1,2,2,2 and 2,4,4,4."""
    cin, stages = 128, []
    for planes, stride, d1, d in ((64, 1, 1, 1), (128, 2, 1, 1), (256, 1, 1, 2), (512, 1, 2, 4)):
        stages.append(nn.Sequential(BasicBlock(cin, planes, stride, d1, d, downsample=True),
                                    BasicBlock(planes, planes, 1, d, d)))
        cin = planes
    return DeepStemResNet(stages)


# ----------------------------------------------------------------------------- precise RoI pooling

def _cell_integrals(a0, a1):
    """Integrals over local coordinate [a0, a1] in [0, 1] of the left (1 - a) and right (a) corner weights."""
    left = (a1 - 0.5 * a1 * a1) - (a0 - 0.5 * a0 * a0)
    right = 0.5 * (a1 * a1 - a0 * a0)
    return left, right


def prroi_pool_reference(x, bins):
    """Precise RoI pooling of NCHW ``x`` over the whole map [0, W] x [0, H], cell by cell.

    Each unit cell [i, i+1] x [j, j+1] carries the bilinear interpolant of its
    four corner pixels (pixels outside the map are 0); a bin's value is the
    exact integral of that surface over the bin, divided by the bin's area.
    """
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, bins, bins)

    def pixel(i, j):
        return x[:, :, i, j] if 0 <= i < h and 0 <= j < w else x.new_zeros(n, c)

    bh, bw = h / bins, w / bins
    for p in range(bins):
        y0, y1 = p * bh, (p + 1) * bh
        for q in range(bins):
            x0, x1 = q * bw, (q + 1) * bw
            acc = x.new_zeros(n, c)
            for i in range(math.floor(y0), math.ceil(y1)):
                ty = _cell_integrals(max(y0, i) - i, min(y1, i + 1) - i)
                for j in range(math.floor(x0), math.ceil(x1)):
                    tx = _cell_integrals(max(x0, j) - j, min(x1, j + 1) - j)
                    for di in (0, 1):
                        for dj in (0, 1):
                            acc = acc + pixel(i + di, j + dj) * (ty[di] * tx[dj])
            out[:, :, p, q] = acc / (bh * bw)
    return out


# ----------------------------------------------------------------------------- decoders

class UPerNetDecoder(nn.Module):
    """The UPP decoder with the published key names (fpn_dim 512, fc_dim 2048)."""

    def __init__(self, n_object, n_material, n_scene, n_part, fpn_dim=512):
        super().__init__()
        self.ppm_conv = nn.ModuleList(
            nn.Sequential(_conv(2048, 512, 1), nn.BatchNorm2d(512), nn.ReLU()) for _ in POOL_SCALES)
        self.ppm_last_conv = _cbr(2048 + len(POOL_SCALES) * 512, fpn_dim)
        self.fpn_in = nn.ModuleList(
            nn.Sequential(_conv(c, fpn_dim, 1), nn.BatchNorm2d(fpn_dim), nn.ReLU()) for c in (256, 512, 1024))
        self.fpn_out = nn.ModuleList(nn.Sequential(_cbr(fpn_dim, fpn_dim)) for _ in range(3))
        self.conv_fusion = _cbr(4 * fpn_dim, fpn_dim)
        self.scene_head = nn.Sequential(_cbr(fpn_dim, fpn_dim), nn.AdaptiveAvgPool2d(1),
                                        nn.Conv2d(fpn_dim, n_scene, 1, bias=True))
        self.object_head = nn.Sequential(_cbr(fpn_dim, fpn_dim), nn.Conv2d(fpn_dim, n_object, 1, bias=True))
        self.part_head = nn.Sequential(_cbr(fpn_dim, fpn_dim), nn.Conv2d(fpn_dim, n_part, 1, bias=True))
        self.material_head = nn.Sequential(_cbr(fpn_dim, fpn_dim), nn.Conv2d(fpn_dim, n_material, 1, bias=True))

    def forward(self, conv_out, seg_size=None):
        c5 = conv_out[-1]
        size5 = c5.shape[2:]
        ppm = [c5]
        for scale, pool_conv in zip(POOL_SCALES, self.ppm_conv):
            pooled = F.interpolate(prroi_pool_reference(c5, scale), size5, mode="bilinear", align_corners=False)
            ppm.append(pool_conv(pooled))
        f = self.ppm_last_conv(torch.cat(ppm, 1))
        out = {"scene": self.scene_head(f)[:, :, 0, 0]}
        pyramid = [f]
        for i in reversed(range(3)):
            lat = self.fpn_in[i](conv_out[i])
            f = F.interpolate(f, size=lat.shape[2:], mode="bilinear", align_corners=False) + lat
            pyramid.append(self.fpn_out[i](f))
        pyramid.reverse()
        out["material"] = self.material_head(pyramid[0])
        size2 = pyramid[0].shape[2:]
        fused = torch.cat([pyramid[0]] + [F.interpolate(p, size2, mode="bilinear", align_corners=False)
                                          for p in pyramid[1:]], 1)
        x = self.conv_fusion(fused)
        out["object"] = self.object_head(x)
        out["part"] = self.part_head(x)
        if seg_size is not None:
            for k in ("object", "material", "part"):
                out[k] = F.interpolate(out[k], size=seg_size, mode="bilinear", align_corners=False)
        return out


class PPMDeepsupDecoder(nn.Module):
    """The colour decoder (fc_dim 512) with the published key names, deep-sup branch included."""

    def __init__(self, n_labels, fc_dim=512):
        super().__init__()
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv(fc_dim, 512, 1), nn.BatchNorm2d(512), nn.ReLU())
            for s in POOL_SCALES)
        self.cbr_deepsup = _cbr(fc_dim // 2, fc_dim // 4)
        self.conv_last = nn.Sequential(_conv(fc_dim + len(POOL_SCALES) * 512, 512, 3), nn.BatchNorm2d(512),
                                       nn.ReLU(), nn.Dropout2d(0.1), nn.Conv2d(512, n_labels, 1))
        self.conv_last_deepsup = nn.Conv2d(fc_dim // 4, n_labels, 1)

    def forward(self, conv_out, seg_size=None):
        c5 = conv_out[-1]
        ppm = [c5] + [F.interpolate(branch(c5), c5.shape[2:], mode="bilinear", align_corners=False)
                      for branch in self.ppm]
        x = self.conv_last(torch.cat(ppm, 1))
        if seg_size is not None:
            x = F.interpolate(x, size=seg_size, mode="bilinear", align_corners=False)
        return x


# ----------------------------------------------------------------------------- random weights

@torch.no_grad()
def _randomise(module, calibrate, seed):
    """Random weights, then BatchNorm statistics measured on ``calibrate()``'s input and perturbed.

    Measuring the statistics keeps activations at a trained network's scale
    through 16 residual blocks; the perturbation makes them non-trivial
    (means, variances, scales and shifts all away from 0 and 1).
    """
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = 1.0
    module.train()
    module(*calibrate())
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_mean.add_(torch.randn(c, generator=g) * 0.1 * m.running_var.sqrt())
            m.running_var.mul_(0.8 + 0.4 * torch.rand(c, generator=g))
            m.momentum = 0.1
    module.eval()


def _save(module, path, extra=None):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state.update(extra or {})
    torch.save(state, path)


# ----------------------------------------------------------------------------- labels.json

def upp_labels(n_object=6, n_material=4, n_scene=3, object_part=None):
    """A small UPP ``labels.json`` dict: objects ``-, obj1..``, materials ``-, mat1..``, scenes, parts.

    Default ``object_part`` has three owners in increasing object order; some
    part names coincide with object names (``obj4``, ``obj1``) and one (``leg``)
    is shared by two owners.
    """
    objects = ["-"] + [f"obj{i}" for i in range(1, n_object)]
    if object_part is None:
        object_part = {"obj2": ["-", "leg", "obj4"], "obj3": ["-", "leg", "door", "handle"], "obj5": ["-", "obj1"]}
    parts = []
    for names in object_part.values():
        parts += [p for p in names if p not in parts]
    return {
        "object": objects,
        "material": ["-"] + [f"mat{i}" for i in range(1, n_material)],
        "scene": [f"scene{i}" for i in range(1, n_scene + 1)],
        "part": parts,
        "object_part": object_part,
    }


def upp_part_sizes(labels):
    """Part-group sizes in increasing object index of the owners (the decoder's channel order)."""
    owners = sorted(labels["object_part"], key=labels["object"].index)
    return tuple(len(labels["object_part"][o]) for o in owners)


def color_labels(imageformat=None):
    """A small colour ``labels.json`` dict: a ``color`` category, a masked ``shade`` category, one internal label."""
    color = ["-", "black", "white", "red", "green", "blue", "orange"]
    labels = [{"name": n, "category": "color"} for n in color]
    labels.append({"name": "gray", "category": "color", "internal": True})
    labels += [{"name": "dark", "category": "shade"}, {"name": "light", "category": "shade"},
               {"name": "red", "category": "shade"}]
    return {
        "labels": labels,
        "categories": [{"name": "color"}, {"name": "shade", "mask": "white"}],
        "imageformat": imageformat or {"byteorder": "BGR", "mean": [0.406, 0.456, 0.485],
                                       "stdev": [0.225, 0.224, 0.229]},
        "segsizes": [256],
    }


def _write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# ----------------------------------------------------------------------------- fake published checkpoints

def make_upp_checkpoint(tmpdir, n_object=6, n_material=4, n_scene=3, object_part=None, seed=0, epoch=40,
                        calibrate_size=64):
    """Write random-weight ``encoder_epoch_<epoch>.pth``, ``decoder_epoch_<epoch>.pth`` and ``labels.json``.

    Returns ``{'dir', 'encoder', 'decoder', 'labels'}`` (paths). The encoder
    file also holds an unused ``fc`` layer, as files saved from a full ResNet may.
    """
    tmpdir = str(tmpdir)
    os.makedirs(tmpdir, exist_ok=True)
    labels = upp_labels(n_object, n_material, n_scene, object_part)
    torch.manual_seed(seed)
    encoder = resnet50_encoder()
    decoder = UPerNetDecoder(len(labels["object"]), len(labels["material"]), len(labels["scene"]),
                             sum(upp_part_sizes(labels)))
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(2, 3, calibrate_size, calibrate_size, generator=g) * 60.0
    _randomise(encoder, lambda: (images,), seed + 2)
    with torch.no_grad():
        features = encoder(images)
    _randomise(decoder, lambda: (features,), seed + 3)
    paths = {
        "dir": tmpdir,
        "encoder": os.path.join(tmpdir, f"encoder_epoch_{epoch}.pth"),
        "decoder": os.path.join(tmpdir, f"decoder_epoch_{epoch}.pth"),
        "labels": os.path.join(tmpdir, "labels.json"),
    }
    fc = {"fc.weight": torch.randn(1000, 2048) * 0.01, "fc.bias": torch.zeros(1000)}
    _save(encoder, paths["encoder"], fc)
    _save(decoder, paths["decoder"])
    _write_json(labels, paths["labels"])
    return paths


def make_color_checkpoint(tmpdir, labels=None, seed=0, epoch=20, calibrate_size=64):
    """Write random-weight colour ``encoder_epoch_<epoch>.pth``, ``decoder_epoch_<epoch>.pth``, ``labels.json``.

    Returns ``{'dir', 'encoder', 'decoder', 'labels'}`` (paths).
    """
    tmpdir = str(tmpdir)
    os.makedirs(tmpdir, exist_ok=True)
    labels = labels or color_labels()
    torch.manual_seed(seed)
    encoder = resnet18_dilated_encoder()
    decoder = PPMDeepsupDecoder(len(labels["labels"]))
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(2, 3, calibrate_size, calibrate_size, generator=g)
    _randomise(encoder, lambda: (images,), seed + 2)
    with torch.no_grad():
        features = encoder(images)
    _randomise(decoder, lambda: (features,), seed + 3)
    with torch.no_grad():  # the deep-sup branch is unused at inference; give it plain random stats anyway
        decoder.cbr_deepsup[0](features[2])
    paths = {
        "dir": tmpdir,
        "encoder": os.path.join(tmpdir, f"encoder_epoch_{epoch}.pth"),
        "decoder": os.path.join(tmpdir, f"decoder_epoch_{epoch}.pth"),
        "labels": os.path.join(tmpdir, "labels.json"),
    }
    _save(encoder, paths["encoder"])
    _save(decoder, paths["decoder"])
    _write_json(labels, paths["labels"])
    return paths


def _load(module, path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    module.load_state_dict(state, strict=True)
    return module.eval()


def load_upp_reference(paths):
    """``(encoder, decoder)`` torch modules (eval mode) loaded strictly from :func:`make_upp_checkpoint`'s files."""
    with open(paths["labels"]) as f:
        labels = json.load(f)
    decoder = UPerNetDecoder(len(labels["object"]), len(labels["material"]), len(labels["scene"]),
                             sum(upp_part_sizes(labels)))
    return _load(resnet50_encoder(), paths["encoder"]), _load(decoder, paths["decoder"])


def load_color_reference(paths):
    """``(encoder, decoder)`` torch modules (eval mode) loaded strictly from :func:`make_color_checkpoint`'s files."""
    with open(paths["labels"]) as f:
        labels = json.load(f)
    return (_load(resnet18_dilated_encoder(), paths["encoder"]),
            _load(PPMDeepsupDecoder(len(labels["labels"])), paths["decoder"]))


# ----------------------------------------------------------------------------- reference pipelines

def upp_preprocess_reference(images_zc, size=256):
    """The original's UPP input transform on NCHW [-1, 1] RGB: 0..255, BGR, minus means, adaptive pool."""
    x = (images_zc + 1) / 2 * 255
    x = torch.flip(x, (1,)) - torch.tensor(UPP_BGR_MEAN, dtype=x.dtype)[None, :, None, None]
    if tuple(x.shape[2:]) != (size, size):
        x = nn.AdaptiveAvgPool2d((size, size))(x)
    return x


def color_preprocess_reference(images_zc, imageformat, size=256):
    """The original colour input transform on NCHW [-1, 1] RGB."""
    x = images_zc
    if imageformat["byteorder"] == "BGR":
        x = torch.flip(x, (1,))
    mean = torch.tensor(imageformat["mean"], dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(imageformat["stdev"], dtype=x.dtype)[None, :, None, None]
    x = ((x + 1) / 2 - mean) / std
    if tuple(x.shape[2:]) != (size, size):
        x = nn.AdaptiveAvgPool2d((size, size))(x)
    return x


@torch.no_grad()
def upp_reference_forward(encoder, decoder, x, seg_size):
    """Encoder features (list of 4) and decoder logits dict for preprocessed NCHW ``x``."""
    features = encoder(x)
    return features, decoder(features, seg_size=seg_size)


@torch.no_grad()
def color_reference_forward(encoder, decoder, x, seg_size):
    """Encoder features (list of 4) and logits ``[N, n_labels, h, w]`` for preprocessed NCHW ``x``."""
    features = encoder(x)
    return features, decoder(features, seg_size=seg_size)


def to_nhwc(t):
    return np.ascontiguousarray(t.detach().numpy().transpose(0, 2, 3, 1))
