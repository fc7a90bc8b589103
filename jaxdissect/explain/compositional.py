"""Compositional explanations of units: the best logical formula of concepts per unit.

Mu & Andreas (NeurIPS 2020) label a unit with the formula over concept masks
whose mask has the highest dataset-wide IoU with the unit's binarised map.
Formulas grow left to right as ``F op concept`` with op in AND, OR, AND NOT,
so a formula of length n is ``((c1 op2 c2) op3 c3) ...``.

Every candidate ``G op c`` is scored from four integers: ``|G|``, ``|G & u|``
(known from when G itself was scored), and ``|G & c|``, ``|G & c & u|``:

* ``G OR c``: ``|F| = |G| + |c| - |G&c|``, ``I = |G&u| + |c&u| - |G&c&u|``;
* ``G AND c``: ``|F| = |G&c|``, ``I = |G&c&u|``;
* ``G AND NOT c``: ``|F| = |G| - |G&c|``, ``I = |G&u| - |G&c&u|``.

So one pass over the stored concept blocks, evaluating G's bits at each
block (bit-packed AND/OR/AND NOT and popcounts on device, ``vmap`` over a
batch of prefixes), scores G extended by every concept and every operator at
once. Concept masks are block-sparse (:class:`SparseMasks`): a concept absent
from most images costs only the blocks where it occurs.

``exact=False`` is the paper's beam search (seed with the best ``beam``
atoms of non-zero IoU, expand every beam formula by every concept and
operator, keep the best ``beam``; ties in the paper's order), with exact
integer counts. ``exact=True`` is branch and bound over the same grammar,
starting from the beam's answer: every length-2 formula is scored exactly
from pair counts (:class:`_Pairs`, one join over block positions), the
length-2 prefixes are filtered by admissible IoU upper bounds, cheapest
first (:func:`_quick_bound`, :func:`_bound`, one of each symmetric pair,
:func:`_delta_keep`, :func:`_pair_bound`), and the survivors are expanded
by the kernel, so the answer is a formula of maximal IoU among all formulas
up to ``length``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.explain.packed import ImageMasks, SparseMasks, lookup

AND, OR, ANDNOT, NONE = 0, 1, 2, 3
OP_NAMES = {AND: "AND", OR: "OR", ANDNOT: "AND NOT"}
# The paper's expansion order of operators for one concept.
_CHILD_OPS = (OR, AND, ANDNOT)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Best formula of one unit: text, IoU and the integer counts behind it.

    ``concepts[i]`` joins the formula with ``ops[i]`` (``ops[0]`` is ``None``).
    """

    unit: int
    formula: str
    iou: float
    concepts: tuple
    ops: tuple
    intersection: int
    formula_pixels: int
    unit_pixels: int


def formula_text(concepts, ops, names) -> str:
    """``name | (F AND name) | (F OR name) | (F AND NOT name)`` for a left-grown formula."""
    text = str(names[concepts[0]])
    for c, op in zip(concepts[1:], ops[1:]):
        text = f"({text} {OP_NAMES[op]} {names[c]})"
    return text


def formula_mask(concept_masks, explanation: Explanation) -> np.ndarray:
    """Boolean ``[P]`` mask of an explanation's formula over dense ``concept_masks [L, P]`` (NumPy)."""
    c = np.asarray(concept_masks, bool)
    m = c[explanation.concepts[0]]
    for k, op in zip(explanation.concepts[1:], explanation.ops[1:]):
        m = m & c[k] if op == "AND" else m | c[k] if op == "OR" else m & ~c[k]
    return m


def formula_image_masks(concepts: ImageMasks, explanations) -> ImageMasks:
    """The formula masks of ``explanations`` (one mask each) over per-image ``concepts``, without dense masks."""
    cache, words, ids = {}, [], []

    def get(c):
        if c not in cache:
            cache[c] = concepts.dense_words(c)
        return cache[c]

    for e in explanations:
        m = get(e.concepts[0])
        for k, op in zip(e.concepts[1:], e.ops[1:]):
            m = m & get(k) if op == "AND" else m | get(k) if op == "OR" else m & ~get(k)
        nz = np.nonzero(m.any(1))[0]
        words.append(m[nz])
        ids.append(nz)
    return ImageMasks(mask_ids=np.repeat(np.arange(len(ids)), [len(i) for i in ids]).astype(np.int32),
                      image_ids=np.concatenate(ids or [np.zeros(0, np.int64)]).astype(np.int32),
                      words=np.concatenate(words) if words else
                      np.zeros((0, concepts.words_per_image), np.uint32),
                      num_masks=len(ids), num_images=concepts.num_images, positions=concepts.positions)


