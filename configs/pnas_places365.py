r"""PNAS 2020 (Bau et al., "Understanding the role of individual units"): Places365 classifiers.

The original's ``dissect_all.sh``: every conv layer, Places365 validation
images, the UPP + colour segmenter (setting netpqc), quantile 0.01, IoU cut 0.04::

  python -m launch.dissect --config=configs/pnas_places365.py:vgg16
  python -m launch.dissect --config=configs/pnas_places365.py:alexnet
  python -m launch.dissect --config=configs/pnas_places365.py:resnet152

(models converted with ``converters.vgg16_places365``, ``.alexnet_places365``,
``.resnet152_places365``; segmenters with ``converters.segmenter``). AlexNet is
upsampled with the pool5 receptive-field grid its model.json records, as the
original. ``tiny``: the same method on 16 synthetic scenes with their labels.
"""

from jaxdissect.config import DissectConfig

SEGMENTER = "upp=models/upp,color=models/color,setting=netpqc"
MODELS = {"vgg16": ("models/vgg16_places365", "conv"), "alexnet": ("models/alexnet_places365", "conv"),
          "resnet152": ("models/resnet152_places365", "0,4,5,6,7")}


def get_config(arg=None):
    base = DissectConfig(data="places:val", segmenter=SEGMENTER, quantile=0.01, miniou=0.04)
    if arg == "tiny":
        return base.replace(data="synthetic:16", segmenter="dataset", batch_size=8, topk=5, thumbsize=16)
    model, layers = MODELS.get(arg or "vgg16", (None, None))
    if model is None:
        raise ValueError(f"configs/pnas_places365.py has the variants {', '.join(MODELS)} and tiny, not {arg!r}")
    return base.replace(model=model, layers=layers)
