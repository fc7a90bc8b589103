r"""Convert the PNAS code's AlexNet-Places365 weights (``alexnet_places365-92864cf6.pth``) to a jaxdissect model.

    python -m converters.alexnet_places365 --input=alexnet_places365-92864cf6.pth --output=DIR

The conversion itself is :mod:`jaxdissect.convert.alexnet_places365` (usable from Python).
"""

from absl import flags

from jaxdissect.convert.alexnet_places365 import convert
from launch import common


def main(argv):
    del argv
    f = flags.FLAGS
    m = convert(f.input, f.output, f.classes)
    print(f"wrote {f.output}: AlexNet-Places365, {m['num_classes']} classes, "
          f"sha256 {m['source_sha256'][:12]}")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script)."""
    flags.DEFINE_string("input", None, "PyTorch state_dict, e.g. alexnet_places365-92864cf6.pth.")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.DEFINE_string("classes", None, "Optional class-name file, e.g. categories_places365.txt (first word a line).")
    flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
    define_flags()
    common.run(main)
