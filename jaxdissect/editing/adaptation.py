"""Image-specific adaptation of a generator (SIGGRAPH 2019; EP ``optimize_fixed_ganprior``, gan-editing.md 2.2).

The generator's upper layers are perturbed multiplicatively,
``out_k -> out_k * (1 + s_k)``, for the adapted layers ``k`` (ProGAN: layer8,
layer10, layer12, layer14). The maps ``s_k`` come from a small network fed a
fixed noise image (deep-image-prior style); only that network is trained
(the generator and the representation stay fixed), with Adam (lr 0.1, 1000
steps, no decay) on::

    L1(G'(r) * keep, image * keep) + 0.1 * sum_k mean(s_k^2)

where ``keep = 1 - blur(dilate(edit mask))`` (16 dilation steps, Gaussian
sigma 4 at 256 px; scaled with the image size), so the fit ignores the edited
region.

The noise network (the reference's ``UnetDownsample`` is not published, so
this is our choice, :class:`NoiseMaps`): noise ``[1, H0, W0, 32]`` from
``numpy.random.RandomState(seed)`` at the resolution of the highest-resolution
adapted layer; one stage per adapted layer from high to low resolution, each
``convs`` 3x3 convs with LeakyReLU(0.2) (the first with the stride that halves
the resolution to the next layer's, stride 1 for the first stage), and a 1x1
head to the layer's channel count. Heads start at zero, so the adapted
generator starts as the generator itself. A batch of images is adapted
independently (one network per image, ``vmap``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import layers as layer_api
from jaxdissect.editing.optimize import as_images, psnr, run_steps
from jaxdissect.editing.strokes import EditError, scale_maps, latent_like
from jaxdissect.models.proggan import pixel_norm

STEPS = 1000
LR = 0.1
PENALTY = 0.1
PROGGAN_ADAPT_LAYERS = ("layer8", "layer10", "layer12", "layer14")
NOISE_CHANNELS = 32


class NoiseMaps(nn.Module):
    """Fixed noise -> one map per adapted layer (see the module docstring). ``channels``/``strides`` high-res first."""

    channels: tuple
    strides: tuple
    width: int = NOISE_CHANNELS
    convs: int = 2

    @nn.compact
    def __call__(self, noise):
        x, maps = noise, []
        for i, (c, s) in enumerate(zip(self.channels, self.strides)):
            for j in range(self.convs):
                stride = s if j == 0 else 1
                x = nn.Conv(self.width, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                            name=f"stage{i}_conv{j}")(x)
                x = nn.leaky_relu(pixel_norm(x), 0.2)
            head = nn.Conv(c, (1, 1), kernel_init=nn.initializers.zeros, name=f"stage{i}_head")(x)
            maps.append(head / self.width)
        return maps


@dataclasses.dataclass
class Adaptation:
    """An adapted generator for one batch of images.

    ``maps`` ``{layer: s [N, h, w, C]}`` (the outputs are multiplied by
    ``1 + s``; pass this object as ``apply_strokes(..., adaptation=)``),
    ``reconstruction`` ``[N, H, W, 3]`` of the adapted generator from the
    representation, ``losses`` ``[steps, N]``, ``psnr`` ``[N]`` (whole image),
    ``keep`` ``[N, H, W]`` the loss weights used, ``params`` the noise
    network's variables (stacked per image).
    """

    maps: dict
    reconstruction: Any
    losses: np.ndarray
    psnr: np.ndarray
    keep: Any
    params: Any


def keep_mask(mask, size: tuple[int, int], dilation: int | None = None, blur: float | None = None) -> np.ndarray:
    """``1 - blur(dilate(mask > 0))`` at image ``size``: float ``[N, H, W]`` in [0, 1].

    ``mask``: ``[H', W']`` or ``[N, H', W']`` at any resolution (nearest-resized).
    Defaults scale the reference's 16 steps / sigma 4 at 256 px to ``size``.
    """
    from scipy import ndimage

    h, w = size
    dilation = int(round(16 * h / 256)) if dilation is None else int(dilation)
    blur = 4.0 * h / 256 if blur is None else float(blur)
    m = np.asarray(mask, np.float32)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise EditError(f"mask must be [H, W] or [N, H, W], got shape {m.shape}")
    rows = (np.arange(h) * m.shape[1]) // h
    cols = (np.arange(w) * m.shape[2]) // w
    m = m[:, rows][:, :, cols] > 0
    out = np.empty(m.shape, np.float32)
    for i, mi in enumerate(m):
        if dilation > 0 and mi.any():
            mi = ndimage.binary_dilation(mi, iterations=dilation)
        mi = mi.astype(np.float32)
        if blur > 0:
            mi = ndimage.gaussian_filter(mi, blur, mode="constant")
        out[i] = 1 - np.clip(mi, 0, 1)
    return out


def _render_input(generator, layer, x):
    """``(input, edits)`` that make the generator run from latents or from a stored ``layer`` representation."""
    if x.ndim == 2:
        return x, {}
    inp = jnp.zeros(latent_like(generator, x.shape[0]).shape, jnp.float32)
    return inp, {layer: layer_api.Replace(x)}


@functools.lru_cache(maxsize=32)
def _loss_fn(generator, layer: str, net: NoiseMaps, layers: tuple, penalty: float):
    def one(params, gvars, x, noise, target, keep):
        maps = dict(zip(layers, net.apply(params, noise)))
        inp, edits = _render_input(generator, layer, x[None])
        edits.update(scale_maps(maps, None))
        image = layer_api.run(generator, gvars, inp, edits=edits)[0]
        loss = jnp.abs((image - target) * keep[..., None]).mean()
        for s in maps.values():
            loss = loss + penalty * jnp.mean(s * s)
        return loss

    def loss(params, data):
        value = one(params, data["gvars"], data["x"], data["noise"], data["target"], data["keep"])
        return value, value[None]

    return loss


@functools.lru_cache(maxsize=32)
def _finish_fn(generator, layer: str, net: NoiseMaps, layers: tuple):
    @jax.jit
    def finish(params, gvars, x, noise):
        maps = jax.vmap(lambda p: dict(zip(layers, [m[0] for m in net.apply(p, noise)])))(params)
        inp, edits = _render_input(generator, layer, x)
        edits.update(scale_maps(maps, None))
        return maps, layer_api.run(generator, gvars, inp, edits=edits)

    return finish


def adapt(generator, variables, x, images, *, layer: str = "layer4", adapt_layers: Sequence[str] = PROGGAN_ADAPT_LAYERS,
          mask=None, steps: int = STEPS, lr: float = LR, penalty: float = PENALTY, width: int = NOISE_CHANNELS,
          convs: int = 2, dilation: int | None = None, blur: float | None = None, seed: int = 1, chunk: int = 100,
          progress: bool | None = None) -> Adaptation:
    """Adapt ``generator`` to ``images`` from ``x`` (latents ``[N, Z]`` or a ``layer`` representation).

    ``x`` is typically ``invert(...).representation``, possibly already edited
    (the reference adapts to the edited representation with the edit's
    ``mask``). ``adapt_layers``: the perturbed layers (ProGAN default layer8,
    10, 12, 14; ``jaxdissect.models.toy_generator.ADAPT_LAYERS`` for the toy).
    ``mask`` (``[H, W]`` or ``[N, H, W]``, any resolution): the edited region,
    left out of the fit after dilation and blur; None fits every pixel.
    """
    target = as_images(images)
    n, h, w = target.shape[:3]
    x = jnp.asarray(x, jnp.float32)
    if x.ndim not in (2, 4) or x.shape[0] != n:
        raise EditError(f"x has shape {tuple(x.shape)}; give latents [{n}, Z] or a {layer} representation "
                        f"[{n}, h, w, U], one per image")
    shapes = layer_api.layer_shapes(generator, variables, latent_like(generator, 1) if x.ndim == 4 else x[:1])
    adapt_layers = tuple(adapt_layers)
    unknown = [a for a in adapt_layers if a not in shapes]
    if unknown or (x.ndim == 4 and layer not in shapes):
        bad = unknown or [layer]
        raise EditError(f"unknown layers {bad}; {type(generator).__name__} has {', '.join(shapes)}")
    if not adapt_layers:
        raise EditError("adapt_layers is empty; name the layers whose outputs are adapted")
    by_res = sorted(adapt_layers, key=lambda a: -shapes[a].shape[1])
    res = [int(shapes[a].shape[1]) for a in by_res]
    strides = [1] + [r0 // r1 for r0, r1 in zip(res[:-1], res[1:])]
    if any(r0 != r1 * s for r0, r1, s in zip(res[:-1], res[1:], strides[1:])):
        raise EditError(f"adapted layers {by_res} have resolutions {res}; each must divide the previous one")
    net = NoiseMaps(tuple(int(shapes[a].shape[-1]) for a in by_res), tuple(strides), width, convs)
    noise = jnp.asarray(np.random.RandomState(seed).standard_normal((1, res[0], res[0], width)), jnp.float32)
    init = net.init(jax.random.PRNGKey(seed), noise)
    keep = jnp.ones((n, h, w), jnp.float32) if mask is None else jnp.asarray(keep_mask(mask, (h, w), dilation, blur))
    if keep.shape[0] not in (1, n):
        raise EditError(f"mask has {keep.shape[0]} images but there are {n}")
    keep = jnp.broadcast_to(keep, (n, h, w))
    loss = _loss_fn(generator, layer, net, tuple(by_res), float(penalty))
    fitted, losses = [], []
    for i in range(n):  # one network per image; the compiled chunks are shared
        data = {"gvars": variables, "x": x[i], "noise": noise, "target": target[i], "keep": keep[i]}
        p, curve = run_steps(loss, init, data, (float(lr), (), 1.0), int(steps), chunk=chunk,
                             desc=f"adapt {i + 1}/{n}" if n > 1 else "adapt", show=progress)
        fitted.append(p)
        losses.append(curve[:, 0] if curve.size else np.zeros((0,), np.float32))
    params = jax.tree.map(lambda *p: jnp.stack(p), *fitted)
    losses = np.stack(losses, axis=1)
    maps, image = _finish_fn(generator, layer, net, tuple(by_res))(params, variables, x, noise)
    return Adaptation(maps=maps, reconstruction=image, losses=losses, psnr=psnr(image, target), keep=keep,
                      params=params)
