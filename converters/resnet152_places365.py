r"""Convert the PNAS code's ResNet152-Places365 weights (``resnet152_places365-f928166e5c.pth``) to a jaxdissect model.

    python -m converters.resnet152_places365 --input=resnet152_places365-f928166e5c.pth --output=DIR

The conversion itself is :mod:`jaxdissect.convert.resnet152_places365` (usable from Python).
"""

from absl import flags

from jaxdissect.convert.resnet152_places365 import convert
from launch import common


def main(argv):
    del argv
    f = flags.FLAGS
    m = convert(f.input, f.output, f.classes)
    print(f"wrote {f.output}: ResNet152-Places365, {m['num_classes']} classes, "
          f"sha256 {m['source_sha256'][:12]}")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script)."""
    flags.DEFINE_string("input", None, "PyTorch state_dict, e.g. resnet152_places365-f928166e5c.pth.")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.DEFINE_string("classes", None, "Optional class-name file, e.g. categories_places365.txt (first word a line).")
    flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
    define_flags()
    common.run(main)
