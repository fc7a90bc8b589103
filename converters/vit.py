r"""Convert a torchvision ``VisionTransformer`` (``vit_b_16-c867db91.pth``, or your own) to a jaxdissect model.

    python -m converters.vit --input=vit_b_16-c867db91.pth --output=models/vit_b_16 [--classes=FILE] [--heads=12]

Heads are not stored in the file: width / 64 unless ``--heads`` says otherwise. The conversion itself
is :mod:`jaxdissect.convert.vit`; the layers to dissect are
``encoder.layers.encoder_layer_N.{residual,attention,mlp.neurons}`` (the 14x14 patch grid).
"""

from absl import flags

from jaxdissect.convert.vit import convert
from launch import common


def main(argv):
    del argv
    f = flags.FLAGS
    m = convert(f.input, f.output, f.classes, f.heads)
    print(f"wrote {f.output}: ViT, {m['num_classes']} classes, sha256 {m['source_sha256'][:12]}")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script, so importing this module is side-effect free)."""
    flags.DEFINE_string("input", None, "torchvision ViT state dict, e.g. vit_b_16-c867db91.pth (or .safetensors).")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.DEFINE_string("classes", None, "Optional class-name file (first word a line).")
    flags.DEFINE_integer("heads", None, "Attention heads (default: width / 64, torchvision's).")
    flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
    define_flags()
    common.run(main)
