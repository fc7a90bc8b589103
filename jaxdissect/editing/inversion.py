"""Invert a photo into a generator's edit layer (ganseeing ``optimize_residuals``; gan-editing.md 1.4).

1. Start from a latent: ``z`` if given, else the encoder's estimate
   ``encoder(image)`` (``HybridLayerNormEncoder``, ``converters.proggan_encoder``).
2. With z fixed, learn additive residuals ``d_l`` on the outputs of the layers
   below the edit layer (``layer1``..``layer3`` for ``layer4``), all starting
   at 0, so the edit layer's representation becomes
   ``layer4(d3 + layer3(d2 + layer2(d1 + layer1(z))))``.
3. Loss per image: ``L1(G(x), image)`` + ``L1(F(G(x)), F(image))`` with ``F`` a
   perceptual network (VGG16 up to relu4_2 = our ``conv4_2``, fed the raw
   [-1, 1] image as the reference does) + ``sum_l mean(d_l^2)``.
4. Adam, lr 0.01, 3000 steps, learning rate halved at steps 800, 1200, 1800.

Images in a batch are optimised independently (their losses are summed and
Adam is per-parameter), in one jitted loop run in chunks with progress.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import layers as layer_api
from jaxdissect.editing.optimize import as_images, psnr, run_steps
from jaxdissect.editing.strokes import EditError

STEPS = 3000
LR = 0.01
MILESTONES = (800, 1200, 1800)
GAMMA = 0.5
PERCEPTUAL_LAYER = "conv4_2"  # jaxdissect VGG16: post-ReLU, i.e. torchvision features[:21] (relu4_2)


@dataclasses.dataclass
class Inversion:
    """What :func:`invert` found: the edit layer's ``representation`` and the rest of the fit.

    ``representation`` ``[N, h, w, U]`` (feed it to ``apply_strokes`` or
    ``adapt``), ``reconstruction`` ``[N, H, W, 3]``, ``losses`` ``[steps, N]``
    (each image's loss before each step), ``psnr`` ``[N]`` of the
    reconstruction against the image, ``z`` the fixed latent, ``residuals``
    ``{layer: d}``, ``layer`` the edit layer.
    """

    representation: Any
    reconstruction: Any
    losses: np.ndarray
    psnr: np.ndarray
    z: Any
    residuals: dict
    layer: str


def _perceptual_spec(perceptual):
    if perceptual is None:
        return None, None, None
    if not isinstance(perceptual, (tuple, list)) or len(perceptual) not in (2, 3):
        raise EditError("perceptual must be (module, variables) or (module, variables, layer), e.g. a converted "
                        f"VGG16 with layer {PERCEPTUAL_LAYER!r}; or None for no perceptual term")
    module, variables = perceptual[0], perceptual[1]
    layer = perceptual[2] if len(perceptual) == 3 else PERCEPTUAL_LAYER
    return module, variables, layer


def _features(module, variables, layer, images):
    _, acts = layer_api.capture(module, variables, images, [layer])
    return acts[layer]


@functools.lru_cache(maxsize=32)
def _loss_fn(generator, layer: str, residual_layers: tuple, pmodule, player):
    """``(residuals, data) -> (total, per-image loss [N])`` for one generator/perceptual configuration."""

    def loss(residuals, data):
        edits = {name: (lambda d: lambda a: a + d)(residuals[name]) for name in residual_layers}
        image = layer_api.run(generator, data["gvars"], data["z"], edits=edits)
        per = jnp.abs(image - data["target"]).mean(axis=(1, 2, 3))
        if pmodule is not None:
            f = _features(pmodule, data["pvars"], player, image)
            per = per + jnp.abs(f - data["target_features"]).reshape(f.shape[0], -1).mean(axis=1)
        for d in residuals.values():
            per = per + (d * d).reshape(d.shape[0], -1).mean(axis=1)
        return per.sum(), per

    return loss


@functools.lru_cache(maxsize=32)
def _render_fn(generator, layer: str, residual_layers: tuple):
    @jax.jit
    def render(gvars, z, residuals):
        edits = {name: (lambda d: lambda a: a + d)(residuals[name]) for name in residual_layers}
        return layer_api.run(generator, gvars, z, edits=edits, capture=[layer])

    return render


@functools.lru_cache(maxsize=8)
def _feature_fn(module, layer: str):
    return jax.jit(lambda v, x: _features(module, v, layer, x))


@functools.lru_cache(maxsize=8)
def _encode_fn(encoder):
    return jax.jit(lambda v, x: encoder.apply(v, x))


def invert(generator, variables, images, *, z=None, encoder=None, layer: str = "layer4",
           residual_layers: Sequence[str] | None = None, perceptual=None, steps: int = STEPS, lr: float = LR,
           milestones: Sequence[int] = MILESTONES, gamma: float = GAMMA, chunk: int = 100,
           progress: bool | None = None) -> Inversion:
    """Invert ``images`` (NHWC RGB in [-1, 1], the generator's resolution) into ``layer`` of ``generator``.

    Args:
      generator, variables: e.g. a converted ProGAN (``jaxdissect.load_model``).
      images: ``[N, H, W, 3]`` (or one ``[H, W, 3]``) in [-1, 1].
      z: the starting latents ``[N, Z]``; else ``encoder`` must be given.
      encoder: ``(module, variables)`` mapping the images to z (the converted
        ``HybridLayerNormEncoder``); used when ``z`` is None.
      layer: the edit layer whose representation is returned.
      residual_layers: layers that get a learned additive residual; default
        the layers before ``layer`` in the generator (``layer1``..``layer3``).
      perceptual: ``(module, variables[, layer])``, the feature network of the
        perceptual L1 (default layer ``conv4_2`` of a jaxdissect VGG16, post-ReLU,
        i.e. torchvision's relu4_2); None leaves the term out.
      steps, lr, milestones, gamma: Adam and its step schedule (reference:
        3000, 0.01, (800, 1200, 1800), 0.5).
      chunk: steps per jitted call (the progress bar moves between calls).
      progress: show a progress bar (default: ``jaxdissect.progress`` setting).
    """
    target = as_images(images)
    n = target.shape[0]
    if z is None:
        if encoder is None:
            raise EditError("invert needs a starting point: give z= (latents [N, Z]) or encoder=(module, variables)")
        emodule, evars = encoder
        z = _encode_fn(emodule)(evars, target)
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[0] != n:
        raise EditError(f"z has shape {tuple(z.shape)}; give one latent per image, [{n}, Z]")
    shapes = layer_api.layer_shapes(generator, variables, z)
    names = list(shapes)
    if layer not in shapes:
        raise EditError(f"unknown layer {layer!r}; {type(generator).__name__} has {', '.join(names)}")
    if residual_layers is None:
        residual_layers = names[:names.index(layer)]
    residual_layers = tuple(residual_layers)
    unknown = [r for r in residual_layers if r not in shapes]
    if unknown:
        raise EditError(f"unknown residual layers {unknown}; {type(generator).__name__} has {', '.join(names)}")
    out_shape = jax.eval_shape(lambda v, z: generator.apply(v, z), variables, z).shape
    if tuple(out_shape) != tuple(target.shape):
        raise EditError(f"the images are {tuple(target.shape[1:])} but the generator makes {tuple(out_shape[1:])}; "
                        "resize and crop the photo to the generator's resolution first")
    pmodule, pvars, player = _perceptual_spec(perceptual)
    data = {"gvars": variables, "z": z, "target": target}
    if pmodule is not None:
        data["pvars"] = pvars
        data["target_features"] = _feature_fn(pmodule, player)(pvars, target)
    residuals = {name: jnp.zeros(shapes[name].shape, shapes[name].dtype) for name in residual_layers}
    loss = _loss_fn(generator, layer, residual_layers, pmodule, player)
    residuals, losses = run_steps(loss, residuals, data, (float(lr), tuple(int(m) for m in milestones),
                                                          float(gamma)), int(steps), chunk=chunk,
                                  desc="invert", show=progress)
    image, acts = _render_fn(generator, layer, residual_layers)(variables, z, residuals)
    return Inversion(representation=acts[layer], reconstruction=image, losses=losses,
                     psnr=psnr(image, target), z=z, residuals=residuals, layer=layer)
