r"""GAN Dissection (Bau et al., ICLR 2019; PNAS 2020): Progressive GAN generators.

All 14 layers of a ProGAN over the original's 10,000 z vectors (seed 1), its
output segmented by the UPP + colour segmenter (netpqc), quantile 0.01::

  python -m launch.dissect --config=configs/gandissect_proggan.py:church

(``:kitchen``, ``:bedroom``, ``:livingroom`` for the other domains; models
converted with ``converters.proggan``). ``tiny``: 16 z vectors, small strips
(give a generator with ``--model``).
"""

from jaxdissect.config import DissectConfig

DOMAINS = ("church", "kitchen", "bedroom", "livingroom")


def get_config(arg=None):
    base = DissectConfig(layers="layer1..layer14", data="z:10000",
                         segmenter="upp=models/upp,color=models/color,setting=netpqc", quantile=0.01, miniou=0.04)
    if arg == "tiny":
        return base.replace(layers="layer4", data="z:16", batch_size=8, topk=5, thumbsize=16)
    domain = arg or "church"
    if domain not in DOMAINS:
        raise ValueError(f"configs/gandissect_proggan.py has the variants {', '.join(DOMAINS)} and tiny, "
                         f"not {arg!r}")
    return base.replace(model=f"models/proggan_{domain}")
