r"""Convert a ganseeing ProGAN inversion encoder (``HybridLayerNormEncoder``) to a jaxdissect model.

    python -m converters.proggan_encoder --input=church_invert_hybrid_cse-43e52428.pth --output=DIR

Published files: ``church_invert_hybrid_cse-43e52428.pth`` and
``bedroom_invert_hybrid_cse-b943528e.pth``. Accepts a plain state_dict or one
wrapped as ``{'state_dict': ...}``, with or without the ``model.`` prefix that
training under ``InstrumentedModel`` added (stripped as ganseeing's
``load_proggan_inversion`` does). Keys: ``resnet.conv1``, ``resnet.bn1``,
``resnet.layer{1..4}.{0,1}.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``,
``resnet.layer5.conv5``, ``inv{4,3,2}.{conv1,bn1,conv2,bn2[,conv3]}``,
``inv1.{conv1,bn1,conv2}``; every key and shape is checked (BatchNorm's
``num_batches_tracked`` is ignored). ``--halfsize`` marks an encoder trained
with the max-pool stride 1 (not visible in the weights).
"""

from __future__ import annotations

import os

import numpy as np

from jaxdissect.convert import common
from jaxdissect.checkpoint import save_model
from jaxdissect.models.proggan_encoder import HybridLayerNormEncoder

WHAT = "ganseeing's HybridLayerNormEncoder"


def strip_prefix(state) -> dict:
    """Drop the ``model.`` prefix of every key (ganseeing's ``k.replace('model.', '')``)."""
    return {k.replace("model.", ""): v for k, v in state.items()}


def _bn_shapes(prefix, c):
    return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}


def expected_shapes(width: int = 512, base: int = 64) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the encoder with these widths."""
    s = {"resnet.conv1.weight": (base, 3, 7, 7), **_bn_shapes("resnet.bn1", base)}
    cin = base
    for i in range(4):
        c = base * 2 ** i
        for b in range(2):
            p = f"resnet.layer{i + 1}.{b}"
            s[f"{p}.conv1.weight"] = (c, cin if b == 0 else c, 3, 3)
            s.update(_bn_shapes(f"{p}.bn1", c))
            s[f"{p}.conv2.weight"] = (c, c, 3, 3)
            s.update(_bn_shapes(f"{p}.bn2", c))
            if b == 0 and i > 0:
                s[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                s.update(_bn_shapes(f"{p}.downsample.1", c))
        cin = c
    s["resnet.layer5.conv5.weight"] = (width, cin, 1, 1)
    s["resnet.layer5.conv5.bias"] = (width,)
    for inv in ("inv4", "inv3", "inv2"):
        for conv in ("conv1", "conv2"):
            s[f"{inv}.{conv}.weight"] = (width, width, 3, 3)
            s[f"{inv}.{conv}.bias"] = (width,)
        s.update(_bn_shapes(f"{inv}.bn1", width))
        s.update(_bn_shapes(f"{inv}.bn2", width))
        if inv != "inv2":
            s[f"{inv}.conv3.weight"] = (width, width, 1, 1)
            s[f"{inv}.conv3.bias"] = (width,)
    s.update({"inv1.conv1.weight": (width, width, 4, 4), "inv1.conv1.bias": (width,),
              "inv1.conv2.weight": (width, width, 1, 1), "inv1.conv2.bias": (width,)})
    s.update(_bn_shapes("inv1.bn1", width))
    return s


def _infer(state) -> tuple[int, int]:
    w, z = state.get("resnet.conv1.weight"), state.get("inv1.conv2.weight")
    if w is None or z is None or w.ndim != 4 or z.ndim != 4:
        hint = ""
        if "layer1.conv.weight" in state or "features.0.conv.weight" in state:
            hint = " It is a Progressive GAN generator: use python -m converters.proggan."
        raise common.ConversionError(f"this checkpoint is not {WHAT}: it has no 4-D 'resnet.conv1.weight' and "
                                     f"'inv1.conv2.weight' (after stripping 'model.').{hint}")
    return int(z.shape[0]), int(w.shape[0])


def convert_state_dict(state, halfsize: bool = False) -> tuple[HybridLayerNormEncoder, dict]:
    """Checked PyTorch state_dict (NumPy arrays) -> ``(module, Flax variables)``."""
    state = strip_prefix(state)
    width, base = _infer(state)
    common.check_state_dict(state, expected_shapes(width, base), what=f"{WHAT} (width {width}, base {base})",
                            ignore=("num_batches_tracked",))
    params, stats = {}, {}

    def conv(dst: dict, name: str, key: str, bias: bool):
        dst[name] = {"kernel": common.conv_kernel(state[f"{key}.weight"])}
        if bias:
            dst[name]["bias"] = np.asarray(state[f"{key}.bias"], np.float32)

    def bn(pdst: dict, sdst: dict, name: str, key: str):
        pdst[name], sdst[name] = common.batchnorm(state, key)

    rp, rs = {}, {}
    conv(rp, "conv1", "resnet.conv1", False)
    bn(rp, rs, "bn1", "resnet.bn1")
    for i in range(4):
        for b in range(2):
            key, name = f"resnet.layer{i + 1}.{b}", f"layer{i + 1}_{b}"
            bp, bs = {}, {}
            conv(bp, "conv1", f"{key}.conv1", False)
            bn(bp, bs, "bn1", f"{key}.bn1")
            conv(bp, "conv2", f"{key}.conv2", False)
            bn(bp, bs, "bn2", f"{key}.bn2")
            if f"{key}.downsample.0.weight" in state:
                conv(bp, "downsample_conv", f"{key}.downsample.0", False)
                bn(bp, bs, "downsample_bn", f"{key}.downsample.1")
            rp[name], rs[name] = bp, bs
    conv(rp, "layer5_conv5", "resnet.layer5.conv5", True)
    params["resnet"], stats["resnet"] = rp, rs
    for inv in ("inv4", "inv3", "inv2", "inv1"):
        ip, is_ = {}, {}
        conv(ip, "conv1", f"{inv}.conv1", True)
        bn(ip, is_, "bn1", f"{inv}.bn1")
        conv(ip, "conv2", f"{inv}.conv2", True)
        if inv != "inv1":
            bn(ip, is_, "bn2", f"{inv}.bn2")
        if inv in ("inv4", "inv3"):
            conv(ip, "conv3", f"{inv}.conv3", True)
        params[inv], stats[inv] = ip, is_
    return HybridLayerNormEncoder(width=width, base=base, halfsize=halfsize), {"params": params,
                                                                               "batch_stats": stats}


def convert(input_path: str, output_dir: str, halfsize: bool = False) -> dict:
    """Convert ``input_path`` (.pth) into the model directory ``output_dir``; returns the metadata written."""
    common.require_empty_output(output_dir)
    state = common.load_state_dict(input_path)
    module, variables = convert_state_dict(state, halfsize)
    size = 128 if halfsize else 256
    metadata = {
        "model": "proggan_encoder",
        "source_file": os.path.basename(input_path),
        "source_sha256": common.sha256(input_path),
        "width": module.width,
        "input": {"name": "image", "normalization": "zc", "layout": "NHWC", "shape": [None, size, size, 3]},
        "output": {"name": "z", "shape": [None, module.width]},
        "preprocessing": {"normalization": "zc", "resize": size, "crop": size},
        "layers": list(module.stages),
        "layer_note": "resnet: layer-4 estimate; inv4..inv2: layer 3..1 estimates; inv1: z",
    }
    save_model(output_dir, module, variables, metadata)
    return metadata
