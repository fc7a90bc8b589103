"""Building the painting app's :class:`~jaxdissect.app.painter.Painter` from a model and its dissection.

With no model the embedded default is used: the planted toy generator
(``jaxdissect.models.toy_generator``) and its dissection, computed once (a few
seconds) and cached under :func:`default_cache_dir`; nothing is downloaded.
"""

from __future__ import annotations

import os

import numpy as np

from jaxdissect.app.painter import Painter
from jaxdissect.errors import JaxDissectError

DEFAULT_NUM_IMAGES = 16


class AppError(JaxDissectError, ValueError):
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
        from jaxdissect import progress
        from jaxdissect.pipelines.toy import dissect_toy

        dissect_toy(directory, toy.EDIT_LAYER, progress=progress.enabled())
    return directory


def _latent_size(module, metadata: dict) -> int:
    shape = (metadata.get("input") or {}).get("shape")
    if shape and len(shape) == 2 and isinstance(shape[1], int):
        return shape[1]
    if isinstance(getattr(module, "latent", None), int):
        return module.latent
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
    import jax

    out = jax.eval_shape(lambda v, x: module.apply(v, x), variables, z[:1]).shape
    return min(4 * h, out[1]), min(4 * w, out[2])


def build_painter(model: str | None = None, dissection: str | None = None, *, layer: str | None = None,
                  encoder: str | None = None, num_images: int = DEFAULT_NUM_IMAGES, cache_dir: str | None = None,
                  seed: int = 1, invert_steps: int = 300, adapt_steps: int = 100) -> Painter:
    """A :class:`Painter` for a converted generator dir + its ``launch.dissect`` output (or the embedded toy).

    Image id ``k`` is row ``k`` of the ``RandomState(seed)`` latents, as in the
    original. Uploaded photos are inverted (``invert_steps``, starting from the
    converted ``encoder`` dir's estimate, or else the nearest served sample) and
    the generator adapted to them (``adapt_steps``); generators other than the
    toy and ProGAN (whose adapted layers are not known) get no uploads.
    """
    from jaxdissect.editing import Brushes

    if num_images < 1:
        raise AppError(f"--num_images={num_images}: serve at least one image")
    if invert_steps < 1 or adapt_steps < 0:
        raise AppError(f"--invert_steps={invert_steps}, --adapt_steps={adapt_steps}: give at least 1 inversion "
                       "step and 0 or more adaptation steps")
    if model is None:
        from jaxdissect.models import toy_generator as toy

        if dissection is not None:
            raise AppError("--dissection needs --model (the embedded default brings its own dissection)")
        module, variables = toy.toy_generator()
        layer = layer or toy.EDIT_LAYER
        dissection = toy_dissection(cache_dir)
        z = toy.sample_z(num_images, seed)
        strength = "low"  # 4 of the layer's 16 units: the planted red, green or blue ones
        adapt_layers = toy.ADAPT_LAYERS
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
        adapt_layers = None
        if type(module).__name__ == "ProgressiveGenerator":
            from jaxdissect.editing.adaptation import PROGGAN_ADAPT_LAYERS as adapt_layers
        z = standard_z_sample(num_images, _latent_size(module, metadata), seed=seed)
    if not os.path.isdir(os.path.join(dissection, layer)):
        raise AppError(f"--dissection={dissection}: no dissection of {layer!r} there; run python -m launch.dissect "
                       f"--model=... --layers={layer} --output_dir={dissection}")
    brushes = Brushes.from_dissection(dissection, layer)
    encoder_model = None
    if encoder is not None:
        from jaxdissect.checkpoint import CheckpointError, load_model

        if not os.path.isdir(encoder):
            raise AppError(f"--encoder={encoder}: no such directory; convert the ganseeing encoder with "
                           f"python -m converters.proggan_encoder --input=church_invert_hybrid_cse-43e52428.pth "
                           f"--output={encoder}")
        try:
            encoder_model = load_model(encoder)
        except CheckpointError as e:
            raise AppError(f"--encoder={encoder}: {e}") from None
    from jaxdissect import editing

    invert = None
    if adapt_layers is not None and hasattr(editing, "invert") and hasattr(editing, "adapt"):
        invert = PhotoInversion(module, variables, layer, z, adapt_layers=adapt_layers, encoder=encoder_model,
                                invert_steps=invert_steps, adapt_steps=adapt_steps)
    elif encoder is not None:
        raise AppError(f"--encoder: photo uploads need a ProGAN or the toy generator, not {type(module).__name__}")
    return Painter(module, variables, layer, brushes, z, mask_size=mask_size_for(module, variables, layer, z),
                   default_strength=strength, invert=invert)


class PhotoInversion:
    """The app's photo inversion: ``jaxdissect.editing.invert`` into the edit layer, then ``adapt``.

    Called by the painter's worker as ``(image [1, R, R, 3], report(fraction)) -> (representation, adaptation)``;
    the two optimisations' progress bars are heard through ``jaxdissect.progress.listen`` and reported as one
    fraction, weighted by their step counts. The starting latent is the encoder's estimate when an
    ``encoder`` ``(module, variables)`` is given, else the served sample whose image is nearest the photo (L1).
    ``adapt_steps=0`` skips the adaptation (the edit then renders through the plain generator).
    """

    def __init__(self, module, variables, layer: str, z: np.ndarray, *, adapt_layers, encoder=None,
                 invert_steps: int = 300, adapt_steps: int = 100):
        import jax

        self.module, self.variables, self.layer, self.z = module, variables, layer, z
        self.adapt_layers, self.encoder = tuple(adapt_layers), encoder
        self.invert_steps, self.adapt_steps = int(invert_steps), int(adapt_steps)
        self._images = jax.jit(lambda v, x: module.apply(v, x))

    def start(self, image: np.ndarray):
        """``(z [1, D] or None, encoder or None)``: where the inversion starts."""
        if self.encoder is not None:
            return None, self.encoder
        samples = np.asarray(self._images(self.variables, self.z))
        best = int(np.argmin(np.abs(samples - image).mean(axis=(1, 2, 3))))
        return self.z[best:best + 1], None

    def __call__(self, image: np.ndarray, report):
        from jaxdissect import editing, progress

        total = max(self.invert_steps + self.adapt_steps, 1)
        offset = [0]

        def heard(desc, done, steps):
            if steps:
                report((offset[0] + done) / total)

        z, encoder = self.start(image)
        with progress.listen(heard):
            inverted = editing.invert(self.module, self.variables, image, z=z, encoder=encoder, layer=self.layer,
                                      steps=self.invert_steps, chunk=_chunk(self.invert_steps), progress=False)
            offset[0] = self.invert_steps
            adaptation = None
            if self.adapt_steps:
                adaptation = editing.adapt(self.module, self.variables, inverted.representation, image,
                                           layer=self.layer, adapt_layers=self.adapt_layers, steps=self.adapt_steps,
                                           chunk=_chunk(self.adapt_steps), progress=False)
        return inverted.representation, adaptation


def _chunk(steps: int) -> int:
    """Steps per jitted call: about 20 progress reports per optimisation, one compile when it divides evenly."""
    return max(1, steps // 20)
