r"""Network Dissection (Bau et al., CVPR 2017): AlexNet-Places365 on Broden with the 2017 scoring.

Per-category scoring with the category-conditioned activation count, the exact
top 0.005 quantile, ``<layer>-result.csv`` per layer, unique detectors both
ways; every AlexNet layer upsampled with the pool5 receptive-field grid::

  python -m launch.dissect --config=configs/netdissect2017_alexnet.py
  python -m launch.dissect --config=configs/netdissect2017_alexnet.py:rotation   # conv5 in a random basis

(the model converted with ``converters.alexnet_places365``, Broden at 227
pixels in ``datasets/broden1_227``). ``rotation``: conv5 rotated by
NetDissect's random rotation (``Q^1``, seed 1); the rotation curve over powers
is ``launch.compare --rotations``. ``tiny``: the same method on 16 synthetic
scenes (their labels carry categories).
"""

from jaxdissect.config import DissectConfig


def get_config(arg=None):
    base = DissectConfig(model="models/alexnet_places365", layers="conv", data="broden:227",
                         segmenter="dataset", method="netdissect2017", quantile=0.005, miniou=0.04)
    if arg == "rotation":
        return base.replace(layers="conv5", rotation="1:1")
    if arg == "tiny":
        return base.replace(model=None, data="synthetic:16", batch_size=8, topk=5, thumbsize=16)
    if arg:
        raise ValueError(f"configs/netdissect2017_alexnet.py has the variants '', rotation and tiny, not {arg!r}")
    return base
