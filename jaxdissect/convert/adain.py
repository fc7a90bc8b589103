r"""Convert the published AdaIN weights (``vgg_normalised.pth``, ``decoder.pth``) to a jaxdissect model.

    python -m converters.adain --vgg=vgg_normalised.pth --decoder=decoder.pth --output=models/adain

Key names are those of the AdaIN PyTorch port the original uses
(``stylization/net.py``): ``vgg`` is an ``nn.Sequential`` of the whole
normalised VGG-19 (convs at indices 0, 2, 5, 9, ..., 51), of which the
stylizer keeps the first 31 modules (to ``relu4_1``); ``decoder`` is an
``nn.Sequential`` with convs at indices 1, 5, 8, 11, 14, 18, 21, 25, 28. Every
key and shape of both files is checked (the unused VGG-19 layers above
``relu4_1`` too, so a wrong file is recognised); the encoder keeps the 10
convs it needs. Conv ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``.
"""

from __future__ import annotations

import os

import numpy as np

from jaxdissect.convert import common
from jaxdissect.checkpoint import save_model
from jaxdissect.models.adain import DECODER_CONVS, ENCODER_CONVS, AdaIN

# Sequential index of every conv of the normalised VGG-19, with (in, out, k).
VGG19_CONVS = (
    (0, 3, 3, 1), (2, 3, 64, 3), (5, 64, 64, 3), (9, 64, 128, 3), (12, 128, 128, 3),
    (16, 128, 256, 3), (19, 256, 256, 3), (22, 256, 256, 3), (25, 256, 256, 3),
    (29, 256, 512, 3), (32, 512, 512, 3), (35, 512, 512, 3), (38, 512, 512, 3),
    (42, 512, 512, 3), (45, 512, 512, 3), (48, 512, 512, 3), (51, 512, 512, 3),
)  # fmt: skip
ENCODER_NAMES = ("conv0",) + tuple(n for n, _, _ in ENCODER_CONVS)  # the first 10 convs, indices 0 .. 29
DECODER_INDICES = (1, 5, 8, 11, 14, 18, 21, 25, 28)


def expected_vgg() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``vgg_normalised.pth``."""
    out = {}
    for i, cin, cout, k in VGG19_CONVS:
        out[f"{i}.weight"], out[f"{i}.bias"] = (cout, cin, k, k), (cout,)
    return out


def expected_decoder() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``decoder.pth``."""
    out = {}
    for i, (_, cin, cout) in zip(DECODER_INDICES, DECODER_CONVS):
        out[f"{i}.weight"], out[f"{i}.bias"] = (cout, cin, 3, 3), (cout,)
    return out


def convert_state_dicts(vgg: dict, decoder: dict) -> tuple[AdaIN, dict]:
    """Checked state_dicts (NumPy arrays) -> ``(AdaIN module, Flax variables)``."""
    if set(vgg) == set(expected_decoder()) and set(decoder) == set(expected_vgg()):
        raise common.ConversionError("the two files are swapped: --vgg is decoder.pth and --decoder is "
                                     "vgg_normalised.pth")
    common.check_state_dict(vgg, expected_vgg(), what="the normalised VGG-19 (AdaIN vgg_normalised.pth)")
    common.check_state_dict(decoder, expected_decoder(), what="the AdaIN decoder (decoder.pth)")

    def conv(state, i):
        return {"kernel": common.conv_kernel(state[f"{i}.weight"]), "bias": np.asarray(state[f"{i}.bias"], np.float32)}

    encoder = {name: conv(vgg, i) for name, (i, *_) in zip(ENCODER_NAMES, VGG19_CONVS)}
    dec = {name: conv(decoder, i) for (name, _, _), i in zip(DECODER_CONVS, DECODER_INDICES)}
    return AdaIN(), {"params": {"encoder": encoder, "decoder": dec}}


def convert(vgg_path: str, decoder_path: str, output_dir: str) -> dict:
    """Convert both files into the model directory ``output_dir``; returns the metadata written."""
    common.require_empty_output(output_dir)
    module, variables = convert_state_dicts(common.load_state_dict(vgg_path), common.load_state_dict(decoder_path))
    metadata = {
        "model": "adain",
        "source_files": [os.path.basename(vgg_path), os.path.basename(decoder_path)],
        "source_sha256": [common.sha256(vgg_path), common.sha256(decoder_path)],
        "input": {"layout": "NHWC", "range": [0, 1], "note": "content and style RGB in [0, 1]"},
    }
    save_model(output_dir, module, variables, metadata)
    return metadata
