r"""Convert a torchvision ``VisionTransformer`` (``vit_b_16-c867db91.pth``, or your own) to a jaxdissect model.

    python -m converters.vit --input=vit_b_16-c867db91.pth --output=models/vit_b_16 [--classes=FILE] [--heads=12]

``--input``: a state dict (``.pth`` read with ``weights_only=True``, or ``.safetensors``). Heads are
not stored in the file: width / 64 unless ``--heads`` says otherwise. The conversion itself is
:func:`jaxdissect.convert.vit.convert_state_dict`; the layers to dissect are
``encoder.layers.encoder_layer_N.{residual,attention,mlp.neurons}`` (the 14x14 patch grid).
"""

from __future__ import annotations

from absl import app, flags

from converters import common
from converters.clip import read_state
from jaxdissect.convert import vit as convert_vit
from jaxdissect.convert.state import ConversionError


def convert(input_path: str, output_dir: str, classes_path: str | None = None, heads: int | None = None) -> dict:
    """Convert ``input_path`` into the new model directory ``output_dir``; returns the metadata written."""
    common.require_empty_output(output_dir)
    try:
        state = read_state(input_path, "torchvision's vit_b_16-c867db91.pth state dict")
        module = convert_vit.architecture(state, heads)
        classes = common.read_classes(classes_path, module.num_classes) if classes_path else None
        return convert_vit.write(state, output_dir, input_path, common.sha256(input_path), heads, classes)
    except ConversionError as e:
        raise common.ConversionError(str(e)) from None


def main(argv):
    del argv
    f = flags.FLAGS
    common.run_cli(lambda: convert(f.input, f.output, f.classes, f.heads),
                   lambda m: f"wrote {f.output}: ViT, {m['num_classes']} classes, sha256 {m['source_sha256'][:12]}")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script)."""
    flags.DEFINE_string("input", None, "torchvision ViT state dict, e.g. vit_b_16-c867db91.pth (or .safetensors).")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.DEFINE_string("classes", None, "Optional class-name file (first word a line).")
    flags.DEFINE_integer("heads", None, "Attention heads (default: width / 64, torchvision's).")
    flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
