"""A small deterministic generator with planted concept units, laid out like ProGAN, for tests and demos.

``ToyGenerator`` maps z ``[N, 8]`` to an NHWC RGB image ``[N, 32, 32, 3]`` in
[-1, 1] through eight named blocks, as the Progressive GAN's ``layer1`` ...
``layer14`` are named (``jaxdissect.models.proggan``)::

  layer1  dense z -> 4x4x16 (ProGAN's 4x4 conv on the 1x1 latent), LReLU 0.2
  layer2  3x3 conv 4x4x16, LReLU
  layer3  nearest 2x, 3x3 conv -> 8x8x16, LReLU
  layer4  1x1 conv -> 8x8x16: the PLANTED concept units (the edit layer, as ProGAN's layer4)
  layer5  nearest 2x, 3x3 conv -> 16x16x16, LReLU      layer6  3x3 conv, LReLU
  layer7  nearest 2x, 3x3 conv -> 32x32x16, LReLU      layer8  3x3 conv, LReLU
  output_32x32  1x1 conv to RGB, tanh

Planted semantics (all weights come from ``numpy.random.RandomState(0)``, so
every ``init`` gives the same generator, whatever the key):

* ``layer4`` is ``LReLU(gain * layer3 - offset)`` channel by channel:
  units 0-3 are **red** units, 4-7 **green**, 8-11 **blue** (sparse: they fire
  in blobs where their ``layer3`` channel is high), units 12-15 are
  always-on **texture** units (positive offset) that shade the background.
* ``layer5`` ... ``layer8`` carry each unit to the pixels above its cell:
  their 3x3 kernels are the identity at the centre tap plus a small random
  part (0.03), so a unit paints the 4x4 pixel block over its 8x8 cell and a
  little of the neighbouring blocks.
* ``output_32x32`` adds each red unit to the R channel only, green to G, blue to B
  (so the units' small negative LReLU tails shift no hue), texture units add a grey
  shading that is never labelled, on a dark
  background, then tanh.

:func:`color_segment` is the matching "segmenter" (labels ``-``, ``red``,
``green``, ``blue`` per 4x4 pixel block), :class:`ToyScenes` a data source
of z's with those labels, and :func:`jaxdissect.pipelines.toy.dissect_toy`
dissects ``layer4`` (or any layers) with ``jaxdissect.dissect(...,
segmentation='dataset')``: the result
is a directory in ``launch.dissect``'s format (``<layer>/report.json``,
``<layer>/arrays.npz``, ...) whose ``red`` column ranks units 0-3 first.
No download is needed anywhere.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LATENT = 8
WIDTH = 16
RESOLUTION = 32
LAYERS = tuple(f"layer{i}" for i in range(1, 9)) + (f"output_{RESOLUTION}x{RESOLUTION}",)
EDIT_LAYER = "layer4"
# Layers whose outputs ``jaxdissect.editing.adapt`` perturbs for this toy (ProGAN: layer8/10/12/14).
ADAPT_LAYERS = ("layer6", "layer8")
CONCEPT_UNITS = {"red": (0, 1, 2, 3), "green": (4, 5, 6, 7), "blue": (8, 9, 10, 11)}
TEXTURE_UNITS = (12, 13, 14, 15)
LABEL_NAMES = ("-", "red", "green", "blue")
LABEL_CATEGORIES = ("-", "color", "color", "color")
CATEGORIES = ("color",)
_SEED = 0


@functools.lru_cache(maxsize=1)
def _planted() -> dict:
    """The planted weights (a fixed NumPy seed, independent of any JAX key)."""
    rng = np.random.RandomState(_SEED)
    w, z = WIDTH, LATENT
    p = {}
    p["layer1"] = {"kernel": rng.standard_normal((z, 16 * w)) * 1.2 / np.sqrt(z),
                   "bias": np.zeros(16 * w)}
    p["layer2"] = {"kernel": rng.standard_normal((3, 3, w, w)) / np.sqrt(9 * w) + _centre_identity(w) * 0.5,
                   "bias": np.zeros(w)}
    p["layer3"] = {"kernel": rng.standard_normal((3, 3, w, w)) / np.sqrt(9 * w) + _centre_identity(w) * 0.5,
                   "bias": np.zeros(w)}
    # Calibrate layer4 on the planted layer3 of 4000 latents: a concept unit fires (> 0) at 12% of
    # positions with its 99th percentile at 2.5; texture units are on everywhere (median 1).
    pre = _np_lower(p, rng.standard_normal((4000, z))).reshape(-1, w)
    q88, q99, q50 = np.quantile(pre, [0.88, 0.99, 0.5], axis=0)
    gain = 2.5 / (q99 - q88)
    offset = gain * q88
    texture = list(TEXTURE_UNITS)
    gain[texture] = 0.5 / pre[:, texture].std(axis=0)
    offset[texture] = gain[texture] * q50[texture] - 1.0
    p["layer4"] = {"kernel": np.diag(gain)[None, None], "bias": -offset}
    for name in ("layer5", "layer6", "layer7", "layer8"):
        p[name] = {"kernel": _centre_identity(w) + 0.03 * rng.standard_normal((3, 3, w, w)) / np.sqrt(w),
                   "bias": np.zeros(w)}
    colour = np.zeros((w, 3))
    colour[list(CONCEPT_UNITS["red"])] = (0.6, 0.0, 0.0)
    colour[list(CONCEPT_UNITS["green"])] = (0.0, 0.6, 0.0)
    colour[list(CONCEPT_UNITS["blue"])] = (0.0, 0.0, 0.6)
    colour[list(TEXTURE_UNITS)] = 0.15 + rng.uniform(-0.01, 0.01, (len(TEXTURE_UNITS), 1))  # grey: no hue
    p[LAYERS[-1]] = {"kernel": colour[None, None], "bias": np.full(3, -0.8)}
    return jax.tree.map(lambda a: np.asarray(a, np.float32), p)


def _np_lower(p: dict, z: np.ndarray) -> np.ndarray:
    """``layer3``'s output for latents ``z`` in NumPy (used once, to calibrate ``layer4``)."""
    def lrelu(x):
        return np.where(x > 0, x, 0.2 * x)

    def conv3(x, k, b):
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        h, w = x.shape[1:3]
        return sum(xp[:, i:i + h, j:j + w] @ k[i, j] for i in range(3) for j in range(3)) + b

    x = lrelu(z @ p["layer1"]["kernel"] + p["layer1"]["bias"]).reshape(len(z), 4, 4, WIDTH)
    x = lrelu(conv3(x, p["layer2"]["kernel"], p["layer2"]["bias"]))
    x = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    return lrelu(conv3(x, p["layer3"]["kernel"], p["layer3"]["bias"]))


