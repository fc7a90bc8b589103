r"""Convert an original Progressive GAN generator (e.g. ``proggan_churchoutdoor-7e701dd5.pth``) to a jaxdissect model.

    python -m converters.proggan --input=proggan_churchoutdoor-7e701dd5.pth --output=DIR

The conversion itself is :mod:`jaxdissect.convert.proggan` (usable from Python).
"""

from absl import flags

from jaxdissect.convert.proggan import convert
from launch import common


def main(argv):
    del argv
    f = flags.FLAGS
    m = convert(f.input, f.output)
    print(f"wrote {f.output}: Progressive GAN {m['resolution']}x{m['resolution']}, "
          f"sizes {m['sizes']}, sha256 {m['source_sha256'][:12]}")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script, so importing this module is side-effect free)."""
    flags.DEFINE_string("input", None, "PyTorch state_dict, e.g. proggan_churchoutdoor-7e701dd5.pth.")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
    define_flags()
    common.run(main)
