"""The ProGAN inversion encoder against a PyTorch HybridLayerNormEncoder written from the spec (published key names)."""

from collections import OrderedDict

import jax
import numpy as np
import pytest
import torch
from torch import nn

from jaxdissect.convert import common, proggan_encoder as conv
from jaxdissect import capture, load_model


class PixelNorm(nn.Module):
    def forward(self, x):
        return x / torch.sqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class Block(nn.Module):
    def __init__(self, cin, c, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or cin != c:
            self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def resnet(width, base):
    seq = [("conv1", nn.Conv2d(3, base, 7, 2, 3, bias=False)), ("bn1", nn.BatchNorm2d(base)),
           ("relu", nn.ReLU()), ("maxpool", nn.MaxPool2d(3, 2, 1))]
    cin = base
    for i in range(4):
        c = base * 2 ** i
        seq.append((f"layer{i + 1}", nn.Sequential(Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1))))
        cin = c
    seq.append(("layer5", nn.Sequential(OrderedDict([("conv5", nn.Conv2d(cin, width, 1)),
                                                     ("relu5", nn.LeakyReLU(0.2))]))))
    return nn.Sequential(OrderedDict(seq))


def layer_norm_encoder(w, stride=1, skip_conv3=False):
    seq = [("pnorm", PixelNorm()), ("conv1", nn.Conv2d(w, w, 3, padding=1)), ("bn1", nn.BatchNorm2d(w)),
           ("relu1", nn.LeakyReLU(0.2)), ("conv2", nn.Conv2d(w, w, 3, padding=1)), ("bn2", nn.BatchNorm2d(w)),
           ("relu2", nn.LeakyReLU(0.2))]
    if not skip_conv3:
        seq.append(("conv3", nn.Conv2d(w, w, 1, stride=stride)))
    return nn.Sequential(OrderedDict(seq))


def hybrid_encoder(width=512, base=64):
    inv1 = nn.Sequential(OrderedDict([("pnorm", PixelNorm()), ("conv1", nn.Conv2d(width, width, 4)),
                                      ("bn1", nn.BatchNorm2d(width)), ("relu1", nn.LeakyReLU(0.2)),
                                      ("conv2", nn.Conv2d(width, width, 1)), ("pnormout", PixelNorm())]))
    return nn.Sequential(OrderedDict([("resnet", resnet(width, base)), ("inv4", layer_norm_encoder(width)),
                                      ("inv3", layer_norm_encoder(width, stride=2)),
                                      ("inv2", layer_norm_encoder(width, skip_conv3=True)), ("inv1", inv1)]))


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in) * (1.0 if p.ndim > 1 else 0.3))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def test_published_layout_has_the_expected_keys():
    state = hybrid_encoder().state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert shapes == conv.expected_shapes(512, 64)


def test_converted_encoder_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = randomize(hybrid_encoder(width=32, base=8))
    wrapped = {"state_dict": {"model." + k: v for k, v in model.state_dict().items()}}
    path = str(tmp_path / "enc.pth")
    torch.save(wrapped, path)
    conv.convert(path, str(tmp_path / "out"))
    module, variables = load_model(str(tmp_path / "out"))
    x = np.random.RandomState(0).uniform(-1, 1, (2, 256, 256, 3)).astype(np.float32)
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        r4 = model.resnet(t)
        z = model(t).flatten(1)
    out, acts = jax.jit(lambda v, x: capture(module, v, x, ["resnet", "inv4", "inv3", "inv2", "inv1"]))(variables, x)
    ref_r4 = r4.permute(0, 2, 3, 1).numpy()
    for got, ref in ((np.asarray(acts["resnet"]), ref_r4), (np.asarray(out), z.numpy())):
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, rel
    assert acts["inv3"].shape == (2, 4, 4, 32) and out.shape == (2, 32)


def test_bad_checkpoints(tmp_path):
    state = {k: v.numpy() for k, v in hybrid_encoder(width=16, base=8).state_dict().items()}
    del state["inv3.conv3.bias"]
    state["inv4.conv1.weight"] = state["inv4.conv1.weight"][:, :, :1]
    with pytest.raises(common.ConversionError, match=r"(?s)missing \(1\): inv3.conv3.bias.*wrong shape.*inv4.conv1"):
        conv.convert_state_dict(state)
    with pytest.raises(common.ConversionError, match="Progressive GAN generator: use python -m converters.proggan"):
        conv.convert_state_dict({"layer1.conv.weight": np.zeros((4, 4, 4, 4))})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(common.ConversionError):
        conv.convert("missing.pth", str(tmp_path / "full"))
