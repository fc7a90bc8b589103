"""Could this IoU have happened by chance? Permutation p-values, BH control and bootstrap intervals.

Null of no association: images are exchangeable, so the unit's mask of image
j is moved to image ``perm[j]`` (positions inside an image are kept) while
the concept masks stay. A unit that fires along the image border keeps doing
so under the null, so border-matching labels (quadrant parts) get a null
IoU as high as their chance level instead of looking significant.

* :func:`label_significance`: statistic = the unit's best-label IoU (max over
  all concepts under the same permutation), so the p-value of the chosen
  label accounts for choosing it among L concepts. Monte Carlo with
  ``permutations`` draws: ``p = (1 + #{null >= observed}) / (1 + permutations)``.
* :func:`mask_significance`: the same test for one given mask per unit (e.g.
  the unit's formula mask); it does not account for how the mask was found.
* :func:`benjamini_hochberg`: FDR control across all tested pairs.
* :func:`bootstrap_iou`: percentile interval of the dataset IoU, resampling images.

Masks are boolean ``[M, N * P]`` or :class:`~jaxdissect.explain.packed.ImageMasks`
(bit-packed per image, non-empty images only); concepts are kept as a
per-image table of the concepts present, so absent concepts cost nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.explain.packed import ImageMasks

_PERM_CHUNK = 8       # permutations evaluated together (memory: chunk x images x concepts per image x words)


def _per_image(masks, num_images, what) -> ImageMasks:
    if isinstance(masks, ImageMasks):
        if masks.num_images != num_images:
            raise ValueError(f"{what} cover {masks.num_images} images, not num_images={num_images}")
        return masks
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != bool:
        raise ValueError(f"{what} must be boolean [masks, pixels], got {masks.dtype} {masks.shape}")
    if num_images < 1 or masks.shape[1] % num_images:
        raise ValueError(f"{what} have {masks.shape[1]} pixels, not a multiple of num_images={num_images}")
    return ImageMasks.from_dense(masks, num_images)


def _concept_table(masks: ImageMasks):
    """Per-image blocks ``[N, C, W]`` of the concepts present and their ids ``[N, C]``.

    ``C`` is the most concepts present in one image; empty slots are zero
    blocks with id L. Ids are also returned flattened in sorted order with
    the permutation that sorts them, for a sorted segment sum.
    """
    num_concepts, num_images, words = masks.num_masks, masks.num_images, masks.words_per_image
    per_image = np.bincount(masks.image_ids, minlength=num_images)
    width = max(1, int(per_image.max(initial=0)))
    order = np.lexsort((masks.mask_ids, masks.image_ids))           # by image, then concept
    img, con = masks.image_ids[order], masks.mask_ids[order]
    slot = np.arange(len(order)) - np.concatenate([[0], np.cumsum(per_image)])[img]
    blocks = np.zeros((num_images, width, words), np.uint32)
    concept = np.full((num_images, width), num_concepts, np.int32)
    blocks[img, slot] = masks.words[order]
    concept[img, slot] = con
    order = np.argsort(concept.reshape(-1), kind="stable").astype(np.int32)
    return jnp.asarray(blocks), jnp.asarray(order), jnp.asarray(concept.reshape(-1)[order])


@functools.partial(jax.jit, static_argnames=("num_concepts",))
def _permuted_intersections(unit, blocks, order, sorted_ids, inverse_perms, *, num_concepts):
    """``[T, L]``: ``sum_i |unit at image inverse_perms[t, i] & concept c at image i|`` per permutation t.

    The concept blocks stay in place and the unit's images move, so the
    segment pattern is fixed and summed once for all T permutations.
    """
    def chunk(perms):
        moved = unit[perms]                                        # [t, N, W]
        n = jax.lax.population_count(moved[:, :, None, :] & blocks[None]).astype(jnp.int32).sum(-1)
        n = n.reshape(n.shape[0], -1).T[order]                     # [N * C, t], sorted by concept
        return jax.ops.segment_sum(n, sorted_ids, num_concepts + 1, indices_are_sorted=True)[:num_concepts].T

    t, num_images = inverse_perms.shape
    out = jax.lax.map(chunk, inverse_perms.reshape(t // _PERM_CHUNK, _PERM_CHUNK, num_images))
    return out.reshape(t, num_concepts)


def _null_test(units: ImageMasks, targets: ImageMasks, num_images, permutations, seed, best_of_all):
    if units.positions != targets.positions:
        raise ValueError(f"unit masks have {units.positions} positions per image but the other masks "
                         f"{targets.positions}; both must be over the same images and positions")
    blocks, order, sorted_ids = _concept_table(targets)
    num_targets = targets.num_masks
    a = units.counts
    n = targets.counts
    rng = np.random.default_rng(seed)
    ident = np.arange(num_images, dtype=np.int32)[None]
    out = {"iou": [], "label": [], "p_value": [], "null_mean": [], "null_95": []}
    for u in range(units.num_masks):
        pad = -(permutations + 1) % _PERM_CHUNK
        perms = rng.permuted(np.repeat(ident, permutations, 0), axis=1)
        perms = jnp.asarray(np.concatenate([ident, perms] + [ident] * pad))
        inter = np.asarray(_permuted_intersections(jnp.asarray(units.dense_words(u)), blocks, order, sorted_ids,
                                                   perms, num_concepts=num_targets)
                           )[: permutations + 1].astype(np.float64)
        union = a[u] + n[None] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        if best_of_all:
            stat = iou.max(1)
            out["label"].append(int(np.argmax(iou[0])))
        else:
            stat = iou[:, u]
            out["label"].append(u)
        obs, null = stat[0], stat[1:]
        out["iou"].append(obs)
        out["p_value"].append((1 + np.count_nonzero(null >= obs * (1 - 1e-12))) / (1 + permutations))
        out["null_mean"].append(null.mean())
        out["null_95"].append(np.quantile(null, 0.95))
    res = {k: np.asarray(v) for k, v in out.items()}
    res["permutations"] = permutations
    return res


def label_significance(unit_masks, concept_masks, num_images: int, *, permutations: int = 1000,
                       seed: int = 0) -> dict:
    """p-value of each unit's best label (max IoU over concepts) under image permutation.

    ``unit_masks [U, P]``, ``concept_masks [L, P]`` boolean, P = ``num_images``
    x positions (image-major), or :class:`ImageMasks`. Returns ``label``, ``iou``, ``p_value``,
    ``null_mean``, ``null_95`` (per unit; statistics of the null best-label
    IoU) and ``permutations`` (the Monte Carlo count).
    """
    return _null_test(_per_image(unit_masks, num_images, "unit_masks"),
                      _per_image(concept_masks, num_images, "concept_masks"), num_images, permutations, seed, True)


def mask_significance(unit_masks, masks, num_images: int, *, permutations: int = 1000, seed: int = 0) -> dict:
    """p-value of ``IoU(unit u, masks[u])`` for one given mask per unit (e.g. its formula's mask)."""
    units, masks = _per_image(unit_masks, num_images, "unit_masks"), _per_image(masks, num_images, "masks")
    if masks.num_masks != units.num_masks:
        raise ValueError(f"need one mask per unit: {masks.num_masks} masks for {units.num_masks} units")
    return _null_test(units, masks, num_images, permutations, seed, False)


def benjamini_hochberg(p_values, q: float = 0.05):
    """``(significant, adjusted)``: BH step-up at FDR ``q`` and BH-adjusted p-values."""
    p = np.asarray(p_values, np.float64)
    if p.ndim != 1 or ((p < 0) | (p > 1)).any():
        raise ValueError("p_values must be a 1-d array of probabilities")
    m = p.size
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty(m)
    out[order] = adjusted
    return out <= q, out


@functools.partial(jax.jit, static_argnames=("samples",))
def _bootstrap(counts, key, *, samples):
    """Dataset IoU on ``samples`` image resamples; ``counts [R, N, 3]`` = (I, a, n) per image."""
    def one(c, k):
        idx = jax.random.randint(k, (samples, c.shape[0]), 0, c.shape[0])
        s = c[idx].sum(1)                                          # [samples, 3]
        union = s[:, 1] + s[:, 2] - s[:, 0]
        return jnp.where(union > 0, s[:, 0] / jnp.maximum(union, 1), 0.0)
    return jax.vmap(one)(counts, jax.random.split(key, counts.shape[0]))


def image_counts(unit_masks, masks, num_images: int) -> np.ndarray:
    """Per-image ``(|u & m|, |u|, |m|)`` ``[U, N, 3]`` for unit u against ``masks[u]`` (boolean or ImageMasks)."""
    units, masks = _per_image(unit_masks, num_images, "unit_masks"), _per_image(masks, num_images, "masks")
    if masks.num_masks != units.num_masks:
        raise ValueError(f"need one mask per unit: {masks.num_masks} masks for {units.num_masks} units")
    out = np.zeros((units.num_masks, num_images, 3), np.float32)
    for u in range(units.num_masks):
        a, b = units.dense_words(u), masks.dense_words(u)
        out[u] = np.stack([np.bitwise_count(a & b).sum(1), np.bitwise_count(a).sum(1),
                           np.bitwise_count(b).sum(1)], -1)
    return out


def bootstrap_iou(unit_masks, masks, num_images: int, *, samples: int = 1000, level: float = 0.95,
                  seed: int = 0) -> np.ndarray:
    """Percentile bootstrap interval ``[U, 2]`` of ``IoU(unit u, masks[u])``, resampling images."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    counts = jnp.asarray(image_counts(unit_masks, masks, num_images))
    boot = np.asarray(_bootstrap(counts, jax.random.PRNGKey(seed), samples=samples))
    return np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=1).T