def _centre_identity(w: int) -> np.ndarray:
    k = np.zeros((3, 3, w, w))
    k[1, 1] = np.eye(w)
    return k


class _Block(nn.Module):
    """[nearest 2x] -> conv (or dense for the first block) + bias -> activation; planted weights."""

    features: int
    upscale: bool = False
    act: str = "lrelu"

    @nn.compact
    def __call__(self, x):
        planted = _planted()[self.name]
        kernel = self.param("kernel", lambda _key: jnp.asarray(planted["kernel"]))
        bias = self.param("bias", lambda _key: jnp.asarray(planted["bias"]))
        if x.ndim == 2:  # the latent: dense to a 4x4 map
            y = (x @ kernel + bias).reshape(x.shape[0], 4, 4, self.features)
        else:
            if self.upscale:
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            k = kernel.shape[0]
            y = lax.conv_general_dilated(x, kernel, (1, 1), ((k // 2, k // 2),) * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
        return jnp.tanh(y) if self.act == "tanh" else nn.leaky_relu(y, 0.2)


class ToyGenerator(nn.Module):
    """z ``[N, 8]`` -> RGB ``[N, 32, 32, 3]`` in [-1, 1]; layers ``layer1`` ... ``layer8``, ``output_32x32``."""

    @property
    def latent(self) -> int:
        return LATENT

    @property
    def layers(self) -> tuple[str, ...]:
        return LAYERS

    @nn.compact
    def __call__(self, z):
        z = jnp.asarray(z, jnp.float32)
        if z.ndim != 2 or z.shape[1] != LATENT:
            raise ValueError(f"ToyGenerator expects z of shape [N, {LATENT}], got {tuple(z.shape)}")
        w = WIDTH
        x = _Block(w, name="layer1")(z)
        x = _Block(w, name="layer2")(x)
        x = _Block(w, upscale=True, name="layer3")(x)
        x = _Block(w, name="layer4")(x)
        x = _Block(w, upscale=True, name="layer5")(x)
        x = _Block(w, name="layer6")(x)
        x = _Block(w, upscale=True, name="layer7")(x)
        x = _Block(w, name="layer8")(x)
        return _Block(3, act="tanh", name=LAYERS[-1])(x)


def toy_generator():
    """``(module, variables)`` of the planted toy generator (always the same weights)."""
    module = ToyGenerator()
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, LATENT), jnp.float32))
    return module, variables


