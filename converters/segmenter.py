"""Convert the published CSAIL segmenters (PyTorch) into jaxdissect model directories.

    python -m converters.segmenter --encoder=encoder_epoch_40.pth \
        --decoder=decoder_epoch_40.pth --labels=labels.json --output=DIR [--kind=upp|color]

The conversion itself is :mod:`jaxdissect.convert.segmenter` (usable from Python).
"""

from absl import flags

from jaxdissect.convert.segmenter import KINDS, convert
from launch import common


def main(argv):
    del argv
    f = flags.FLAGS
    m = convert(f.encoder, f.decoder, f.labels, f.output, kind=f.kind)
    print(f"wrote {f.output}: {m['kind']} segmenter, encoder sha256 "
          f"{m['source']['encoder_sha256'][:12]}, decoder sha256 {m['source']['decoder_sha256'][:12]}")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script)."""
    flags.DEFINE_string("encoder", None, "Encoder state_dict, e.g. encoder_epoch_40.pth.")
    flags.DEFINE_string("decoder", None, "Decoder state_dict, e.g. decoder_epoch_40.pth.")
    flags.DEFINE_string("labels", None, "The segmenter's labels.json.")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.DEFINE_enum("kind", None, list(KINDS), "Segmenter kind; inferred from the decoder's keys if unset.")
    flags.mark_flags_as_required(["encoder", "decoder", "labels", "output"])


if __name__ == "__main__":
    define_flags()
    common.run(main)
