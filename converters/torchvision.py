r"""Convert a torchvision-layout classifier state_dict (your own model, or NetDissect-Lite's zoo) to jaxdissect.

    python -m converters.torchvision --arch=resnet18 --num_classes=365 --input=resnet18_places365.pth --output=DIR

The conversion itself is :mod:`jaxdissect.convert.torchvision` (usable from Python).
"""

from absl import flags

from jaxdissect.convert.torchvision import ARCHS, convert
from launch import common


def main(argv):
    del argv
    f = flags.FLAGS
    m = convert(f.input, f.output, f.arch, f.num_classes, f.classes)
    print(f"wrote {f.output}: torchvision {m['arch']}, {m['num_classes']} classes, "
          f"sha256 {m['source_sha256'][:12]}")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script)."""
    flags.DEFINE_enum("arch", None, list(ARCHS), "torchvision architecture of the state_dict.")
    flags.DEFINE_integer("num_classes", None, "Number of outputs of the classifier (1000 ImageNet, 365 Places365).")
    flags.DEFINE_string("input", None, "PyTorch state_dict (.pth / .pth.tar), plain or DataParallel.")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.DEFINE_string("classes", None, "Optional text file of class names, one per line (first word used).")
    flags.mark_flags_as_required(["arch", "num_classes", "input", "output"])


if __name__ == "__main__":
    define_flags()
    common.run(main)
