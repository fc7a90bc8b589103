r"""Convert a ganseeing ProGAN inversion encoder (``HybridLayerNormEncoder``) to a jaxdissect model.

    python -m converters.proggan_encoder --input=church_invert_hybrid_cse-43e52428.pth --output=DIR

The conversion itself is :mod:`jaxdissect.convert.proggan_encoder` (usable from Python).
"""

from absl import flags

from jaxdissect.convert.proggan_encoder import convert
from launch import common


def main(argv):
    del argv
    f = flags.FLAGS
    m = convert(f.input, f.output, f.halfsize)
    print(f"wrote {f.output}: ProGAN inversion encoder, z width {m['width']}, "
          f"sha256 {m['source_sha256'][:12]}")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script)."""
    flags.DEFINE_string("input", None, "Encoder state_dict, e.g. church_invert_hybrid_cse-43e52428.pth.")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.DEFINE_boolean("halfsize", False, "The encoder was built with halfsize=True (128-pixel inputs).")
    flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
    define_flags()
    common.run(main)
