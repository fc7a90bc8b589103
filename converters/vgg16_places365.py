r"""Convert the original VGG16-Places365 weights (``vgg16_places365-0bafbc55.pth``) to a jaxdissect model.

    python -m converters.vgg16_places365 --input=vgg16_places365-0bafbc55.pth --output=DIR \
        [--classes=categories_places365.txt]

The conversion itself is :mod:`jaxdissect.convert.vgg16_places365` (usable from Python).
"""

from absl import flags

from jaxdissect.convert.vgg16_places365 import convert
from launch import common


def main(argv):
    del argv
    f = flags.FLAGS
    m = convert(f.input, f.output, f.classes)
    print(f"wrote {f.output}: VGG16, {m['num_classes']} classes, sha256 {m['source_sha256'][:12]}")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script, so importing this module is side-effect free)."""
    flags.DEFINE_string("input", None, "PyTorch state_dict, e.g. vgg16_places365-0bafbc55.pth.")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.DEFINE_string("classes", None, "Optional class-name file, e.g. categories_places365.txt (first word a line).")
    flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
    define_flags()
    common.run(main)
