"""GANPaint's unit painting: concept brushes from a dissection, strokes, and their composition at a layer.

A :class:`Brushes` holds, for one dissected generator layer, every concept's
units ranked by IoU and each unit's 0.99-quantile activation (the
dissection's thresholds at ``quantile=0.01``). A :class:`Stroke` paints (or
erases) a concept inside a mask drawn at any canvas resolution. As in the
GANPaint demo (reference ``gan-editing.md`` 3.2-3.4):

* a stroke uses the concept's top ``strength`` units (4, 10 or 15; the demo's
  low/med/high, default 15) and sets them to their 0.99 quantile (paint) or
  to 0 (erase);
* its mask is pooled to the layer's resolution (adaptive max-pool by default,
  ``pool='mean'`` as the demo's option): that is the stroke's alpha;
* strokes compose with the "over" operator in order (later on top):
  ``alpha = 1 - prod(1 - alpha_i)`` and the value is the alpha-weighted blend
  ``sum_i v_i alpha_i prod_{j>i}(1 - alpha_j) / alpha``;
* the layer's output becomes ``x (1 - alpha) + value alpha``.

:func:`apply_strokes` renders the edit from latents z ``[N, Z]`` or from a
stored layer representation ``[N, h, w, U]`` (an inversion), optionally
through an adapted generator (``jaxdissect.editing.adapt``), whose
image-specific maps are switched off inside the edited region. The whole
edit is one jitted function, compiled once per (model, layer, number of
strokes, shapes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import layers as layer_api
from jaxdissect.interventions.common import InterventionError, lookup

STRENGTHS = {"low": 4, "med": 10, "high": 15}
DEFAULT_STRENGTH = 15


class EditError(InterventionError):
    """Bad arguments to an edit: unknown concept or layer, a mask of the wrong shape, too many units."""


# --------------------------------------------------------------------------
# Brushes


@dataclasses.dataclass(frozen=True)
class Brushes:
    """Concept brushes of one layer: ``iou [U, L]`` (column 0 = no label), ``levels [U]`` (paint values).

    ``label_names[l]`` names IoU column ``l``; :attr:`concepts` lists the
    paintable ones (all but column 0).
    """

    layer: str
    label_names: tuple
    iou: np.ndarray
    levels: np.ndarray

    def __post_init__(self):
        iou = np.asarray(self.iou, np.float64)
        levels = np.asarray(self.levels, np.float32)
        if iou.ndim != 2 or iou.shape[1] != len(self.label_names):
            raise EditError(f"Brushes: iou has shape {iou.shape}; expected [units, {len(self.label_names)}] "
                            "to match the label names")
        if levels.shape != (iou.shape[0],):
            raise EditError(f"Brushes: {levels.shape} levels for {iou.shape[0]} units; give one value per unit")
        object.__setattr__(self, "iou", iou)
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))

    @property
    def num_units(self) -> int:
        return int(self.iou.shape[0])

    @property
    def concepts(self) -> list[str]:
        """Concept names that can be painted (IoU columns 1..L-1)."""
        return list(self.label_names[1:])

    def ranking(self, concept: str) -> np.ndarray:
        """All units, best IoU for ``concept`` first (ties by unit number)."""
        try:
            col = lookup(self.label_names[1:], concept, "concept") + 1
        except InterventionError as e:
            raise EditError(str(e)) from None
        return np.argsort(-self.iou[:, col], kind="stable")

    def units(self, concept: str, strength: int | str = DEFAULT_STRENGTH) -> np.ndarray:
        """The top ``strength`` units of ``concept`` (``strength``: a count or 'low'/'med'/'high')."""
        n = _strength(strength)
        if n > self.num_units:
            raise EditError(f"strength {n} asks for {n} units but {self.layer} has {self.num_units}; "
                            f"use a strength of at most {self.num_units}")
        return self.ranking(concept)[:n]

    @classmethod
    def from_dissection(cls, dissection_dir: str, layer: str, label_names: Sequence[str] | None = None,
                        levels: np.ndarray | None = None) -> "Brushes":
        """Brushes of ``layer`` from a ``launch.dissect`` / ``jaxdissect.dissect`` output directory.

        Reads ``<layer>/arrays.npz`` (``iou``, ``thresholds``). Label names come
        from ``label_names`` or else from ``work/results/<layer>/result.json``.
        The paint values are the thresholds, which are the 0.99 quantiles only
        for a dissection at ``quantile=0.01``; for another quantile pass
        ``levels`` (e.g. ``jaxdissect.pipelines.intervene_generator.unit_quantile``).
        """
        layer_dir = os.path.join(dissection_dir, layer.replace("/", "_"))
        path = os.path.join(layer_dir, "arrays.npz")
        if not os.path.exists(path):
            found = sorted(d for d in os.listdir(dissection_dir)
                           if os.path.exists(os.path.join(dissection_dir, d, "arrays.npz"))) \
                if os.path.isdir(dissection_dir) else []
            raise EditError(f"no dissection of {layer!r} at {path}" +
                            (f" (dissected layers: {', '.join(found)})" if found else "") +
                            f"; dissect it first: python -m launch.dissect --model=... --layers={layer} "
                            f"--quantile=0.01 --output_dir={dissection_dir}")
        with np.load(path) as f:
            missing = [k for k in ("iou", "thresholds") if k not in f.files]
            if missing:
                raise EditError(f"{path} lacks {', '.join(missing)}; it is not a jaxdissect dissection")
            iou, thresholds = f["iou"], f["thresholds"]
        meta_path = os.path.join(dissection_dir, "work", "results", layer, "result.json")
        meta = {}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        if label_names is None:
            label_names = meta.get("label_names")
            if label_names is None:
                raise EditError(f"no label names for {path}: {meta_path} is missing; pass label_names= "
                                "(the segmenter's label_names)")
        if levels is None:
            q = (meta.get("config") or {}).get("quantile", 0.01)
            if abs(float(q) - 0.01) > 1e-9:
                raise EditError(f"{dissection_dir} was dissected at quantile {q}, so its thresholds are not the "
                                "0.99 quantiles GANPaint paints with; re-dissect with --quantile=0.01 or pass "
                                "levels=")
            levels = thresholds
        return cls(layer=layer, label_names=tuple(label_names), iou=iou, levels=levels)


def _strength(strength) -> int:
    if isinstance(strength, str):
        if strength not in STRENGTHS:
            raise EditError(f"unknown strength {strength!r}; use a unit count or one of {', '.join(STRENGTHS)}")
        return STRENGTHS[strength]
    n = int(strength)
    if n < 1 or n != strength:
        raise EditError(f"strength must be a positive number of units (4, 10, 15), got {strength!r}")
    return n


# --------------------------------------------------------------------------
# Strokes


@dataclasses.dataclass(frozen=True)
class Stroke:
    """Paint (or, with ``erase=True``, remove) ``concept`` inside ``mask``.

    ``mask``: float ``[H, W]`` (or per image ``[N, H, W]``) in [0, 1] at any
    canvas resolution (GANPaint's is 32x32); bool masks are fine.
    ``strength``: how many of the concept's top units (4, 10 or 15, or
    'low'/'med'/'high').
    """

    concept: str
    mask: Any
    erase: bool = False
    strength: int | str = DEFAULT_STRENGTH


def paint(module, variables, x, concept: str, mask, brushes: Brushes, *, strength=DEFAULT_STRENGTH, **kwargs):
    """One painting stroke: :func:`apply_strokes` with ``[Stroke(concept, mask, strength=strength)]``."""
    return apply_strokes(module, variables, x, [Stroke(concept, mask, False, strength)], brushes, **kwargs)


def erase(module, variables, x, concept: str, mask, brushes: Brushes, *, strength=DEFAULT_STRENGTH, **kwargs):
    """One erasing stroke: :func:`apply_strokes` with ``[Stroke(concept, mask, erase=True, ...)]``."""
    return apply_strokes(module, variables, x, [Stroke(concept, mask, True, strength)], brushes, **kwargs)


def pool_mask(mask, size: tuple[int, int], pool: str = "max") -> np.ndarray:
    """Adaptive max (or mean) pooling of ``[..., H, W]`` masks to ``size`` (PyTorch's bin edges)."""
    mask = np.asarray(mask, np.float32)
    H, W = mask.shape[-2:]
    h, w = size
    if pool not in ("max", "mean"):
        raise EditError(f"pool must be 'max' or 'mean', got {pool!r}")
    reduce = np.max if pool == "max" else np.mean
    out = np.empty(mask.shape[:-2] + (h, w), np.float32)
    for i in range(h):
        r0, r1 = (i * H) // h, -((-(i + 1) * H) // h)
        for j in range(w):
            c0, c1 = (j * W) // w, -((-(j + 1) * W) // w)
            out[..., i, j] = reduce(mask[..., r0:r1, c0:c1], axis=(-2, -1))
    return out


def _check_mask(mask, n: int, i: int) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype == bool:
        m = m.astype(np.float32)
    if not np.issubdtype(m.dtype, np.number):
        raise EditError(f"stroke {i}: mask must be a numeric or bool array, got dtype {m.dtype}")
    m = m.astype(np.float32)
    if m.ndim == 2:
        m = np.broadcast_to(m, (n,) + m.shape)
    elif m.ndim != 3 or m.shape[0] != n:
        raise EditError(f"stroke {i}: mask of shape {m.shape}; give [H, W] or one per image [{n}, H, W]")
    if not np.all(np.isfinite(m)) or m.min() < 0 or m.max() > 1:
        raise EditError(f"stroke {i}: mask values must lie in [0, 1] (got {m.min():.3g}..{m.max():.3g})")
    return m


def stroke_arrays(strokes: Sequence[Stroke], brushes: Brushes, n: int, size: tuple[int, int], pool: str = "max"):
    """``(units [S, U], values [S, U], alpha [S, N, h, w])`` of ``strokes`` for a layer of spatial ``size``."""
    if isinstance(strokes, Stroke):
        strokes = [strokes]
    strokes = list(strokes)
    u = brushes.num_units
    units = np.zeros((len(strokes), u), np.float32)
    values = np.zeros((len(strokes), u), np.float32)
    alpha = np.zeros((len(strokes), n) + tuple(size), np.float32)
    for i, s in enumerate(strokes):
        if not isinstance(s, Stroke):
            raise EditError(f"stroke {i} is a {type(s).__name__}; give jaxdissect.editing.Stroke objects")
        chosen = brushes.units(s.concept, s.strength)
        units[i, chosen] = 1.0
        if not s.erase:
            values[i, chosen] = brushes.levels[chosen]
        alpha[i] = pool_mask(_check_mask(s.mask, n, i), size, pool)
    return units, values, alpha


def compose(x, units, values, alpha):
    """GANPaint's "over" composition of strokes applied to a layer output ``x [N, h, w, U]``.

    ``units``/``values`` ``[S, U]``, ``alpha`` ``[S, N, h, w]``; strokes later in
    the list are on top. Returns ``x (1 - A) + V A``.
    """
    acc_a = jnp.zeros_like(x)
    acc_v = jnp.zeros_like(x)
    for i in range(units.shape[0]):
        a = alpha[i][..., None] * units[i]
        new_a = 1 - (1 - acc_a) * (1 - a)
        blend = acc_v * acc_a * (1 - a) + values[i] * a
        acc_v = jnp.where(new_a > 0, blend / jnp.where(new_a > 0, new_a, 1), 0)
        acc_a = new_a
    return x * (1 - acc_a) + acc_v * acc_a


# --------------------------------------------------------------------------
# Rendering


def latent_like(module, n: int = 1):
    """A ``ShapeDtypeStruct`` of ``n`` latents for a generator with ``sizes`` (ProGAN) or ``latent`` (toy)."""
    if hasattr(module, "sizes"):
        return jax.ShapeDtypeStruct((n, int(module.sizes[0])), jnp.float32)
    if hasattr(module, "latent"):
        return jax.ShapeDtypeStruct((n, int(module.latent)), jnp.float32)
    raise EditError(f"cannot tell the latent size of {type(module).__name__}; give z [N, Z] instead of a "
                    "stored representation, or a generator with a 'sizes' or 'latent' attribute")


def scale_maps(maps: dict, region):
    """Edits ``layer -> a (1 + s (1 - region resized to the layer))`` for adaptation maps ``s``."""
    def edit(s):
        def f(a):
            if region is None:
                return a * (1 + s)
            r = jax.image.resize(region, (region.shape[0],) + a.shape[1:3], "linear")
            return a * (1 + s * (1 - jnp.clip(r, 0, 1))[..., None])
        return f
    return {name: edit(s) for name, s in maps.items()}


@functools.lru_cache(maxsize=64)
def _render_fn(module, layer: str, from_z: bool, maps: tuple, x_aval):
    def render(variables, x, units, values, alpha, adapt_maps, region):
        if from_z:
            def edit(a):
                return compose(a, units, values, alpha)
            inp = x
        else:
            def edit(a):
                return compose(jnp.asarray(x, a.dtype), units, values, alpha)
            inp = jnp.zeros(x_aval.shape, x_aval.dtype)
        edits = {layer: edit}
        edits.update(scale_maps(adapt_maps, region))
        return layer_api.run(module, variables, inp, edits=edits)

    return jax.jit(render)


def layer_size(module, variables, layer: str, n: int = 1):
    """``(h, w, units)`` of ``layer``'s output for latents (errors name the known layers)."""
    shapes = layer_api.layer_shapes(module, variables, latent_like(module, n))
    if layer not in shapes:
        raise EditError(f"unknown layer {layer!r}; {type(module).__name__} has {', '.join(shapes)}")
    return tuple(int(d) for d in shapes[layer].shape[1:])


def apply_strokes(module, variables, x, strokes: Sequence[Stroke], brushes: Brushes, *, layer: str | None = None,
                  pool: str = "max", adaptation=None):
    """Render ``strokes`` applied at ``layer`` (default ``brushes.layer``): images ``[N, H, W, 3]``.

    ``x``: latents z ``[N, Z]`` or a stored representation of ``layer``
    ``[N, h, w, U]`` (``jaxdissect.editing.invert(...).representation``).
    ``adaptation``: an ``Adaptation`` from ``jaxdissect.editing.adapt``; its
    maps are switched off inside the union of the strokes' masks (resized to
    each adapted layer), as GANPaint Studio does. No strokes renders the
    plain (or adapted) reconstruction.
    """
    layer = layer or brushes.layer
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    n = int(x.shape[0])
    if x.ndim == 2:
        h, w, u = layer_size(module, variables, layer, n)
        from_z, aval = True, None
    elif x.ndim == 4:
        h, w, u = (int(d) for d in x.shape[1:])
        aval = latent_like(module, n)
        from_z = False
    else:
        raise EditError(f"x must be latents [N, Z] or a {layer} representation [N, h, w, U], got {tuple(x.shape)}")
    if u != brushes.num_units:
        raise EditError(f"{layer} has {u} units but the brushes are for {brushes.num_units} ({brushes.layer}); "
                        "use brushes from a dissection of this layer")
    strokes = [strokes] if isinstance(strokes, Stroke) else list(strokes)
    units, values, alpha = stroke_arrays(strokes, brushes, n, (h, w), pool)
    maps, region = {}, None
    if adaptation is not None:
        maps = dict(adaptation.maps)
        if strokes:
            canvases = [_check_mask(s.mask, n, i) for i, s in enumerate(strokes)]
            size = max((c.shape[1:] for c in canvases), key=lambda s: s[0] * s[1])
            region = np.max([np.asarray(jax.image.resize(c, (n,) + size, "linear")) for c in canvases], axis=0)
            region = jnp.asarray(np.clip(region, 0, 1))
    fn = _render_fn(module, layer, from_z, tuple(sorted(maps)), aval)
    return fn(variables, x, jnp.asarray(units), jnp.asarray(values), jnp.asarray(alpha), maps, region)
