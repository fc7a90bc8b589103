r"""The embedded default: a small CNN trained on synthetic scenes, dissected against their known labels.

  python -m launch.dissect --config=configs/demo.py

is what ``python -m launch.dissect`` (no flags) runs: no downloads, a first look
in a couple of minutes. ``tiny``: 32 images, small strips.
"""

from jaxdissect.config import DissectConfig


def get_config(arg=None):
    config = DissectConfig()
    if arg == "tiny":
        return config.replace(data="synthetic:32", batch_size=8, topk=5, thumbsize=16)
    if arg:
        raise ValueError(f"configs/demo.py has the variants '' and 'tiny', not {arg!r}")
    return config
