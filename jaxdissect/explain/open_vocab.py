"""Open-vocabulary unit labels: CLIP-Dissect's similarity functions (Oikarinen & Weng, ICLR 2023).

Every function takes ``clip_feats [images, concepts]`` (how much each concept
is present in each probe image: CLIP image-text cosine similarities from
:func:`concept_activations`, or any other images x concepts matrix, e.g.
Broden presence or pixel fractions) and ``target_feats [images, units]`` (one
pooled activation per image and unit: spatial mean of a feature map, CLS token
of a transformer, raw value of a dense layer) and returns ``[units, concepts]``
scores; a unit's label is the concept with the highest score
(:func:`best_concepts`). Argument order and defaults are CLIP-Dissect's:

* :func:`soft_wpmi` (the default; top_k=100, a=10, lam=1, min_prob=1e-7,
  p_start=0.998, p_end=0.97): ``P = softmax(a * clip_feats)`` over concepts;
  for the unit's top-k images, with weights ``p_i = p_start - i / k *
  (p_start - p_end)`` by rank ``i``, ``s[u, c] = sum_i log(1 + p_i (P[i, c] - 1)
  + min_prob)``; the score is ``s - lam * (logsumexp_u s[u, c] - log U)``.
* :func:`wpmi` (top_k=28, a=2, lam=0.6): the same with ``p_i = 1``.
* :func:`cos_similarity`: cosine over images of each unit's and concept's column.
* :func:`cos_similarity_cubed` (min_norm=1e-3): columns mean-centred, cubed,
  divided by ``max(norm, min_norm)``, then the dot product.
* :func:`rank_reorder` (p=3, top_fraction=0.05, scale_p=0.5): over the unit's
  top ``int(images * top_fraction)`` images, how far the unit's activations are
  from the same activations reordered by the concept's ranking
  (``mean |act - reordered|^p``), relative to a baseline and divided by the
  concept's mean value there to the power ``scale_p``; the score is minus that.

Where we differ from the published code, on purpose:

* ties are broken by the lower image index, everywhere (``top_k``, ranks);
  PyTorch's ``topk`` leaves the order of ties unspecified;
* ``rank_reorder``'s baseline is the exact expectation of ``|act_i -
  act_sigma(i)|^p`` over a uniformly random permutation ``sigma`` (the mean over
  all pairs), where the original averages five random permutations: the score
  is then deterministic, and the original's is a noisy estimate of it;
* ``cos_similarity`` scores an all-zero column (a dead unit) 0, not NaN;
* soft-WPMI's ``1 + p (P - 1)`` is computed as ``(1 - p) + p P``, which equals it
  and keeps small probabilities in float32.

Computation: jit-compiled, exact ``lax.top_k``, float32 with the highest matmul
precision, in fixed tiles of units x concepts (``Uc x Cb``, chosen from the
problem size and a memory budget, never from the device count), so memory is
bounded by the inputs, the ``[units, concepts]`` output and one tile: at
50,000 images x 20,000 concepts no images x concepts softmax is ever formed
(soft-WPMI normalises only the unit's top-k rows, with per-image
log-sum-exps gathered once). The tiles are spread over the devices of a mesh
(``jaxdissect.parallel.make_mesh``), ``shard='concepts'`` (``clip_feats``
split by columns; the default) or ``shard='units'`` (``target_feats`` split,
``clip_feats`` on every device). Every cross-tile reduction runs over fixed-size
partial results in a fixed order, so 1 and 8 devices give identical results.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdissect import parallel
from jaxdissect.errors import JaxDissectError

__all__ = [
    "SIMILARITIES",
    "OpenVocabError",
    "best_concepts",
    "concept_activations",
    "cos_similarity",
    "cos_similarity_cubed",
    "label_units",
    "pooled_units",
    "rank_reorder",
    "similarity",
    "soft_wpmi",
    "wpmi",
]

AXIS = parallel.AXIS
SHARDS = ("concepts", "units")
# Tile sizes (module settings; tests shrink them to run many tiles): the largest per-tile
# intermediate has about TILE_ELEMENTS float32 elements (2**24: 64 MiB), a concept block at most
# MAX_CONCEPT_BLOCK columns.
TILE_ELEMENTS = 1 << 24
MAX_CONCEPT_BLOCK = 1024
_HIGHEST = lax.Precision.HIGHEST


class OpenVocabError(JaxDissectError, ValueError):
    """Inputs of an open-vocabulary scorer that do not fit; the message says what to change."""


# --------------------------------------------------------------------------
# Inputs


def _check_inputs(clip_feats, target_feats, fn: str) -> tuple[np.ndarray, np.ndarray]:
    clip_feats = np.asarray(clip_feats, np.float32)
    target_feats = np.asarray(target_feats, np.float32)
    if clip_feats.ndim != 2 or target_feats.ndim != 2:
        raise OpenVocabError(
            f"{fn}: clip_feats must be [images, concepts] and target_feats [images, units], got shapes "
            f"{clip_feats.shape} and {target_feats.shape}; pool each unit to one value per image first")
    if clip_feats.shape[0] != target_feats.shape[0]:
        raise OpenVocabError(
            f"{fn}: clip_feats has {clip_feats.shape[0]} images but target_feats has {target_feats.shape[0]}; "
            "both must hold the same probe images in the same order")
    if 0 in clip_feats.shape or 0 in target_feats.shape:
        raise OpenVocabError(f"{fn}: empty input, clip_feats {clip_feats.shape}, target_feats {target_feats.shape}")
    # -0.0 + 0.0 is 0.0: lax.top_k ranks -0.0 below 0.0, and they must tie (and XLA drops a "+ 0" inside jit).
    return clip_feats, target_feats + np.float32(0)


def _check_top_k(top_k: int, images: int, fn: str, what: str = "top_k") -> int:
    if not 1 <= int(top_k) <= images:
        raise OpenVocabError(
            f"{fn}: {what}={top_k} but there are {images} probe images; use 1 <= {what} <= {images} "
            "(or probe with more images)")
    return int(top_k)


def _mesh_and_shard(mesh, shard: str):
    if shard not in SHARDS:
        raise OpenVocabError(f"shard={shard!r}: choose 'concepts' or 'units'")
    return (parallel.make_mesh() if mesh is None else mesh), shard


# --------------------------------------------------------------------------
# Tiled, sharded driver


def _tiles(per_pair: int, units: int, concepts: int) -> tuple[int, int]:
    """``(Uc, Cb)``: a concept block of up to 1024 and as many units as fit ``TILE_ELEMENTS``.

    ``per_pair`` is the number of intermediate elements a (unit, concept) pair
    needs (``top_k`` for WPMI, 1 for the cosines ...). Depends on the
    problem only, never on the devices, so the tiles (and results) are the
    same on any mesh.
    """
    cb = min(concepts, MAX_CONCEPT_BLOCK)
    uc = max(1, min(units, TILE_ELEMENTS // max(1, per_pair * cb)))
    return uc, cb


def _pad_columns(x: np.ndarray, width: int) -> np.ndarray:
    return x if x.shape[1] == width else np.pad(x, ((0, 0), (0, width - x.shape[1])))


def _run(kind: str, clip_feats, target_feats, params: tuple, per_pair: int, mesh, shard: str) -> np.ndarray:
    concepts = clip_feats.shape[1]
    units = target_feats.shape[1]
    uc, cb = _tiles(per_pair, units, concepts)
    d = mesh.size
    dc, du = (d, 1) if shard == "concepts" else (1, d)
    cp = -(-concepts // (cb * dc)) * cb * dc
    up = -(-units // (uc * du)) * uc * du
    spec_c = P(None, AXIS) if shard == "concepts" else P()
    spec_t = P(None, AXIS) if shard == "units" else P()
    clip_d = jax.device_put(_pad_columns(clip_feats, cp), NamedSharding(mesh, spec_c))
    target_d = jax.device_put(_pad_columns(target_feats, up), NamedSharding(mesh, spec_t))
    fn = _compiled(kind, params, mesh, shard, uc, cb, units, concepts)
    if kind != "wpmi":
        return np.asarray(fn(clip_d, target_d))[:units, :concepts]
    s, prob_d = fn(clip_d, target_d)
    # On the host: inside XLA the multiply-subtract may or may not become one fused multiply-add,
    # depending on the program (so on the device count).
    lam = np.float32(params[2])
    return np.asarray(s)[:units, :concepts] - lam * np.asarray(prob_d)[None, :concepts]


@functools.lru_cache(maxsize=64)
def _compiled(kind: str, params: tuple, mesh, shard: str, uc: int, cb: int, units: int, concepts: int):
    """The jitted ``shard_map`` of one scorer: ``(clip [N, Cp], target [N, Up]) -> [Up, Cp]``.

    WPMI returns ``(s [Up, Cp], log P(c) [Cp])``; :func:`_run` subtracts ``lam`` times the latter.
    """
    body = functools.partial(_BODIES[kind], params=params, shard=shard, uc=uc, cb=cb, units=units,
                             concepts=concepts)
    spec_c = P(None, AXIS) if shard == "concepts" else P()
    spec_t = P(None, AXIS) if shard == "units" else P()
    out = P(None, AXIS) if shard == "concepts" else P(AXIS, None)
    if kind == "wpmi":  # (s, log P(concept)): the latter a row over concepts
        out = (out, P(AXIS) if shard == "concepts" else P())
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec_c, spec_t), out_specs=out, check_vma=False))


def _offsets(clip, target, shard: str):
    """Global index of the first local concept column and the first local unit column."""
    i = lax.axis_index(AXIS)
    return (i * clip.shape[1], 0) if shard == "concepts" else (0, i * target.shape[1])


def _over_blocks(fn, clip, target, uc: int, cb: int, prepare=lambda block: block):
    """``fn(j, block)`` over every local tile (unit chunk ``j``, concept block) -> ``[ncl, nul, ...]``.

    ``block`` is ``prepare(clip[:, i*cb:(i+1)*cb])``; ``fn`` returns a pytree of
    per-tile results (``[Uc, Cb]`` scores, ``[Cb]`` partials). Concept blocks
    are the outer loop, so each is sliced and prepared once.
    """
    ncl = clip.shape[1] // cb
    nul = target.shape[1] // uc

    def per_block(i):
        block = prepare(lax.dynamic_slice_in_dim(clip, i * cb, cb, axis=1))
        return lax.map(lambda j: fn(j, block), jnp.arange(nul))

    return lax.map(per_block, jnp.arange(ncl))


def _tile_matrix(t, uc: int, cb: int):
    """``[ncl, nul, Uc, Cb]`` tiles -> ``[nul*Uc, ncl*Cb]``."""
    ncl, nul = t.shape[:2]
    return t.transpose(1, 2, 0, 3).reshape(nul * uc, ncl * cb)


def _combine_lse(maxes, sums):
    """Sequential log-sum-exp of partials ``[B, ...]`` (max, sum of exp(x - max)) in block order.

    A fixed order over fixed-size partials: identical however the partials
    were spread over devices. Empty partials (max ``-inf``, sum 0) add nothing.
    """
    def step(carry, part):
        m, s = carry
        pm, ps = part
        new = jnp.maximum(m, pm)
        safe = jnp.where(jnp.isfinite(new), new, 0.0)
        s = s * jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf)) + \
            ps * jnp.exp(jnp.where(jnp.isfinite(pm), pm - safe, -jnp.inf))
        return (new, s), None

    init = (jnp.full(maxes.shape[1:], -jnp.inf, maxes.dtype), jnp.zeros(sums.shape[1:], sums.dtype))
    (m, s), _ = lax.scan(step, init, (maxes, sums))
    return m + jnp.log(s)


def _partial_lse(x, valid, axis: int):
    """Max and sum of ``exp(x - max)`` along ``axis`` over ``valid`` entries (``-inf``, 0 when none)."""
    x = jnp.where(valid, x, -jnp.inf)
    m = jnp.max(x, axis=axis)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    return m, jnp.sum(jnp.exp(x - jnp.expand_dims(safe, axis)), axis=axis)


def _gather_blocks(x, shard: str, along: str):
    """All partials ``[B_local, ...]`` -> ``[B, ...]`` when ``along`` is the sharded axis."""
    return lax.all_gather(x, AXIS, axis=0, tiled=True) if shard == along else x


def _unit_chunk(target, j, uc: int):
    return lax.dynamic_slice_in_dim(target, j * uc, uc, axis=1)


def _wpmi_body(clip, target, *, params, shard, uc, cb, units, concepts):
    top_k, a, _, min_prob, p_start, p_end = params
    c0, u0 = _offsets(clip, target, shard)
    col_valid = lambda i: (c0 + i * cb + jnp.arange(cb)) < concepts  # noqa: E731

    # Per-image log-sum-exp of a * clip over all concepts, from per-block partials.
    def row_partials(i):
        block = lax.dynamic_slice_in_dim(clip, i * cb, cb, axis=1)
        return _partial_lse(a * block, col_valid(i)[None, :], axis=1)

    maxes, sums = lax.map(row_partials, jnp.arange(clip.shape[1] // cb))
    lse = _combine_lse(_gather_blocks(maxes, shard, "concepts"), _gather_blocks(sums, shard, "concepts"))

    inds = lax.map(lambda j: lax.top_k(_unit_chunk(target, j, uc).T, top_k)[1],
                   jnp.arange(target.shape[1] // uc))  # [nul, Uc, k]
    soft = (p_start, p_end) != (1.0, 1.0)
    w = (p_start - jnp.arange(top_k, dtype=jnp.float32) / top_k * (p_start - p_end))[None, :, None]

    def tile(j, block):
        rows = inds[j]
        logp = a * block[rows] - lse[rows][..., None]  # [Uc, k, Cb]
        prob = jnp.exp(logp)
        s = jnp.sum(jnp.log(((1.0 - w) + w * prob if soft else prob) + min_prob), axis=1)  # [Uc, Cb]
        unit_valid = (u0 + j * uc + jnp.arange(uc)) < units
        return s, _partial_lse(s, unit_valid[:, None], axis=0)

    s, (pm, ps) = _over_blocks(tile, clip, target, uc, cb)
    # Partials over unit chunks: [ncl, nul, Cb] -> [nul, ncl*Cb], gathered over units when sharded so.
    pm = pm.transpose(1, 0, 2).reshape(pm.shape[1], -1)
    ps = ps.transpose(1, 0, 2).reshape(ps.shape[1], -1)
    prob_d = _combine_lse(_gather_blocks(pm, shard, "units"), _gather_blocks(ps, shard, "units")) - jnp.log(
        jnp.float32(units))
    return _tile_matrix(s, uc, cb), prob_d


def _column_stats(x, center: bool, cube: bool, min_norm: float):
    """Columns prepared for a cosine: optionally centred over images and cubed, then unit-normalised."""
    if center:
        x = x - jnp.mean(x, axis=0, keepdims=True)
    if cube:
        x = x ** 3
    norm = jnp.sqrt(jnp.sum(x * x, axis=0, keepdims=True))
    if min_norm > 0:
        return x / jnp.maximum(norm, min_norm)
    return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1.0), 0.0)


def _cos_body(clip, target, *, params, shard, uc, cb, units, concepts):
    center, cube, min_norm = params
    del units, concepts

    prep = functools.partial(_column_stats, center=center, cube=cube, min_norm=min_norm)
    units_prepared = lax.map(lambda j: prep(_unit_chunk(target, j, uc)), jnp.arange(target.shape[1] // uc))

    def tile(j, block):
        return jnp.matmul(units_prepared[j].T, block, precision=_HIGHEST)

    return _tile_matrix(_over_blocks(tile, clip, target, uc, cb, prep), uc, cb)


def _rank_body(clip, target, *, params, shard, uc, cb, units, concepts):
    top_n, p, scale_p = params
    del units, concepts

    def unit_prep(j):
        vals, inds = lax.top_k(_unit_chunk(target, j, uc).T, top_n)  # [Uc, n], descending
        # Expected |v_i - v_sigma(i)|^p over a uniform random permutation: the mean over all pairs.
        base = jnp.mean(jnp.abs(vals[:, :, None] - vals[:, None, :]) ** p, axis=(1, 2))
        return vals, inds, base

    vals, inds, base = lax.map(unit_prep, jnp.arange(target.shape[1] // uc))

    def tile(j, block):
        v, rows = vals[j], inds[j]
        x = jnp.swapaxes(block[rows], 1, 2)  # [Uc, Cb, n]
        # The original reorders the activations by the concept's ranks, reorg[i] = ascending[rank[i]], and
        # averages |v[i] - reorg[i]|^p; summed in rank order instead it needs one sort, not two:
        # sum_r |v[order[r]] - ascending[r]|^p with order = argsort(x) (stable: ties by lower index).
        order = jnp.argsort(x, axis=-1, stable=True)
        v_by_rank = jnp.take_along_axis(jnp.broadcast_to(v[:, None, :], x.shape), order, axis=-1)
        err = jnp.mean(jnp.abs(v_by_rank - v[:, None, ::-1]) ** p, axis=-1) / base[j][:, None]
        return -(err / jnp.mean(x, axis=-1) ** scale_p)

    return _tile_matrix(_over_blocks(tile, clip, target, uc, cb), uc, cb)


_BODIES = {"wpmi": _wpmi_body, "cos": _cos_body, "rank": _rank_body}


# --------------------------------------------------------------------------
# The similarity functions


def soft_wpmi(clip_feats, target_feats, top_k=100, a=10, lam=1, min_prob=1e-7, p_start=0.998, p_end=0.97, *,
              mesh=None, shard="concepts") -> np.ndarray:
    """CLIP-Dissect's default score (soft weighted pointwise mutual information): ``[units, concepts]``.

    ``clip_feats [images, concepts]``, ``target_feats [images, units]``; see the
    module docstring for the formula. ``mesh`` (default: all devices) and
    ``shard`` (``'concepts'`` or ``'units'``) spread the work.
    """
    clip_feats, target_feats = _check_inputs(clip_feats, target_feats, "soft_wpmi")
    top_k = _check_top_k(top_k, clip_feats.shape[0], "soft_wpmi")
    mesh, shard = _mesh_and_shard(mesh, shard)
    params = (top_k, float(a), float(lam), float(min_prob), float(p_start), float(p_end))
    return _run("wpmi", clip_feats, target_feats, params, top_k, mesh, shard)


def wpmi(clip_feats, target_feats, top_k=28, a=2, lam=0.6, min_prob=1e-7, *, mesh=None,
         shard="concepts") -> np.ndarray:
    """Weighted pointwise mutual information: :func:`soft_wpmi` with every top-k image weighted 1."""
    clip_feats, target_feats = _check_inputs(clip_feats, target_feats, "wpmi")
    top_k = _check_top_k(top_k, clip_feats.shape[0], "wpmi")
    mesh, shard = _mesh_and_shard(mesh, shard)
    params = (top_k, float(a), float(lam), float(min_prob), 1.0, 1.0)
    return _run("wpmi", clip_feats, target_feats, params, top_k, mesh, shard)


def cos_similarity(clip_feats, target_feats, *, mesh=None, shard="concepts") -> np.ndarray:
    """Cosine similarity over images between each unit's and each concept's column (0 for an all-zero column)."""
    clip_feats, target_feats = _check_inputs(clip_feats, target_feats, "cos_similarity")
    mesh, shard = _mesh_and_shard(mesh, shard)
    return _run("cos", clip_feats, target_feats, (False, False, 0.0), 1, mesh, shard)


def cos_similarity_cubed(clip_feats, target_feats, min_norm=1e-3, *, mesh=None, shard="concepts") -> np.ndarray:
    """Columns mean-centred over images and cubed, then cosine with norms clipped below at ``min_norm``."""
    clip_feats, target_feats = _check_inputs(clip_feats, target_feats, "cos_similarity_cubed")
    if not min_norm > 0:
        raise OpenVocabError(f"cos_similarity_cubed: min_norm={min_norm} must be positive")
    mesh, shard = _mesh_and_shard(mesh, shard)
    return _run("cos", clip_feats, target_feats, (True, True, float(min_norm)), 1, mesh, shard)


def rank_reorder(clip_feats, target_feats, p=3, top_fraction=0.05, scale_p=0.5, *, mesh=None,
                 shard="concepts") -> np.ndarray:
    """Minus the reordering error of the unit's top images under the concept's ranking (see module docstring).

    ``clip_feats`` must be positive where a unit's top images are (its mean
    there is raised to ``scale_p``), as CLIP similarities are.
    """
    clip_feats, target_feats = _check_inputs(clip_feats, target_feats, "rank_reorder")
    images = clip_feats.shape[0]
    top_n = int(images * top_fraction)
    _check_top_k(top_n, images, "rank_reorder", what=f"int(images * top_fraction) = int({images} * {top_fraction})")
    mesh, shard = _mesh_and_shard(mesh, shard)
    return _run("rank", clip_feats, target_feats, (top_n, float(p), float(scale_p)), top_n * 4, mesh, shard)


SIMILARITIES = {"soft_wpmi": soft_wpmi, "wpmi": wpmi, "cos_similarity": cos_similarity,
                "cos_similarity_cubed": cos_similarity_cubed, "rank_reorder": rank_reorder}


def similarity(name: str):
    """The similarity function called ``name`` (one of :data:`SIMILARITIES`)."""
    try:
        return SIMILARITIES[name]
    except KeyError:
        raise OpenVocabError(f"unknown similarity function {name!r}; choose one of {', '.join(SIMILARITIES)}") from None


# --------------------------------------------------------------------------
# Around the scores


def concept_activations(image_embeddings, text_embeddings) -> np.ndarray:
    """CLIP-Dissect's ``clip_feats``: cosine similarity ``[images, concepts]`` of image and text embeddings.

    Both are L2-normalised along their last axis first (no logit scale), as
    the original does before its similarity functions.
    """
    img = np.asarray(image_embeddings, np.float32)
    txt = np.asarray(text_embeddings, np.float32)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise OpenVocabError(
            f"image embeddings {img.shape} and text embeddings {txt.shape} must be [images, D] and [concepts, D] "
            "of the same model")
    return np.asarray(_normalised_matmul(jnp.asarray(img), jnp.asarray(txt)))


@jax.jit
def _normalised_matmul(img, txt):
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return jnp.matmul(img, txt.T, precision=_HIGHEST)


def pooled_units(activation):
    """One value per image and unit, CLIP-Dissect's ``pool_mode='avg'``: ``[B, U]`` from any layer.

    A feature map ``[B, H, W, U]`` (a CNN's, or a ViT layer laid on its patch
    grid) gives its spatial mean; tokens ``[B, T, U]`` give the CLS token
    (CLIP-Dissect's choice for a ViT; jaxdissect's ``<block>.residual_cls``
    layers are that token already); ``[B, U]`` passes unchanged. Jit-friendly.
    """
    ndim = getattr(activation, "ndim", None)
    if ndim == 4:
        return jnp.mean(activation, axis=(1, 2))
    if ndim == 3:
        return activation[:, 0]
    if ndim == 2:
        return activation
    raise OpenVocabError(f"cannot pool an activation of shape {tuple(getattr(activation, 'shape', ()))} to "
                         "[images, units]; give a [B, H, W, U] map, [B, T, U] tokens or [B, U] values")


def label_units(clip_feats, target_feats, concepts: Sequence[str], similarity_fn: str = "soft_wpmi", top: int = 5,
                **kwargs) -> dict:
    """Score every unit against every concept and keep each unit's best ``top`` concepts.

    Returns ``{"similarity": name, "label": [U] names, "index": [U], "score": [U],
    "top_index": [U, top], "top_score": [U, top]}`` (``top_*`` best first, ties
    to the lower concept index); ``kwargs`` go to the similarity function.
    """
    if len(concepts) != np.shape(clip_feats)[-1]:
        raise OpenVocabError(f"{len(concepts)} concept names for clip_feats with {np.shape(clip_feats)[-1]} columns")
    scores = similarity(similarity_fn)(clip_feats, target_feats, **kwargs)
    top = min(top, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    names, index, best = best_concepts(scores, concepts)
    return {"similarity": similarity_fn, "label": names, "index": index, "score": best, "top_index": order,
            "top_score": np.take_along_axis(scores, order, axis=1)}


def best_concepts(scores, concepts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Each unit's label from ``scores [units, concepts]``: ``(names, concept indices, scores)``.

    Ties go to the lower concept index.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(concepts):
        raise OpenVocabError(f"scores of shape {scores.shape} do not match {len(concepts)} concept names")
    index = np.argmax(scores, axis=1)
    return [concepts[i] for i in index], index, scores[np.arange(len(index)), index]
