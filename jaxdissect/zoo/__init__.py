"""Published models and data by name: fetched, verified, converted and cached on first use.

    from jaxdissect import zoo
    zoo.fetch("vgg16_places365")         # the converted model directory (downloaded and converted once)
    zoo.model_dir("models/my_vgg")       # a path is returned as it is
    zoo.data_dir("places:val")           # the unpacked Places365 validation folder
    zoo.segmenter_spec("netpqc")         # "upp=<dir>,color=<dir>,setting=netpqc"
    segmenter, variables = zoo.load_segmenter("netpqc")

``jaxdissect.load_model("vgg16_places365")`` and every launcher's ``--model``,
``--segmenter``, ``--encoder`` and ``--data`` accept the same names. The
published files are listed in ``registry.json`` (``python -m jaxdissect.zoo
list``); see :mod:`.download` for how downloads are made trustworthy and
:mod:`.store` for the cache layout. Environment: ``JAXDISSECT_CACHE`` (where),
``JAXDISSECT_OFFLINE=1`` (never download), ``JAXDISSECT_MIRROR=URL`` (fetch
every file from a mirror laid out as ``python -m jaxdissect.zoo fetch
--to=DIR`` fills it), ``JAXDISSECT_REGISTRY=FILE`` (your own entries, or
overrides of the built-in ones).
"""

from jaxdissect.zoo.download import ChecksumError, DownloadError, OfflineError, ZooError
from jaxdissect.zoo.registry import Entry, FileSpec, RegistryError, UnknownName, entries, get
from jaxdissect.zoo.store import data_dir, data_name, fetch, looks_like_path, model_dir, segmenter_spec

__all__ = ["ChecksumError", "DownloadError", "Entry", "FileSpec", "OfflineError", "RegistryError", "UnknownName",
           "ZooError", "data_dir", "data_name", "entries", "fetch", "get", "load_segmenter", "looks_like_path", "model_dir",
           "segmenter_spec"]


def load_segmenter(spec: str = "netpqc", **options):
    """``jaxdissect.load_segmenter`` of a ``--segmenter`` value by name (``netpqc``, ``upp``, ...), fetched on first use."""
    from jaxdissect.segmentation import segmenter_from_spec

    return segmenter_from_spec(segmenter_spec(spec), **options)
