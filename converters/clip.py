r"""Convert OpenAI CLIP weights (RN50, ViT-B/16 ...) to a jaxdissect model directory.

    python -m converters.clip --input=open_clip_model.safetensors --output=models/clip_vit_b_16

``--input``: a ``.safetensors`` file with OpenAI's key names (open_clip's release of the ``openai``
weights, read without PyTorch), or a PyTorch state dict (``.pt``/``.pth``/``.bin``, read with
``weights_only=True``). OpenAI's own ``ViT-B-16.pt`` / ``RN50.pt`` are TorchScript archives, not
state dicts, and are refused (reading them runs their code). The conversion itself is
:func:`jaxdissect.convert.clip.convert_state_dict`.
"""

from __future__ import annotations

import zipfile

from absl import app, flags

from converters import common
from jaxdissect.convert import clip as convert_clip
from jaxdissect.convert.state import ConversionError, read_safetensors


def read_state(path: str, release: str) -> dict:
    """A state dict from ``.safetensors`` (no PyTorch) or a PyTorch file; TorchScript archives refused."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist()):
                raise ConversionError(
                    f"{path} is a TorchScript archive (a whole compiled model, not a state dict); reading it "
                    f"would run its code. Use the safetensors release instead: {release}")
    return common.load_state_dict(path)


def convert(input_path: str, output_dir: str, head_width: int = convert_clip.HEAD_WIDTH) -> dict:
    """Convert ``input_path`` into the new model directory ``output_dir``; returns the metadata written."""
    common.require_empty_output(output_dir)
    try:
        state = read_state(input_path, "open_clip_model.safetensors of timm/vit_base_patch16_clip_224.openai "
                                       "(ViT-B/16) or timm/resnet50_clip.openai (RN50)")
        return convert_clip.write(state, output_dir, input_path, common.sha256(input_path), head_width)
    except ConversionError as e:
        raise common.ConversionError(str(e)) from None


def main(argv):
    del argv
    f = flags.FLAGS
    common.run_cli(lambda: convert(f.input, f.output),
                   lambda m: f"wrote {f.output}: CLIP {m['architecture']}, embedding {m['embed_dim']}, "
                             f"sha256 {m['source_sha256'][:12]}")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script)."""
    flags.DEFINE_string("input", None, "CLIP weights: open_clip_model.safetensors (OpenAI key names) or a state dict.")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