def sample_z(n: int, seed: int = 1) -> np.ndarray:
    """``n`` standard-normal latents ``[n, 8]`` (NumPy ``RandomState(seed)``, as the original's z sets)."""
    return np.random.RandomState(seed).standard_normal((n, LATENT)).astype(np.float32)


def color_segment(images, downsample: int = 4):
    """Colour labels of images in [-1, 1]: int32 ``[N, 1, H/ds, W/ds]`` (0 none, 1 red, 2 green, 3 blue).

    Each ``ds x ds`` block is averaged; it is labelled with the colour channel
    that exceeds both others by more than 0.4 (on the [-1, 1] scale) while
    being above -0.2 itself. A pure function of arrays (jit-friendly).
    """
    images = jnp.asarray(images, jnp.float32)
    n, h, w, _ = images.shape
    pooled = images.reshape(n, h // downsample, downsample, w // downsample, downsample, 3).mean(axis=(2, 4))
    best = jnp.argmax(pooled, axis=-1)
    top = jnp.max(pooled, axis=-1)
    second = jnp.sort(pooled, axis=-1)[..., 1]
    on = (top - second > 0.4) & (top > -0.2)
    return jnp.where(on, best + 1, 0).astype(jnp.int32)[:, None]


_segment_generated = jax.jit(lambda variables, z: color_segment(ToyGenerator().apply(variables, z)))


class ToyScenes:
    """A data source of ``n`` toy latents (seed ``seed``) with the colour labels of their images.

    ``get_batch`` returns ``z``, ``seg`` (``[B, 1, 8, 8]``, :func:`color_segment`
    of the generated image) and ``valid``; ``label_names`` etc. describe the
    labels, so ``jaxdissect.dissect(..., segmentation='dataset')`` works.
    """

    label_names = list(LABEL_NAMES)
    label_categories = list(LABEL_CATEGORIES)
    categories = list(CATEGORIES)

    def __init__(self, n: int = 200, seed: int = 1):
        if n < 1:
            raise ValueError(f"ToyScenes needs n >= 1, got {n}")
        self.n, self.seed = int(n), int(seed)
        self.z = sample_z(self.n, self.seed)
        self.name = f"toy{self.n}"
        self._variables = toy_generator()[1]

    def __len__(self) -> int:
        return self.n

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        z = self.z[indices]
        seg = np.asarray(_segment_generated(self._variables, jnp.asarray(z)))
        return {"z": z, "seg": seg, "valid": np.ones(len(indices), bool)}

    def fingerprint(self) -> dict:
        return {"kind": "ToyScenes", "n": self.n, "seed": self.seed, "version": 1}