def _iou(inter, formula, unit):
    inter = np.asarray(inter, np.float64)
    union = np.asarray(formula, np.float64) + np.asarray(unit, np.float64) - inter
    return np.divide(inter, union, out=np.zeros(np.broadcast(inter, union).shape), where=union > 0)


def _children(g, gu, cnt, cntu, n, cu):
    """``(|F|, I)`` of every ``G op c``, shape ``[..., L, 3]`` in the paper's op order (OR, AND, AND NOT)."""
    g, gu = np.asarray(g)[..., None], np.asarray(gu)[..., None]
    f = np.stack([g + n - cnt, cnt, g - cnt], -1)
    i = np.stack([gu + cu - cntu, cntu, gu - cntu], -1)
    return f, i


@functools.partial(jax.jit, static_argnames=("num_blocks", "num_concepts", "chunk"))
def _expand_kernel(cblocks, ckeys, cmask, cblock, ublocks, ukeys, units, pcon, pops, *,
                   num_blocks, num_concepts, chunk):
    """``(|G & c|, |G & c & u|) [Q, L]`` for prefixes ``G = (pcon[q], pops[q])`` of units ``units[q]``.

    ``pcon, pops [Q, R]``: the prefix's concepts and operators (NONE = unused slot;
    an all-NONE prefix is every pixel). Scans the concept blocks in chunks and
    vmaps over the Q prefixes.
    """
    words = cblocks.shape[1]
    num_chunks = ckeys.shape[0] // chunk

    def one(unit, con, ops):
        def body(acc, i):
            cb = jax.lax.dynamic_slice_in_dim(cblocks, i * chunk, chunk)
            cm = jax.lax.dynamic_slice_in_dim(cmask, i * chunk, chunk)
            bi = jax.lax.dynamic_slice_in_dim(cblock, i * chunk, chunk)
            g = jnp.full((chunk, words), 0xFFFFFFFF, jnp.uint32)
            for j in range(con.shape[0]):
                x = lookup(ckeys, cblocks, con[j] * num_blocks + bi)
                g = jnp.where(ops[j] == AND, g & x,
                              jnp.where(ops[j] == OR, g | x, jnp.where(ops[j] == ANDNOT, g & ~x, g)))
            x = g & cb
            ub = lookup(ukeys, ublocks, unit * num_blocks + bi)
            n1 = jax.lax.population_count(x).astype(jnp.int32).sum(-1)
            n2 = jax.lax.population_count(x & ub).astype(jnp.int32).sum(-1)
            a = jax.ops.segment_sum(n1, cm, num_concepts + 1, indices_are_sorted=True)
            b = jax.ops.segment_sum(n2, cm, num_concepts + 1, indices_are_sorted=True)
            return (acc[0] + a, acc[1] + b), None

        zero = jnp.zeros((num_concepts + 1,), jnp.int32)
        (a, b), _ = jax.lax.scan(body, (zero, zero), jnp.arange(num_chunks))
        return a[:num_concepts], b[:num_concepts]

    return jax.vmap(one)(units, pcon, pops)


