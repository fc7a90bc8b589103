"""jaxdissect: Network Dissection in JAX/Flax.

Label each hidden unit of a vision network with the concept it detects, then
measure what the unit does by switching it off or on.

The public API is imported lazily (``jaxdissect.capture`` imports only the
layer module), so ``import jaxdissect`` is cheap and a command that needs one
piece does not pay for the rest.
"""

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS = {
    # Checkpoints of models converted or trained by us; load_model also takes a published name (jaxdissect.zoo).
    "load_model": "jaxdissect.checkpoint",
    "save_model": "jaxdissect.checkpoint",
    "load_metadata": "jaxdissect.checkpoint",
    # The base of every explained error (launchers print these as one line).
    "JaxDissectError": "jaxdissect.errors",
    # Reading and editing named layers of any Flax Linen module.
    "capture": "jaxdissect.layers",
    "run": "jaxdissect.layers",
    "Ablate": "jaxdissect.layers",
    "SetUnits": "jaxdissect.layers",
    "Edit": "jaxdissect.layers",
    "layer_names": "jaxdissect.layers",
    "Replace": "jaxdissect.layers",
    "run_from": "jaxdissect.layers",
    "FeatureEdit": "jaxdissect.layers",
    # Streaming statistics over activations (functional API).
    "dissect_activations": "jaxdissect.statistics",
    "SparseCodes": "jaxdissect.kernels.codes",
    "run_stream": "jaxdissect.streaming",
    "DissectionResult": "jaxdissect.statistics",
    # Segmenters.
    "load_segmenter": "jaxdissect.segmentation",
    "segment": "jaxdissect.segmentation",
    # The whole dissection of a model, and its one configuration.
    "dissect": "jaxdissect.pipelines.dissect",
    "DissectConfig": "jaxdissect.config",
    "PlacesFolder": "jaxdissect.data.places",
    "ImageFolder": "jaxdissect.data.folders",
    "LatentSource": "jaxdissect.data.folders",
    "SyntheticScenes": "jaxdissect.data.synthetic",
    # The segmenter's label maps kept on disk, shared by every dissection of a dataset.
    "SegmentationCache": "jaxdissect.segmentation.cache",
    "open_segmentation_cache": "jaxdissect.segmentation.cache",
    # Semantic photo editing with a GAN prior (GANPaint).
    "Brushes": "jaxdissect.editing.strokes",
    "Stroke": "jaxdissect.editing.strokes",
    "apply_strokes": "jaxdissect.editing.strokes",
    "paint": "jaxdissect.editing.strokes",
    "erase": "jaxdissect.editing.strokes",
    # The GANPaint-style painting app (python -m launch.ganpaint).
    "build_painter": "jaxdissect.app",
    "create_app": "jaxdissect.app",
    # NetDissect 2017: random rotations of a layer's basis, comparisons of networks in one run.
    "random_rotation_powers": "jaxdissect.rotation",
    "compare": "jaxdissect.pipelines.compare",
    "invert": "jaxdissect.editing.inversion",
    "adapt": "jaxdissect.editing.adaptation",
    "EditError": "jaxdissect.editing.strokes",
    # Adversarial attacks on any classifier; activations before a layer's ReLU.
    "pgd": "jaxdissect.attacks",
    "carlini_wagner_l2": "jaxdissect.attacks",
    "pre_activation": "jaxdissect.layers",
    "PreActivation": "jaxdissect.layers",
}

_SUBPACKAGES = ("attacks", "convert", "editing", "explain", "interventions", "kernels", "zoo")
__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES)


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"jaxdissect.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxdissect' has no attribute {name!r}")


def __dir__():
    return __all__
