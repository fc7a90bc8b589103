r"""Convert the published AdaIN weights (``vgg_normalised.pth``, ``decoder.pth``) to a jaxdissect model.

    python -m converters.adain --vgg=vgg_normalised.pth --decoder=decoder.pth --output=models/adain

The conversion itself is :mod:`jaxdissect.convert.adain` (usable from Python).
"""

from absl import flags

from jaxdissect.convert.adain import convert
from launch import common


def main(argv):
    del argv
    f = flags.FLAGS
    convert(f.vgg, f.decoder, f.output)
    print(f"wrote {f.output}: AdaIN encoder (relu4_1) and decoder")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script)."""
    flags.DEFINE_string("vgg", None, "AdaIN's vgg_normalised.pth.")
    flags.DEFINE_string("decoder", None, "AdaIN's decoder.pth.")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.mark_flags_as_required(["vgg", "decoder", "output"])


if __name__ == "__main__":
    define_flags()
    common.run(main)