class _Engine:
    """Device copies of the packed masks and fixed-shape calls of :func:`_expand_kernel`."""

    def __init__(self, units: SparseMasks, concepts: SparseMasks, batch: int, chunk_words: int):
        self.num_blocks = concepts.num_blocks
        self.num_concepts = concepts.num_masks
        self.batch = batch
        self.chunk = max(1, chunk_words // (batch * concepts.block_words))
        self.cblocks, self.ckeys = concepts.device_arrays(self.chunk)
        total = self.ckeys.shape[0]
        k = concepts.keys.shape[0]
        cmask = np.full((total,), concepts.num_masks, np.int32)
        cmask[:k] = concepts.mask_ids
        cblock = np.zeros((total,), np.int32)
        cblock[:k] = concepts.block_ids
        self.cmask, self.cblock = jnp.asarray(cmask), jnp.asarray(cblock)
        self.ublocks, self.ukeys = units.device_arrays()

    def counts(self, unit_ids, pcon, pops):
        """``(|G & c|, |G & c & u|)`` as int64 ``[Q, L]`` for Q prefixes, in calls of ``batch`` prefixes."""
        unit_ids = np.asarray(unit_ids, np.int32)
        pcon = np.asarray(pcon, np.int32).reshape(len(unit_ids), -1)
        pops = np.asarray(pops, np.int32).reshape(len(unit_ids), -1)
        q = len(unit_ids)
        out_a, out_b = [], []
        for s in range(0, q, self.batch):
            e = min(q, s + self.batch)
            pad = self.batch - (e - s)
            u = np.pad(unit_ids[s:e], (0, pad))
            c = np.pad(pcon[s:e], ((0, pad), (0, 0)))
            o = np.pad(pops[s:e], ((0, pad), (0, 0)), constant_values=NONE)
            a, b = _expand_kernel(self.cblocks, self.ckeys, self.cmask, self.cblock, self.ublocks, self.ukeys,
                                  jnp.asarray(u), jnp.asarray(c), jnp.asarray(o), num_blocks=self.num_blocks,
                                  num_concepts=self.num_concepts, chunk=self.chunk)
            out_a.append(a[: e - s])
            out_b.append(b[: e - s])
        if not out_a:
            empty = np.zeros((0, self.num_concepts), np.int64)
            return empty, empty
        return (np.asarray(jnp.concatenate(out_a)).astype(np.int64),
                np.asarray(jnp.concatenate(out_b)).astype(np.int64))


@functools.partial(jax.jit, static_argnames=("width",))
def _pair_kernel(acc, table, ids, ublocks, positions, *, width):
    """``acc[a * width + c] += |a & c & u|`` summed over the block ``positions`` (u's blocks ``ublocks``).

    ``table [nb + 1, C, words]`` holds the concepts present at each block
    position (ids ``[nb + 1, C]``, empty slots id ``width - 1``; row nb is empty).
    """
    t = table[positions]                                               # [K, C, words]
    i = ids[positions]                                                 # [K, C]
    x = t & ublocks[:, None, :]
    cnt = jax.lax.population_count(x[:, :, None, :] & t[:, None, :, :]).astype(jnp.int32).sum(-1)
    return acc.at[(i[:, :, None] * width + i[:, None, :]).reshape(-1)].add(cnt.reshape(-1))


class _Pairs:
    """Exact pair counts ``|a & c|`` (all pixels) and ``|a & c & u|`` (per unit) for every pair of concepts.

    A join over block positions: at each position only the concepts present
    there meet, so the cost is the sum over positions (where the unit fires,
    for ``|a & c & u|``) of (concepts present)^2 blocks, not one scan of every
    concept block per concept.
    """

    def __init__(self, units: SparseMasks, concepts: SparseMasks, entries: int = 1 << 18):
        nb, words = concepts.num_blocks, concepts.block_words
        self.num_concepts, self.num_blocks, self.units = concepts.num_masks, nb, units
        bid, mid = concepts.block_ids, concepts.mask_ids
        order = np.lexsort((mid, bid))
        per = np.bincount(bid, minlength=nb)
        width = max(1, int(per.max(initial=0)))
        slot = np.arange(len(order)) - np.concatenate([[0], np.cumsum(per)])[bid[order]]
        table = np.zeros((nb + 1, width, words), np.uint32)
        ids = np.full((nb + 1, width), self.num_concepts, np.int32)
        table[bid[order], slot] = concepts.blocks[order]
        ids[bid[order], slot] = mid[order]
        self.table, self.ids = jnp.asarray(table), jnp.asarray(ids)
        self.chunk = max(8, entries // (width * width))
        self.starts = np.searchsorted(units.mask_ids, np.arange(units.num_masks + 1))
        self.all = self._join(np.arange(nb), np.full((nb, words), 0xFFFFFFFF, np.uint32))

    def _join(self, positions, ublocks):
        width = self.num_concepts + 1
        acc = jnp.zeros((width * width,), jnp.int32)
        for s in range(0, len(positions), self.chunk):
            p = np.full((self.chunk,), self.num_blocks, np.int32)
            b = np.zeros((self.chunk, ublocks.shape[1]), np.uint32)
            k = min(self.chunk, len(positions) - s)
            p[:k], b[:k] = positions[s : s + k], ublocks[s : s + k]
            acc = _pair_kernel(acc, self.table, self.ids, jnp.asarray(b), jnp.asarray(p), width=width)
        return np.asarray(acc).reshape(width, width)[:-1, :-1].astype(np.int64)

    def unit(self, u: int) -> np.ndarray:
        """``|a & c & u|`` ``[L, L]`` for unit ``u``."""
        lo, hi = self.starts[u], self.starts[u + 1]
        return self._join(self.units.block_ids[lo:hi], self.units.blocks[lo:hi])


def _prefix_arrays(formulas, width):
    """Host formulas ``(concepts, ops)`` -> ``pcon, pops [Q, width]`` (unused slots NONE)."""
    pcon = np.zeros((len(formulas), width), np.int32)
    pops = np.full((len(formulas), width), NONE, np.int32)
    for q, (con, ops) in enumerate(formulas):
        pcon[q, : len(con)] = con
        pops[q, : len(ops)] = [AND] + list(ops[1:])
    return pcon, pops


def _as_sparse(masks, block_words, what):
    if isinstance(masks, SparseMasks):
        return masks
    if isinstance(masks, ImageMasks):
        return masks.to_sparse(block_words)
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise ValueError(f"{what} must be boolean [{what.split('_')[0]}s, pixels], got shape {masks.shape}")
    if masks.dtype != bool:
        raise ValueError(f"{what} must be boolean, got {masks.dtype}; threshold them first")
    return SparseMasks.from_dense(masks, block_words)


def compositional(unit_masks, concept_masks, names, *, length: int = 3, beam: int = 5, exact: bool = False,
                  block_words: int = 16, batch: int = 8, chunk_words: int = 1 << 18) -> list[Explanation]:
    """Best formula of up to ``length`` concepts per unit, by IoU against the unit's mask.

    ``unit_masks [U, P]`` and ``concept_masks [L, P]``: boolean over the same P
    pixels (images x positions), or :class:`SparseMasks` built with the same
    ``block_words``, or both :class:`ImageMasks` over the same images (stored
    per image: no dense mask is made). ``names``: L concept names used in the formula text.
    ``exact=False``: the paper's beam search with ``beam`` formulas;
    ``exact=True``: a provably optimal formula (branch and bound). Returns one
    :class:`Explanation` per unit.
    """
    if isinstance(unit_masks, ImageMasks) != isinstance(concept_masks, ImageMasks):
        raise ValueError("unit_masks and concept_masks must both be ImageMasks or neither; convert the other "
                         "with ImageMasks.from_dense(masks, num_images)")
    if isinstance(unit_masks, ImageMasks) and (
            (unit_masks.num_images, unit_masks.positions) != (concept_masks.num_images, concept_masks.positions)):
        raise ValueError(f"unit masks cover {unit_masks.num_images} images x {unit_masks.positions} positions but "
                         f"concept masks {concept_masks.num_images} x {concept_masks.positions}; both must be over "
                         "the same images and positions")
    units = _as_sparse(unit_masks, block_words, "unit_masks")
    concepts = _as_sparse(concept_masks, block_words, "concept_masks")
    if units.num_pixels != concepts.num_pixels:
        raise ValueError(f"unit masks cover {units.num_pixels} pixels but concept masks {concepts.num_pixels}; "
                         "both must be over the same images and positions")
    if units.block_words != concepts.block_words:
        raise ValueError(f"unit and concept masks were packed with block_words {units.block_words} and "
                         f"{concepts.block_words}; pack both with the same")
    if len(names) != concepts.num_masks:
        raise ValueError(f"{len(names)} names for {concepts.num_masks} concept masks; give one name per concept")
    if length < 1 or beam < 1:
        raise ValueError(f"length and beam must be >= 1, got length={length}, beam={beam}")
    if concepts.num_masks == 0:
        raise ValueError("no concept masks to explain units with")
    engine = _Engine(units, concepts, batch, chunk_words)
    n = concepts.counts.astype(np.int64)
    usize = units.counts.astype(np.int64)
    num_units = units.num_masks
    # |c & u| for every unit and concept: the empty prefix (every pixel).
    _, cu = engine.counts(np.arange(num_units), np.zeros((num_units, 0)), np.zeros((num_units, 0)))
    found = _beam(engine, n, cu, usize, length, beam)
    if exact:        # the beam's answers are the first incumbents: strong bounds prune from the start
        found = _exact(engine, _Pairs(units, concepts), n, cu, usize, length, found)
    out = []
    for u, (con, ops, inter, fpix) in enumerate(found):
        out.append(Explanation(unit=u, formula=formula_text(con, ops, names), iou=float(_iou(inter, fpix, usize[u])),
                               concepts=tuple(int(c) for c in con),
                               ops=(None,) + tuple(OP_NAMES[o] for o in ops[1:]),
                               intersection=int(inter), formula_pixels=int(fpix), unit_pixels=int(usize[u])))
    return out


def _beam(engine, n, cu, usize, length, beam):
    """The paper's beam search; each beam entry is ``(concepts, ops, |F & u|, |F|, iou)``."""
    num_units = cu.shape[0]
    atom = _iou(cu, n[None], usize[:, None])
    beams = []
    for u in range(num_units):
        order = np.argsort(-atom[u], kind="stable")
        seeds = [c for c in order[:beam] if atom[u, c] > 0]
        if not seeds:
            seeds = [int(order[0])]      # nothing overlaps: every formula has IoU 0
        beams.append([((int(c),), (None,), int(cu[u, c]), int(n[c]), float(atom[u, c])) for c in seeds])
    live = [any(e[4] > 0 for e in b) for b in beams]
    for _ in range(length - 1):
        entries = [(u, e) for u in range(num_units) if live[u] for e in beams[u]]
        if not entries:
            break
        width = max(len(e[0]) for _, e in entries)
        pcon, pops = _prefix_arrays([(e[0], e[1]) for _, e in entries], width)
        cnt, cntu = engine.counts([u for u, _ in entries], pcon, pops)
        row = 0
        for u in range(num_units):
            if not live[u]:
                continue
            old = beams[u]
            k = len(old)
            f, i = _children([e[3] for e in old], [e[2] for e in old], cnt[row : row + k], cntu[row : row + k],
                             n, cu[u])
            row += k
            score = _iou(i, f, usize[u]).reshape(-1)
            top = np.argsort(-score, kind="stable")[: 2 * beam]
            seen = {(e[0], e[1][1:]) for e in old}
            pool = list(old)
            for t in top:
                slot, c, o = np.unravel_index(t, f.shape)
                con = old[slot][0] + (int(c),)
                ops = old[slot][1] + (_CHILD_OPS[o],)
                if (con, ops[1:]) in seen:
                    continue
                pool.append((con, ops, int(i[slot, c, o]), int(f[slot, c, o]), float(score[t])))
            pool.sort(key=lambda e: -e[4])          # stable: the old beam wins ties, as the paper's dict
            beams[u] = pool[:beam]
    return [(b[0][0], b[0][1], b[0][2], b[0][3]) for b in beams]


def _frontier(n, cu):
    """Concepts not dominated in (more unit pixels, fewer false positives): enough for the OR bound."""
    fp = n - cu
    order = np.lexsort((-cu, fp))
    keep, best = [], -1
    for c in order:
        if cu[c] > best:
            keep.append(c)
            best = cu[c]
    keep = np.asarray(keep, np.int64)
    return cu[keep].astype(np.float64), fp[keep].astype(np.float64)


def _bound(g, gu, steps, usize, frontier, topsum):
    """Admissible upper bound on the IoU of G and of every extension of G by up to ``steps`` concepts.

    Any extension's intersection with the unit is at most ``|G&u|`` plus the
    unit pixels of the concepts it ORs in (at most ``steps`` of them), and its
    IoU is at most ``I / |u|`` (no false positives). With one step left it is
    also ``max(|G&u| / |u|, max_c min(|u|, |G&u| + |c&u|) / (|u| + max(fp(G), fp(c))))``,
    as ``G OR c`` contains the false positives of both and AND / AND NOT keep at
    most ``G``'s unit pixels.
    """
    g = np.asarray(g, np.float64)
    gu = np.asarray(gu, np.float64)
    us = float(usize)
    if steps >= 2:
        return np.minimum(us, gu + topsum[steps]) / us
    cu_f, fp_f = frontier
    inter = np.minimum(us, gu[:, None] + cu_f[None])
    fp = np.maximum((g - gu)[:, None], fp_f[None])
    return np.maximum(gu / us, (inter / (us + fp)).max(1))


def _quick_bound(g, gu, usize, frontier):
    """O(1) relaxation of ``_bound(..., steps=1)``: its OR term ``min(|u|, I + c_u) / (|u| + max(fp, fp_c))``
    is at most ``min(|u|, I + max_c c_u) / (|u| + fp)`` and at most ``I / |u| + max_c c_u / (|u| + fp_c)``."""
    us = float(usize)
    gu = np.asarray(gu, np.float64)
    fp = np.asarray(g, np.float64) - gu
    cu_f, fp_f = frontier
    reach = (cu_f / (us + fp_f)).max()
    quick = np.minimum(np.minimum(us, gu + cu_f.max()) / (us + fp), gu / us + reach)
    return np.maximum(gu / us, quick)


def _pair_bound(a, op, b, g, gu, pair_i, pair_f, n, cu, usize, rows=256):
    """Tighter bound for ``G = (a op b)`` and one more step, from the exact pair counts of a and b with every c.

    ``pair_i[x, c] = |x & c & u|``, ``pair_f[x, c] = |x & c|``. Bounds the
    intersection and false positives of ``G & c`` from those of ``a & c`` and
    ``b & c`` (e.g. ``(a OR b) AND c`` has at most ``I(a&c) + I(b&c)`` unit
    pixels and at least ``max(FP(a&c), FP(b&c))`` false positives), then
    ``G AND c``, ``G AND NOT c`` and ``G OR c`` follow from the identities of
    the module docstring.
    """
    us = float(usize)
    cu = cu.astype(np.float64)[None]
    fpc = n.astype(np.float64)[None] - cu
    out = np.empty(len(a))
    for s in range(0, len(a), rows):
        sl = slice(s, s + rows)
        ia, ib = pair_i[a[sl]].astype(np.float64), pair_i[b[sl]].astype(np.float64)
        fa = (pair_f[a[sl]] - pair_i[a[sl]]).astype(np.float64)
        fb = (pair_f[b[sl]] - pair_i[b[sl]]).astype(np.float64)
        iab = pair_i[a[sl], b[sl]].astype(np.float64)[:, None]
        fab = (pair_f[a[sl], b[sl]] - pair_i[a[sl], b[sl]]).astype(np.float64)[:, None]
        au = cu[0, a[sl]][:, None]
        fpa = n[a[sl]].astype(np.float64)[:, None] - au
        o = op[sl, None]
        gg, gi = np.asarray(g[sl], np.float64)[:, None], np.asarray(gu[sl], np.float64)[:, None]
        fpg = gg - gi
        # Range of the triple counts |a & b & c & u| and |(a & b & c) - u| (inclusion-exclusion within c and a).
        t_lo = np.maximum(0, np.maximum(ia + ib - cu, ia + iab - au))
        t_hi = np.minimum(np.minimum(ia, ib), iab)
        tf_lo = np.maximum(0, np.maximum(fa + fb - fpc, fa + fab - fpa))
        tf_hi = np.minimum(np.minimum(fa, fb), fab)
        # Range of |G & c & u| and of the false positives of G & c, per operator of G.
        hi_i = np.where(o == AND, t_hi, np.where(o == OR, ia + ib - t_lo, ia - t_lo))
        lo_i = np.where(o == AND, t_lo, np.where(o == OR, ia + ib - t_hi, ia - t_hi))
        hi_fp = np.where(o == AND, tf_hi, np.where(o == OR, fa + fb - tf_lo, fa - tf_lo))
        lo_fp = np.where(o == AND, tf_lo, np.where(o == OR, fa + fb - tf_hi, fa - tf_hi))
        hi_i = np.minimum(np.minimum(hi_i, gi), cu)
        b_and = hi_i / (us + lo_fp)
        b_not = (gi - lo_i) / (us + np.maximum(0.0, fpg - hi_fp))
        or_i = np.minimum(us, gi + cu - lo_i)
        or_fp = np.maximum(np.maximum(fpg, fpc), fpg + fpc - hi_fp)
        b_or = or_i / (us + or_fp)
        own = gi[:, 0] / (us + fpg[:, 0])
        out[sl] = np.maximum(own, np.maximum(np.maximum(b_and, b_not), b_or).max(1))
    return out


def _delta_thresholds(f2, i2, usize, best, rows=128):
    """Per concept x, the least change of a length-2 prefix H built on x that may beat ``best`` one step on.

    Each of AND y, OR y, AND NOT y is monotone in its left operand, and every
    child ``x op2 y`` of x is known exactly (``f2, i2 [L, L, 3]``: ``|x op2 y|``,
    ``|(x op2 y) & u|``; ``I``, ``FP`` below).

    * H a subset of x (``x AND c``, ``x AND NOT c``, ``c AND x``): ``H op2 y``
      is a subset of ``x op2 y`` missing at most the ``d = FP(x) - FP(H)``
      false positives of ``x - H``, so ``IoU <= I / (|u| + max(0, FP - d))``,
      which exceeds ``best`` for some child iff ``d > min over children with
      I > best |u| of (FP + |u| - I / best)`` = ``subset[x]``.
    * H containing x (``x OR c``, ``c OR x``): ``H op2 y`` contains ``x op2 y``
      and adds at most ``e = I(H) - I(x)`` unit pixels, so ``IoU <= min(|u|,
      I + e) / (|u| + FP)``, which exceeds ``best`` iff ``e > min over children
      with best (|u| + FP) < |u| of (best (|u| + FP) - I)`` = ``superset[x]``.

    Returns ``(subset, superset)`` ``[L]`` (inf: no child can help), lowered by a
    margin so that rounding never prunes a prefix whose bound exceeds ``best``.
    """
    us, num = float(usize), f2.shape[0]
    subset, superset = np.full(num, np.inf), np.full(num, np.inf)
    if best <= 0:
        return np.full(num, -np.inf), np.full(num, -np.inf)
    margin = 1e-9 * (us + f2.max(initial=0)) / min(best, 1.0)     # the comparisons below lean to keeping
    for s in range(0, num, rows):
        inter = i2[s : s + rows].reshape(min(rows, num - s), -1).astype(np.float64)
        fp = f2[s : s + rows].reshape(inter.shape).astype(np.float64) - inter
        subset[s : s + rows] = np.where(inter > best * us - margin, fp + us - inter / best, np.inf).min(1)
        need = best * (us + fp)
        superset[s : s + rows] = np.where(need < us + margin, need - inter, np.inf).min(1)
    return subset - margin, superset - margin


def _delta_keep(a, op, c, g, gu, thresholds, n, cu):
    """Whether the length-2 prefixes ``H = a op c`` pass the bounds of :func:`_delta_thresholds` (both parents
    of AND and OR; a only for AND NOT)."""
    subset, superset = thresholds
    fp = (g - gu).astype(np.float64)

    def keep(x):
        d = (n[x] - cu[x]).astype(np.float64) - fp           # false positives of x lost in H (H within x)
        e = (gu - cu[x]).astype(np.float64)                  # unit pixels H adds to x (H contains x)
        return np.where(op == OR, e > superset[x], d > subset[x])

    return keep(a) & np.where(op == ANDNOT, True, keep(c))


def _exact(engine, pairs, n, cu, usize, length, incumbents):
    """Branch and bound per unit: expand prefixes level by level, best bound first, pruning at the incumbent.

    Bounds and IoUs are exact integer arithmetic (in float64, below 2**53)
    and one correctly rounded division, so pruning at ``bound <= best`` loses
    no formula whose float64 IoU is higher than the incumbent's.

    ``incumbents``: a known formula per unit ``(concepts, ops, |F & u|, |F|)`` to start from.
    """
    num_units, num_concepts = cu.shape
    results = []
    for u in range(num_units):
        us = int(usize[u])
        atom = _iou(cu[u], n, us)
        c0 = int(np.argmax(atom))
        best = (float(atom[c0]), (c0,), (None,), int(cu[u, c0]), int(n[c0]))
        seed = incumbents[u]
        if float(_iou(seed[2], seed[3], us)) > best[0]:
            best = (float(_iou(seed[2], seed[3], us)),) + tuple(seed)
        if us == 0 or not cu[u].any() or length == 1:
            results.append(best[1:])
            continue
        topsum = np.concatenate([[0], np.cumsum(np.sort(cu[u])[::-1])]).astype(np.float64)
        frontier = _frontier(n, cu[u])
        # Every length-2 formula's counts at once (exact pair counts): no scan of the concept blocks.
        pair_i, pair_f = pairs.unit(u), pairs.all
        f2, i2 = _children(n, cu[u], pair_f, pair_i, n, cu[u])            # [a, c, op]
        score = _iou(i2, f2, us)
        t = int(np.argmax(score))
        if score.reshape(-1)[t] > best[0]:
            a, c, o = np.unravel_index(t, f2.shape)
            best = (float(score.reshape(-1)[t]), (int(a), int(c)), (None, _CHILD_OPS[o]), int(i2[a, c, o]),
                    int(f2[a, c, o]))
        if length == 2:
            results.append(best[1:])
            continue
        # Length-2 prefixes that may still lead to a better formula: cheap bounds first, then tighter ones.
        steps = length - 2
        gu2, fp2 = i2.reshape(-1).astype(np.float64), (f2 - i2).reshape(-1).astype(np.float64)
        if steps == 1:
            keep = np.nonzero(_quick_bound(gu2 + fp2, gu2, us, frontier) > best[0])[0]
        else:
            keep = np.arange(gu2.size)
        parts = [keep[s : s + 65536] for s in range(0, len(keep), 65536)]
        keep = np.concatenate([k[_bound(f2.reshape(-1)[k], i2.reshape(-1)[k], steps, us, frontier, topsum) > best[0]]
                               for k in parts] or [keep])
        a, rest = np.divmod(keep, 3 * num_concepts)
        c, o = np.divmod(rest, 3)
        ops = np.asarray(_CHILD_OPS)[o]
        # One prefix per mask of a symmetric pair: (a AND c) = (c AND a), (a OR c) = (c OR a).
        ok = (ops == ANDNOT) | (a <= c) | ~np.isin(c * 3 * num_concepts + a * 3 + o, keep)
        a, c, ops = a[ok], c[ok], ops[ok]
        g, gu = f2[a, c, o[ok]], i2[a, c, o[ok]]
        if steps == 1 and len(a):
            ok = _delta_keep(a, ops, c, g, gu, _delta_thresholds(f2, i2, us, best[0]), n, cu[u])
            a, c, ops, g, gu = a[ok], c[ok], ops[ok], g[ok], gu[ok]
            ok = _pair_bound(a, ops, c, g, gu, pair_i, pair_f, n, cu[u], us) > best[0]
            a, c, ops, g, gu = a[ok], c[ok], ops[ok], g[ok], gu[ok]
        level_con = [(int(x), int(y)) for x, y in zip(a, c)]
        level_ops = [(None, int(x)) for x in ops]
        level_g, level_gu = g.astype(np.int64), gu.astype(np.int64)
        for depth in range(2, length):
            steps = length - depth
            if not level_con:
                break
            bound = _bound(level_g, level_gu, steps, us, frontier, topsum)
            order = np.argsort(-bound, kind="stable")
            next_con, next_ops, next_g, next_gu = [], [], [], []
            group = engine.batch * 4
            for s in range(0, len(order), group):
                sel = [q for q in order[s : s + group] if bound[q] > best[0]]
                if not sel:
                    break                          # bounds are sorted: nothing further can win
                pcon, pops = _prefix_arrays([(level_con[q], level_ops[q]) for q in sel], depth)
                cnt, cntu = engine.counts(np.full(len(sel), u), pcon, pops)
                f, i = _children(level_g[sel], level_gu[sel], cnt, cntu, n, cu[u])
                score = _iou(i, f, us)
                t = int(np.argmax(score))
                if score.reshape(-1)[t] > best[0]:
                    slot, c, o = np.unravel_index(t, f.shape)
                    q = sel[slot]
                    best = (float(score[slot, c, o]), level_con[q] + (int(c),), level_ops[q] + (_CHILD_OPS[o],),
                            int(i[slot, c, o]), int(f[slot, c, o]))
                if steps > 1:
                    child_bound = _bound(f.reshape(-1), i.reshape(-1), steps - 1, us, frontier, topsum)
                    for t in np.nonzero(child_bound > best[0])[0]:
                        slot, c, o = np.unravel_index(t, f.shape)
                        q = sel[slot]
                        next_con.append(level_con[q] + (int(c),))
                        next_ops.append(level_ops[q] + (_CHILD_OPS[o],))
                        next_g.append(f[slot, c, o])
                        next_gu.append(i[slot, c, o])
            if not next_con:
                break
            level_con, level_ops = next_con, next_ops
            level_g, level_gu = np.asarray(next_g, np.int64), np.asarray(next_gu, np.int64)
        results.append(best[1:])
    return results
