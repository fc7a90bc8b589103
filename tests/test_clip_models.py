"""CLIP (ViT and ResNet towers, text tower) and torchvision's ViT against PyTorch references, random weights.

The references (tests/torch_clip_reference.py) are written from the
specifications with the published key names; their state dicts go through the
library converters, so every key, shape and re-layout is checked on the way.
Small models (width 64, 2 layers) where equality is the point; the full-size
ViT-B/16 is marked slow.
"""


import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_clip_reference as ref  # noqa: E402

import jaxdissect  # noqa: E402
from jaxdissect import layers  # noqa: E402
from jaxdissect.convert import clip as convert_clip  # noqa: E402
from jaxdissect.convert import vit as convert_vit  # noqa: E402
from jaxdissect.convert.common import ConversionError  # noqa: E402
from jaxdissect.models.transformer import GridError, tokens_to_grid  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """The references run without autograd, in this module only (other modules of the worker need it)."""
    with torch.no_grad():
        yield


def state_of(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def close(ours, theirs, rel=1e-5):
    theirs = np.asarray(theirs)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=rel, atol=rel * np.max(np.abs(theirs)))


def images(n=2, size=32, seed=0):
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return x, x.numpy().transpose(0, 2, 3, 1)


def tokens(n=3, context=7, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    t = np.zeros((n, context), np.int64)
    for i in range(n):
        length = rng.integers(1, context - 1)
        t[i, 0] = vocab - 2  # start
        t[i, 1:length] = rng.integers(1, vocab - 2, length - 1)
        t[i, length] = vocab - 1  # end: the highest id
    return t


@pytest.fixture(scope="module")
def clip_vit():
    torch.manual_seed(0)
    model = ref.randomize(ref.CLIP(32, 32, 2, 64, 8, 7, 50, 64, 2, 2, vision_heads=2), seed=1)
    module, variables, metadata = convert_clip.convert_state_dict(state_of(model), head_width=32)
    return model, module, variables, metadata


@pytest.fixture(scope="module")
def clip_resnet():
    torch.manual_seed(0)
    model = ref.randomize(ref.CLIP(32, 64, (2, 1, 1, 1), 16, 0, 7, 50, 64, 2, 1, vision_heads=16), seed=2)
    module, variables, metadata = convert_clip.convert_state_dict(state_of(model), head_width=32)
    return model, module, variables, metadata


@pytest.fixture(scope="module")
def tv_vit():
    torch.manual_seed(0)
    model = ref.randomize(ref.ViT(32, 8, 2, 2, 64, 128, 10), seed=3)
    module, variables, metadata = convert_vit.convert_state_dict(state_of(model), heads=2)
    return model, module, variables, metadata


def test_clip_vit_towers_equal_reference(clip_vit):
    model, module, variables, metadata = clip_vit
    assert (module.vision_heads, module.transformer_heads, module.vision_layers) == (2, 2, 2)
    x, x_nhwc = images()
    close(module.apply(variables, x_nhwc), model.encode_image(x))
    t = tokens()
    close(module.apply(variables, t, method="encode_text"), model.encode_text(torch.from_numpy(t)))
    per_image, per_text = module.apply(variables, x_nhwc, t, method="logits")
    img = model.encode_image(x)
    txt = model.encode_text(torch.from_numpy(t))
    expect = model.logit_scale.exp() * (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T
    close(per_image, expect)
    close(per_text, expect.T)
    assert metadata["architecture"] == "ViT-64/8"
    assert metadata["layers"][-1] == "visual.transformer.resblocks.1.residual"


@pytest.mark.slow
def test_clip_resnet_tower_equals_reference(clip_resnet):
    model, module, variables, metadata = clip_resnet
    assert module.is_resnet and module.vision_layers == (2, 1, 1, 1) and metadata["architecture"] == "RN17"
    x, x_nhwc = images(size=64)
    close(module.apply(variables, x_nhwc), model.encode_image(x))
    # The stage outputs are the dissected layers: layer4 equals the reference's (NCHW -> NHWC).
    feats = {}
    handle = model.visual.layer4.register_forward_hook(lambda m, i, o: feats.update(layer4=o))
    model.encode_image(x)
    handle.remove()
    _, acts = layers.capture(module, variables, x_nhwc, layers=["visual.layer4"])
    close(acts["visual.layer4"], feats["layer4"].numpy().transpose(0, 2, 3, 1))


def test_torchvision_vit_equals_reference(tv_vit):
    model, module, variables, metadata = tv_vit
    x, x_nhwc = images()
    close(module.apply(variables, x_nhwc), model(x))
    assert metadata["preprocessing"]["crop"] == 32 and metadata["num_classes"] == 10


def test_vit_grid_views_are_the_patch_tokens(tv_vit):
    """mlp.neurons is the post-GELU output on the 4x4 patch grid, CLS dropped; _cls is the CLS token."""
    model, module, variables, _ = tv_vit
    x, x_nhwc = images()
    seen = {}
    block = model.encoder.layers.encoder_layer_1
    handles = [block.mlp[1].register_forward_hook(lambda m, i, o: seen.update(gelu=o)),
               block.register_forward_hook(lambda m, i, o: seen.update(out=o))]
    model(x)
    for h in handles:
        h.remove()
    name = "encoder.layers.encoder_layer_1"
    _, acts = layers.capture(module, variables, x_nhwc,
                             layers=[f"{name}.mlp.neurons", f"{name}.mlp.neurons_cls", f"{name}.residual",
                                     f"{name}.residual_cls", "conv_proj"])
    gelu, out = seen["gelu"].numpy(), seen["out"].numpy()
    assert acts[f"{name}.mlp.neurons"].shape == (2, 4, 4, 128) and acts["conv_proj"].shape == (2, 4, 4, 64)
    close(acts[f"{name}.mlp.neurons"], gelu[:, 1:].reshape(2, 4, 4, 128))
    close(acts[f"{name}.mlp.neurons_cls"], gelu[:, 0])
    close(acts[f"{name}.residual"], out[:, 1:].reshape(2, 4, 4, 64))
    close(acts[f"{name}.residual_cls"], out[:, 0])


def test_ablation_on_the_grid_flows_on(tv_vit):
    """Zeroing MLP neurons on the patch grid equals zeroing them in the patch tokens of the reference."""
    model, module, variables, _ = tv_vit
    x, x_nhwc = images()
    units = np.zeros(128, bool)
    units[[3, 17, 90]] = True

    def zero_patches(m, i, o):
        o = o.clone()
        o[:, 1:, torch.from_numpy(units)] = 0
        return o

    handle = model.encoder.layers.encoder_layer_0.mlp[1].register_forward_hook(zero_patches)
    expect = model(x)
    handle.remove()
    ours = layers.run(module, variables, x_nhwc,
                      edits={"encoder.layers.encoder_layer_0.mlp.neurons": layers.Ablate(units)})
    close(ours, expect)
    assert np.abs(np.asarray(ours) - model(x).numpy()).max() > 1e-4


def test_tokens_that_are_not_a_grid_raise_one_line():
    with pytest.raises(GridError) as e:
        tokens_to_grid(np.zeros((2, 7, 8)), layer="transformer.resblocks.0")
    assert "transformer.resblocks.0 has 7 tokens" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(GridError, match="not tokens"):
        tokens_to_grid(np.zeros((2, 4, 4, 8)), layer="visual.layer4")
    assert tokens_to_grid(np.arange(2 * 10 * 3).reshape(2, 10, 3)).shape == (2, 3, 3, 3)


def test_wrong_image_size_is_one_line(tv_vit, clip_resnet):
    _, module, variables, _ = tv_vit
    with pytest.raises(ValueError, match=r"expects NHWC RGB images \[N, 32, 32, 3\]"):
        module.apply(variables, np.zeros((1, 3, 32, 32), np.float32))
    _, module, variables, _ = clip_resnet
    with pytest.raises(ValueError, match="resize and centre-crop to 64"):
        module.apply(variables, np.zeros((1, 32, 32, 3), np.float32))


def test_converted_models_save_and_load(tmp_path, clip_resnet, tv_vit):
    from safetensors.numpy import save_file

    model, module, variables, _ = clip_resnet
    save_file(state_of(model), str(tmp_path / "RN.safetensors"))
    convert_clip.convert(str(tmp_path / "RN.safetensors"), str(tmp_path / "clip"), head_width=32)
    loaded, loaded_vars = jaxdissect.load_model(str(tmp_path / "clip"))
    _, x_nhwc = images(size=64)
    close(loaded.apply(loaded_vars, x_nhwc), module.apply(variables, x_nhwc), rel=1e-6)
    t = tokens()
    close(loaded.apply(loaded_vars, t, method="encode_text"), module.apply(variables, t, method="encode_text"),
          rel=1e-6)
    model, module, variables, _ = tv_vit
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    (tmp_path / "classes.txt").write_text("".join(f"c{i}\n" for i in range(10)))
    convert_vit.convert(str(tmp_path / "vit.pth"), str(tmp_path / "vit"), str(tmp_path / "classes.txt"), heads=2)
    loaded, loaded_vars = jaxdissect.load_model(str(tmp_path / "vit"))
    _, x_nhwc = images()
    close(loaded.apply(loaded_vars, x_nhwc), module.apply(variables, x_nhwc), rel=1e-6)


def test_safetensors_file_reads_without_torch(tmp_path, tv_vit):
    from safetensors.numpy import save_file

    from jaxdissect.convert.common import read_safetensors

    model = tv_vit[0]
    save_file(state_of(model), str(tmp_path / "vit.safetensors"))
    state = read_safetensors(str(tmp_path / "vit.safetensors"))
    module, variables, _ = convert_vit.convert_state_dict(state, heads=2)
    _, x_nhwc = images()
    close(module.apply(variables, x_nhwc), model(images()[0]))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ConversionError, match="cannot read"):
        read_safetensors(str(tmp_path / "bad.safetensors"))


def test_mismatched_state_lists_every_problem(clip_vit, tv_vit):
    state = state_of(clip_vit[0])
    del state["visual.ln_post.weight"]
    state["visual.extra"] = np.zeros(3)
    state["transformer.resblocks.0.mlp.c_fc.bias"] = np.zeros(5)
    state["input_resolution"] = np.array(32)  # the TorchScript archive's extras are ignored
    with pytest.raises(ConversionError) as e:
        convert_clip.convert_state_dict(state, head_width=32)
    msg = str(e.value)
    assert "missing (1): visual.ln_post.weight" in msg and "unexpected (1): visual.extra" in msg
    assert "transformer.resblocks.0.mlp.c_fc.bias: file has (5,), OpenAI CLIP (clip/model.py) needs (256,)" in msg
    with pytest.raises(ConversionError, match="no 'conv_proj.weight'"):
        convert_vit.convert_state_dict(state_of(clip_vit[0]))


@pytest.mark.slow
def test_full_size_vit_b_16():
    """torchvision's vit_b_16 at full size (86M parameters, 224 pixels) equals the reference."""
    torch.manual_seed(0)
    model = ref.randomize(ref.ViT(224, 16, 12, 12, 768, 3072, 1000), seed=4)
    state = state_of(model)
    module, variables, metadata = convert_vit.convert_state_dict(state)
    assert (module.num_heads, module.grid, metadata["layers"][0]) == (12, (14, 14),
                                                                       "encoder.layers.encoder_layer_0.residual")
    x, x_nhwc = images(n=1, size=224)
    close(module.apply(variables, x_nhwc), model(x))
    _, acts = layers.capture(module, variables, x_nhwc, layers=["encoder.layers.encoder_layer_11.mlp.neurons"])
    assert acts["encoder.layers.encoder_layer_11.mlp.neurons"].shape == (1, 14, 14, 3072)


def test_converters_read_safetensors_refuse_torchscript_and_carry_the_tokenizer(tmp_path, clip_vit, tv_vit):
    """convert.clip reads .safetensors without torch, refuses a TorchScript archive by name and keeps the
    BPE vocabulary in the model directory; convert.vit reads a .pth with class names."""
    import zipfile

    from safetensors.numpy import save_file

    from jaxdissect.convert import clip as convert_clip
    from jaxdissect.convert import vit as convert_vit
    from jaxdissect.tokenizer import ClipTokenizer, TokenizerError

    save_file(state_of(clip_vit[0]), str(tmp_path / "clip.safetensors"))
    vocab = tmp_path / "bpe.txt"
    vocab.write_text("#version: 0.2\nc a\nca t</w>\n", encoding="utf-8")
    metadata = convert_clip.convert(str(tmp_path / "clip.safetensors"), str(tmp_path / "clip"), str(vocab),
                                    head_width=32)
    assert metadata["source_file"] == "clip.safetensors" and len(metadata["source_sha256"]) == 64
    tokens = ClipTokenizer.from_model_dir(str(tmp_path / "clip"))("cat")[0]
    assert tokens[1] == ClipTokenizer.from_bpe_file(str(vocab))("cat")[0][1]
    with zipfile.ZipFile(tmp_path / "ViT-B-16.pt", "w") as z:
        z.writestr("ViT-B-16/code/__torch__/model.py", "")
        z.writestr("ViT-B-16/constants.pkl", b"")
    with pytest.raises(ConversionError, match="TorchScript archive .* open_clip_model.safetensors"):
        convert_clip.convert(str(tmp_path / "ViT-B-16.pt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    torch.save(tv_vit[0].state_dict(), tmp_path / "vit.pth")
    (tmp_path / "classes.txt").write_text("".join(f"class{i} extra\n" for i in range(10)))
    metadata = convert_vit.convert(str(tmp_path / "vit.pth"), str(tmp_path / "vit"), str(tmp_path / "classes.txt"),
                                   heads=2)
    assert metadata["classes"][3] == "class3"
    with pytest.raises(TokenizerError, match="holds no tokenizer vocabulary"):
        ClipTokenizer.from_model_dir(str(tmp_path / "vit"))


def test_clip_preprocess_resizes_crops_and_normalises():
    from jaxdissect.models.clip import CLIP_MEAN, CLIP_STD, clip_preprocess

    grey = np.full((2, 48, 96, 3), 0.5, np.float32)
    out = np.asarray(clip_preprocess(grey, 32))
    assert out.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(out[0, 5, 5], (0.5 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), rtol=1e-5)
    # Centre crop of the wide side: a bright band at the left and right edges is cut away.
    banded = grey.copy()
    banded[:, :, :8] = 1.0
    banded[:, :, -8:] = 1.0
    np.testing.assert_allclose(np.asarray(clip_preprocess(banded, 32)), out, atol=1e-5)
