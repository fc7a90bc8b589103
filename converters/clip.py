r"""Convert OpenAI CLIP weights (ViT-B/16, RN50, ...) to a jaxdissect model directory.

    python -m converters.clip --input=open_clip_model.safetensors --vocab=bpe_simple_vocab_16e6.txt.gz \
        --output=models/clip_vit_b16

``--input``: open_clip's ``.safetensors`` release of the ``openai`` weights (read without PyTorch)
or a PyTorch state dict; OpenAI's TorchScript ``ViT-B-16.pt`` is refused. ``--vocab``: CLIP's BPE
vocabulary, kept in the model directory for its tokenizer. The conversion itself is
:mod:`jaxdissect.convert.clip` (usable from Python).
"""

from absl import flags

from jaxdissect.convert.clip import convert
from launch import common


def main(argv):
    del argv
    f = flags.FLAGS
    m = convert(f.input, f.output, f.vocab)
    print(f"wrote {f.output}: CLIP {m['architecture']}, embedding {m['embed_dim']}, sha256 {m['source_sha256'][:12]}")


def define_flags() -> None:
    """Flags of the command line (defined only when run as a script, so importing this module is side-effect free)."""
    flags.DEFINE_string("input", None, "CLIP weights: open_clip_model.safetensors (OpenAI key names) or a state dict.")
    flags.DEFINE_string("vocab", None, "CLIP's BPE vocabulary, bpe_simple_vocab_16e6.txt.gz (for the tokenizer).")
    flags.DEFINE_string("output", None, "New (or empty) directory for the converted model.")
    flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
    define_flags()
    common.run(main)
