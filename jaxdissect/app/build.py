"""Building the painting app's :class:`~jaxdissect.app.painter.Painter` from a model and its dissection.

With no model the embedded default is used: the planted toy generator
(``jaxdissect.models.toy_generator``) and its dissection, computed once (a few
seconds) and cached under :func:`default_cache_dir`; nothing is downloaded.
"""

from __future__ import annotations

import os

import numpy as np

from jaxdissect.app.painter import Painter

DEFAULT_NUM_IMAGES = 16


class AppError(ValueError):
    """A model, dissection or setting the app cannot use; the message says which and how to fix it."""


def default_cache_dir() -> str:
    """``$JAXDISSECT_CACHE``, else ``$XDG_CACHE_HOME/jaxdissect``, else ``~/.cache/jaxdissect``."""
    if os.environ.get("JAXDISSECT_CACHE"):
        return os.environ["JAXDISSECT_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxdissect")


def toy_dissection(cache_dir: str | None = None) -> str:
    """The toy generator's dissection directory, computed on first use; returns its path."""
    from jaxdissect.models import toy_generator as toy

    directory = os.path.join(cache_dir or default_cache_dir(), "ganpaint-toy-dissection")
    if not os.path.exists(os.path.join(directory, toy.EDIT_LAYER, "arrays.npz")):
        toy.dissect_toy(directory, toy.EDIT_LAYER)
    return directory


def _latent_size(module, metadata: dict) -> int:
    shape = (metadata.get("input") or {}).get("shape")
    if shape and len(shape) == 2 and isinstance(shape[1], int):
        return shape[1]
    for attr in ("latent",):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    sizes = getattr(module, "sizes", None)
    if sizes:
        return int(sizes[0])
    raise AppError("cannot tell the generator's latent size: its model.json has no input shape [null, D]")


def mask_size_for(module, variables, layer: str, z: np.ndarray) -> tuple[int, int]:
    """The stroke grid: 4x the layer's resolution (the original: 32x32 for ProGAN's 8x8 layer4), at most the image."""
    from jaxdissect.layers import LayerError, layer_shapes

    try:
        shapes = layer_shapes(module, variables, z[:1])
    except LayerError as e:
        raise AppError(str(e)) from None
    if layer not in shapes or len(getattr(shapes[layer], "shape", ())) != 4:
        spatial = [n for n, s in shapes.items() if len(getattr(s, "shape", ())) == 4]
        raise AppError(f"--layer={layer}: not a spatial layer of this generator; choose one of {', '.join(spatial)}")
    _, h, w, _ = shapes[layer].shape
    out = jax_output_shape(module, variables, z)
    return min(4 * h, out[1]), min(4 * w, out[2])


def jax_output_shape(module, variables, z) -> tuple[int, ...]:
    import jax

    return tuple(jax.eval_shape(lambda v, x: module.apply(v, x), variables, z[:1]).shape)


def build_painter(model: str | None = None, dissection: str | None = None, *, layer: str | None = None,
                  num_images: int = DEFAULT_NUM_IMAGES, cache_dir: str | None = None, seed: int = 1,
                  invert=None) -> Painter:
    """A :class:`Painter` for a converted generator dir + its ``launch.dissect`` output (or the embedded toy).

    Image id ``k`` is row ``k`` of the ``RandomState(seed)`` latents, as in the
    original. ``invert`` overrides the photo inversion (default: the editing
    module's invert + adapt when available).
    """
    from jaxdissect.editing import Brushes

    if num_images < 1:
        raise AppError(f"--num_images={num_images}: serve at least one image")
    if model is None:
        from jaxdissect.models import toy_generator as toy

        if dissection is not None:
            raise AppError("--dissection needs --model (the embedded default brings its own dissection)")
        module, variables = toy.toy_generator()
        layer = layer or toy.EDIT_LAYER
        dissection = toy_dissection(cache_dir)
        z = toy.sample_z(num_images, seed)
        strength = "low"  # 4 of the layer's 16 units: the planted red, green or blue ones
    else:
        from jaxdissect.checkpoint import CheckpointError, load_metadata, load_model
        from jaxdissect.data.latents import standard_z_sample

        if not dissection:
            raise AppError("--dissection is required with --model: the output directory of python -m "
                           "launch.dissect for this generator")
        if not os.path.isdir(model):
            raise AppError(f"--model={model}: no such directory; convert a generator first, e.g. python -m "
                           f"converters.proggan --input=proggan_churchoutdoor-7e701dd5.pth --output={model}")
        try:
            module, variables = load_model(model)
            metadata = load_metadata(model) or {}
        except CheckpointError as e:
            raise AppError(f"--model={model}: {e}") from None
        layer = layer or "layer4"
        strength = "high"
        z = standard_z_sample(num_images, _latent_size(module, metadata), seed=seed)
    if not os.path.isdir(os.path.join(dissection, layer)):
        raise AppError(f"--dissection={dissection}: no dissection of {layer!r} there; run python -m launch.dissect "
                       f"--model=... --layers={layer} --output_dir={dissection}")
    brushes = Brushes.from_dissection(dissection, layer)
    return Painter(module, variables, layer, brushes, z, mask_size=mask_size_for(module, variables, layer, z),
                   default_strength=strength,
                   invert=invert if invert is not None else default_invert(module, variables, layer))


def default_invert(module, variables, layer):
    """The photo inversion the app uses: ``jaxdissect.editing.invert`` then ``adapt``; None if unavailable."""
    try:
        from jaxdissect import editing
    except ImportError:
        return None
    if not (hasattr(editing, "invert") and hasattr(editing, "adapt")):
        return None
    return None  # wired to editing.invert/adapt once their signatures are settled
