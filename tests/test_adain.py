"""AdaIN against a PyTorch reference written from the spec with the published key names (random weights)."""

import os

import numpy as np
import pytest
import torch
from torch import nn

from jaxdissect.convert import adain as conv
from jaxdissect.convert.common import ConversionError
from jaxdissect.checkpoint import load_model
from jaxdissect.models import adain as ad


def torch_vgg():
    """The whole normalised VGG-19 nn.Sequential (53 modules) as the AdaIN port defines it."""
    layers, cin = [nn.Conv2d(3, 3, 1)], 3
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]
    for v in plan:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2, 0, ceil_mode=True))
        else:
            layers += [nn.ReflectionPad2d(1), nn.Conv2d(cin, v, 3), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers)


def torch_decoder():
    def block(cin, cout, relu=True):
        return [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3)] + ([nn.ReLU()] if relu else [])

    up = [nn.Upsample(scale_factor=2, mode="nearest")]
    return nn.Sequential(*(block(512, 256) + up + block(256, 256) + block(256, 256) + block(256, 256)
                           + block(256, 128) + up + block(128, 128) + block(128, 64) + up + block(64, 64)
                           + block(64, 3, relu=False)))


def calc_mean_std(feat, eps=1e-5):
    n, c = feat.shape[:2]
    var = feat.reshape(n, c, -1).var(dim=2) + eps
    return feat.reshape(n, c, -1).mean(dim=2).reshape(n, c, 1, 1), var.sqrt().reshape(n, c, 1, 1)


def torch_adain(content, style):
    sm, ss = calc_mean_std(style)
    cm, cs = calc_mean_std(content)
    return (content - cm) / cs * ss + sm


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    vgg, dec = torch_vgg().eval(), torch_decoder().eval()
    with torch.no_grad():  # keep activations O(1) through 10 random convs
        for m in list(vgg) + list(dec):
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(1.6)
    d = tmp_path_factory.mktemp("adain")
    torch.save(vgg.state_dict(), d / "vgg_normalised.pth")
    torch.save(dec.state_dict(), d / "decoder.pth")
    conv.convert(str(d / "vgg_normalised.pth"), str(d / "decoder.pth"), str(d / "model"))
    module, variables = load_model(str(d / "model"))
    return vgg, dec, module, variables, d


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def test_keys_match_the_published_layout(converted):
    vgg, dec, *_ = converted
    assert set(vgg.state_dict()) == set(conv.expected_vgg())
    assert {k: tuple(v.shape) for k, v in dec.state_dict().items()} == conv.expected_decoder()


@pytest.mark.slow
def test_encoder_decoder_and_stylization_equal_pytorch(converted):
    vgg, dec, module, variables, _ = converted
    rng = np.random.default_rng(0)
    content = rng.uniform(0, 1, (2, 3, 21, 26)).astype(np.float32)  # odd sizes: ceil-mode pools
    style = rng.uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    enc = nn.Sequential(*list(vgg.children())[:31])
    with torch.no_grad():
        cf, sf = enc(torch.from_numpy(content)), enc(torch.from_numpy(style))
        t = torch_adain(cf, sf)
        ref_out = dec(t)
        ref_half = dec(t * 0.5 + cf * 0.5)
    c, s = content.transpose(0, 2, 3, 1), style.transpose(0, 2, 3, 1)
    feats = module.apply(variables, c, method=module.encode)
    assert feats.shape == nhwc(cf).shape == (2, 3, 4, 512)
    assert rel_err(feats, nhwc(cf)) < 1e-4
    assert rel_err(ad.adain(feats, module.apply(variables, s, method=module.encode)), nhwc(t)) < 1e-4
    decoded = module.apply(variables, nhwc(t), method=lambda m, f: m.decoder(f))
    assert rel_err(decoded, nhwc(ref_out)) < 1e-4
    out = module.apply(variables, c, s)
    assert out.shape == (2, 24, 32, 3) and rel_err(out, nhwc(ref_out)) < 1e-4
    assert rel_err(module.apply(variables, c, s, 0.5), nhwc(ref_half)) < 1e-4
    # save_image's rounding
    x = np.array([[-0.1, 0.0, 0.5, 0.998, 1.2]], np.float32)
    ref = torch.from_numpy(x).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(ad.to_uint8(x), ref)


def test_converter_errors(converted, tmp_path):
    vgg, dec, *_ , d = converted
    state = {k: v.numpy() for k, v in dec.state_dict().items()}
    vstate = {k: v.numpy() for k, v in vgg.state_dict().items()}
    with pytest.raises(ConversionError, match="swapped"):
        conv.convert_state_dicts(state, vstate)
    bad = dict(vstate)
    del bad["51.bias"]
    bad["29.weight"] = np.zeros((512, 256, 1, 1), np.float32)
    bad["53.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"(?s)missing \(1\): 51.bias.*unexpected \(1\): 53.weight.*"
                                              r"29.weight: file has \(512, 256, 1, 1\)"):
        conv.convert_state_dicts(bad, state)
    with pytest.raises(ConversionError, match="not empty|exists"):
        conv.convert(str(d / "vgg_normalised.pth"), str(d / "decoder.pth"), str(d / "model"))
    with pytest.raises(ConversionError, match="does not exist"):
        conv.convert(str(tmp_path / "nope.pth"), str(d / "decoder.pth"), str(tmp_path / "m"))


@pytest.mark.slow
def test_stylize_folder_pairs_by_seed_and_resumes(converted, tmp_path):
    from PIL import Image

    from jaxdissect.pipelines import stylize

    *_, module, variables, _ = converted
    rng = np.random.default_rng(5)
    for i in range(3):
        os.makedirs(tmp_path / "content" / f"c{i % 2}", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(
            tmp_path / "content" / f"c{i % 2}" / f"img{i}.png")
    os.makedirs(tmp_path / "paintings")
    for j in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "paintings" / f"p{j}.png")
    out = str(tmp_path / "out")
    counts = stylize.stylize_folder(module, variables, str(tmp_path / "content"), str(tmp_path / "paintings"), out,
                                    seed=3, style_size=16)
    assert counts == {"written": 3, "kept": 0, "total": 3}
    pick = np.random.default_rng(3).integers(0, 4, size=3)
    contents = [("c0", "img0"), ("c0", "img2"), ("c1", "img1")]  # sorted walk: folders, then names
    for (folder, stem), j in zip(contents, pick):
        path = tmp_path / "out" / folder / f"{stem}-stylized-p{j}.png"
        got = np.asarray(Image.open(path))
        c = np.asarray(Image.open(tmp_path / "content" / folder / f"{stem}.png"), np.float32)[None] / 255
        s = np.asarray(Image.open(tmp_path / "paintings" / f"p{j}.png").resize((24, 16), Image.BILINEAR),
                       np.float32)[None] / 255
        ref = ad.to_uint8(module.apply(variables, c, s)[0])
        assert got.shape == (16, 24, 3) and np.abs(got.astype(int) - ref).max() <= 1
    again = stylize.stylize_folder(module, variables, str(tmp_path / "content"), str(tmp_path / "paintings"), out,
                                   seed=3, style_size=16)
    assert again == {"written": 0, "kept": 3, "total": 3}
