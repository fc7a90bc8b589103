"""Statistics passes that upsample only the cells that can reach a unit's top quantile.

A two-tap bilinear upsample (:mod:`~jaxdissect.kernels.upsample`) reads, for
target pixel ``(t, s)``, the four source values at rows ``i0h[t], i1h[t]``
and columns ``i0w[s], i1w[s]`` with non-negative weights summing to at most
one. Target pixels sharing those four corners form a *cell* (14 -> 56: 15 x 15
cells of up to 4 x 4 pixels), and no value in a cell exceeds
``max(0, largest corner)`` (up to rounding, covered by a relative slack of
2**-16). So for a per-unit cut ``c``, only cells whose bound reaches ``c``
can hold values ``>= c``; the others are skipped without being upsampled.
Post-ReLU maps are mostly zero and the statistics look only at the top
quantile, so after the first batches a few percent of the cells are "hot".

The hot flags of a batch are packed 32 to a word and counted once (a
running count of the words' set bits); the hot cells are visited in chunks
of static size in a ``while_loop``, so a batch costs in proportion to its hot
cells and the states are updated in place (a ``lax.switch`` over capacity
tiers copied the pass-2 state on XLA:CPU). Per-unit counters and minima are
reduced per cell before their scatter, so each visited value costs one
scatter. Cells whose four corners are +0.0 hold only +0.0: they are never
visited, and their pixels are counted as the valid pixels minus those
visited (sparse codes are mostly such cells). NaN/Inf corners make a cell
hot, so non-finite values are counted as by the dense kernels. Hot-cell
values are computed with exactly the dense upsample's arithmetic (rows, then
columns, the same expression per tap pair), so both paths see bit-identical
values; tests compare them.

The three passes:

* pass 1: high-16-bit bucket counts only for values whose bucket is at or
  above a running per-unit *floor* ``b*``: the highest bucket such that at
  least ``K = n - floor((n - 1) * level)`` values seen so far lie at or above
  it, where ``n`` is an upper bound on the final number of values (from the
  number of images). ``K`` values ``>= c`` guarantee the final level
  ``>= c``, so every bucket the level can fall in is counted fully; values
  below the floor are only counted (``count``). The counts are kept in two
  windows of ``WINDOW`` buckets (32 octaves) per unit, one for negative and
  one for positive values, each covering the largest value of its sign seen
  so far (windows only move up, and a window that moves is placed 4 octaves
  above what the batch needs, so that few move in later batches; only those
  are rewritten; a positive bucket falling out of its window goes to
  ``below_pos``), plus the count of exact +0.0 values: 32 KiB per unit
  instead of a 65,536-bucket histogram (256 KiB).
  :func:`jaxdissect.kernels.quantile.select` finds the level in them, or
  raises :class:`~jaxdissect.kernels.quantile.QuantileRangeError` (fix:
  ``sparse=False``) for a level more than 28 octaves under the largest value
  of its sign, or positive under values dropped below the window.
* pass 2 (:func:`jaxdissect.kernels.quantile.low_init`): a low-16-bit row
  only for units whose level lies inside a bucket, plus per-unit minima;
  hot cells are those whose bound reaches the selected range, for the units
  that need pass 2 at all (a level of +0.0 needs nothing).
* pass 3: active pixels ``value > T_u`` exist only in cells whose bound
  exceeds ``T_u``; intersections are scattered from those pixels only, and
  the unit-independent counts (pixels, label pixels) come from the labels.
  When more than 1/16 of the cells are hot (e.g. a negative level), the
  dense IoU kernel runs instead (``lax.cond``; this state is small).

Every path gives exactly the same results as the dense kernels (tested).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.kernels import iou as iou_k
from jaxdissect.kernels import quantile as quantile_k
from jaxdissect.kernels.upsample import Taps

SLACK = 2.0 ** -16
CHUNK = 64                   # hot cells are visited 1/64 of a batch's cells at a time
DENSE_IOU = 16               # pass 3 takes the dense kernel when more than 1/16 of the cells are hot
_FIRST_FINITE = 0x0080       # smallest high-16-bit key bucket of a finite float32 (-FLT_MAX)
ZERO_KEY = quantile_k.ZERO_KEY
_ZERO_BUCKET = ZERO_KEY >> 16  # the 16-bit bucket of +0.0
WINDOW = 128 * quantile_k.WINDOW_OCTAVES   # 16-bit buckets per window (128 per octave)
HEADROOM = 128 * quantile_k.HEADROOM_OCTAVES  # a moved window's top lies this far above the largest value
_ZK = np.uint32(ZERO_KEY)


@dataclasses.dataclass(frozen=True)
class AxisCells:
    """One axis: cell ``c`` reads source indices ``i0[c], i1[c]``; its members are target pixels.

    ``members [C, M]`` (-1 = padding), ``w0``/``w1 [C, M]`` their tap weights.
    """

    i0: np.ndarray
    i1: np.ndarray
    members: np.ndarray
    w0: np.ndarray
    w1: np.ndarray


def axis_cells(taps: Taps) -> AxisCells:
    """Group the target pixels of one axis by the source pair they read."""
    pairs = {}
    for t, key in enumerate(zip(np.asarray(taps.i0).tolist(), np.asarray(taps.i1).tolist())):
        pairs.setdefault(key, []).append(t)
    width = max(len(v) for v in pairs.values())
    members = np.full((len(pairs), width), -1, np.int32)
    for c, ts in enumerate(pairs.values()):
        members[c, :len(ts)] = ts
    safe = np.maximum(members, 0)
    w0 = np.where(members >= 0, np.asarray(taps.w0, np.float32)[safe], 0).astype(np.float32)
    w1 = np.where(members >= 0, np.asarray(taps.w1, np.float32)[safe], 0).astype(np.float32)
    keys = np.array(list(pairs), np.int32).reshape(-1, 2)
    return AxisCells(keys[:, 0], keys[:, 1], members, w0, w1)


def _lerp(w0, a, w1, b):
    """One tap pair, written exactly as :func:`jaxdissect.kernels.upsample.apply_taps` writes it."""
    return w0 * a + w1 * b


def cell_bounds(acts, ch: AxisCells, cw: AxisCells):
    """``[B, Ch, Cw, U]``: no upsampled value of a cell exceeds this (``max(0, corners)`` plus slack).

    NaN where a corner is NaN or infinite, so such cells are always visited.
    """
    a = jnp.asarray(acts, jnp.float32)
    a = jnp.where(jnp.isfinite(a), a, jnp.nan)
    rows = jnp.maximum(a[:, ch.i0], a[:, ch.i1])
    m = jnp.maximum(jnp.maximum(rows[:, :, cw.i0], rows[:, :, cw.i1]), 0.0)
    return m + m * SLACK


def _hot(bounds, cut, valid):
    """Cells to visit: bound reaches ``cut [U]`` (or is NaN), of real images only."""
    return ((bounds >= cut) | jnp.isnan(bounds)) & valid[:, None, None, None]


def _interpolate(corners, chi, cwi, ch: AxisCells, cw: AxisCells):
    """Upsampled values ``[E, Mh, Mw]`` of cells ``(chi, cwi) [E]`` from their corners ``(a00, a10, a01, a11)``
    (rows ``i0, i1`` by columns ``i0, i1``), with their target pixels ``ty [E, Mh, 1]``, ``tx [E, 1, Mw]``
    and ``inside`` (not padding)."""
    a00, a10, a01, a11 = corners
    wh0, wh1 = jnp.asarray(ch.w0)[chi][:, :, None], jnp.asarray(ch.w1)[chi][:, :, None]   # [E, Mh, 1]
    r0 = _lerp(wh0, a00[:, None, None], wh1, a10[:, None, None])                         # column i0w
    r1 = _lerp(wh0, a01[:, None, None], wh1, a11[:, None, None])                         # column i1w
    ww0, ww1 = jnp.asarray(cw.w0)[cwi][:, None, :], jnp.asarray(cw.w1)[cwi][:, None, :]   # [E, 1, Mw]
    values = _lerp(ww0, r0, ww1, r1)
    ty = jnp.asarray(ch.members)[chi][:, :, None]
    tx = jnp.asarray(cw.members)[cwi][:, None, :]
    inside = (ty >= 0) & (tx >= 0)
    return values, jnp.maximum(ty, 0), jnp.maximum(tx, 0), inside


def _bound(corners):
    """``max(0, corners)`` plus slack, NaN where a corner is not finite (as :func:`cell_bounds`)."""
    a00, a10, a01, a11 = (jnp.where(jnp.isfinite(a), a, jnp.nan) for a in corners)
    m = jnp.maximum(jnp.maximum(jnp.maximum(a00, a10), jnp.maximum(a01, a11)), 0.0)
    return m + m * SLACK


class DenseGrid:
    """The cells of a dense map ``acts [B, h, w, U]``: entries ``[B, Ch, Cw, U]``, one per cell and unit."""

    def __init__(self, acts, ch: AxisCells, cw: AxisCells):
        self.acts = jnp.asarray(acts, jnp.float32)
        self.ch, self.cw = ch, cw
        self.num_units = self.acts.shape[-1]

    def bounds(self):
        return cell_bounds(self.acts, self.ch, self.cw)

    def repeat(self):
        """Entries that stand for a cell listed elsewhere (none here)."""
        return jnp.zeros((), bool)

    def skip(self):
        """Entries never visited: all-+0.0 cells (their pixels are counted in bulk)."""
        return _zero_cells(self.acts, self.ch, self.cw)

    def negative(self):
        """Entries with a negative (sign-bit) corner."""
        return _corners_any(jax.lax.bitcast_convert_type(self.acts, jnp.uint32) >> 31 == 1, self.ch, self.cw)

    def per_entry(self, x):
        """A per-unit ``x [U]`` at every entry (broadcast along the unit axis)."""
        return x

    def positive_max(self, valid):
        """``[U]``: the largest finite raw value of real images, at least 0."""
        a = self.acts
        return jnp.maximum(jnp.max(jnp.where(valid[:, None, None, None] & jnp.isfinite(a), a, 0.0)
                                   .reshape(-1, self.num_units), axis=0), 0.0)

    def many_hot(self, hot, thresholds):
        """Whether pass 3 should take the dense IoU kernel: more than 1/16 of the cells hot."""
        return hot.sum(dtype=jnp.int32) > hot.size // DENSE_IOU

    def dense(self):
        return self.acts

    def values(self, entries):
        """Upsampled values ``[E, Mh, Mw]`` of ``entries`` (flat ``[B, Ch, Cw, U]`` indices), with their unit,
        image, target pixels and ``inside``."""
        acts, ch, cw = self.acts, self.ch, self.cw
        _, hh, w, u = acts.shape
        nch, ncw = len(ch.i0), len(cw.i0)
        unit = entries % u
        cwi = (entries // u) % ncw
        chi = (entries // (u * ncw)) % nch
        img = entries // (u * ncw * nch)
        flat = acts.reshape(-1)

        def corner(hi, wi):
            return flat[((img * hh + jnp.asarray(hi)[chi]) * w + jnp.asarray(wi)[cwi]) * u + unit]

        corners = (corner(ch.i0, cw.i0), corner(ch.i1, cw.i0), corner(ch.i0, cw.i1), corner(ch.i1, cw.i1))
        values, ty, tx, inside = _interpolate(corners, chi, cwi, ch, cw)
        return values, unit, img, ty, tx, inside


class CodeGrid(DenseGrid):
    """The cells of :class:`~jaxdissect.kernels.codes.SparseCodes` ``[B, h, w, k]``: entries ``[B, Ch, Cw, 4k]``.

    A cell's entries list the units nonzero at any of its four corners: the
    corners' ``4k`` indices sorted (one int32 key per entry: unit, then corner,
    then slot), so a unit listed at several corners forms a run whose first
    entry stands for the cell (the others are repeats, never visited) and
    carries the four corner values (+0.0 where the unit is not listed). Cells
    of a unit listed at no corner are all +0.0: not in the grid, as the dense
    grid never visits them. Built from ``B * Ch * Cw * 4k`` entries instead
    of ``B * Ch * Cw * U``.
    """

    def __init__(self, codes, ch: AxisCells, cw: AxisCells):
        from jaxdissect.kernels.codes import SparseCodes

        self.codes = SparseCodes(jnp.asarray(codes.indices, jnp.int32), jnp.asarray(codes.values, jnp.float32),
                                 int(codes.num_units))
        self.ch, self.cw = ch, cw
        self.num_units = int(codes.num_units)
        idx, val = self.codes.indices, self.codes.values
        k = idx.shape[-1]
        n = 4 * k
        if self.num_units * n >= 2 ** 31:
            raise ValueError(f"{self.num_units} units with {k} listed per position overflow the int32 sort key; "
                             "give fewer units or dense codes")
        pairs = ((ch.i0, cw.i0), (ch.i1, cw.i0), (ch.i0, cw.i1), (ch.i1, cw.i1))

        def at(a, hi, wi):
            return a[:, hi][:, :, wi]                                                 # [B, Ch, Cw, k]

        keys = jnp.concatenate([at(idx, hi, wi) for hi, wi in pairs], -1) * n + jnp.arange(n, dtype=jnp.int32)
        keys = jnp.sort(keys, -1)
        unit, slot = keys // n, keys % n
        vals = jnp.take_along_axis(jnp.concatenate([at(val, hi, wi) for hi, wi in pairs], -1), slot, -1)
        corner = slot // k
        ends = [(0, 0)] * 3 + [(0, 3)]
        pu, pc, pv = (jnp.pad(x, ends, constant_values=c) for x, c in ((unit, -1), (corner, -1), (vals, 0.0)))
        corners = []
        for c in range(4):                  # a run's corners increase, so corner c lies at most c entries on
            out = jnp.zeros_like(vals)
            for j in range(c + 1):
                out = jnp.where((pu[..., j:j + n] == unit) & (pc[..., j:j + n] == c), pv[..., j:j + n], out)
            corners.append(out)
        self.unit, self.corners = unit, tuple(corners)
        self.first = jnp.concatenate([jnp.ones_like(unit[..., :1], bool), unit[..., 1:] != unit[..., :-1]], -1)

    def bounds(self):
        return _bound(self.corners)

    def repeat(self):
        return ~self.first

    def skip(self):
        bits = [jax.lax.bitcast_convert_type(a, jnp.uint32) for a in self.corners]
        return ~self.first | (jnp.maximum(jnp.maximum(bits[0], bits[1]), jnp.maximum(bits[2], bits[3])) == 0)

    def negative(self):
        signs = [jax.lax.bitcast_convert_type(a, jnp.uint32) >> 31 == 1 for a in self.corners]
        return self.first & (signs[0] | signs[1] | signs[2] | signs[3])

    def per_entry(self, x):
        return x[self.unit]

    def positive_max(self, valid):
        val = self.codes.values
        v = jnp.where(valid[:, None, None, None] & jnp.isfinite(val), val, 0.0)
        top = jnp.zeros((self.num_units,), jnp.float32).at[self.codes.indices.reshape(-1)].max(v.reshape(-1))
        return jnp.maximum(top, 0.0)

    def many_hot(self, hot, thresholds):
        """A negative threshold makes the all-+0.0 cells (not in this grid) active: the dense kernel counts them."""
        return (thresholds < 0).any()

    def dense(self):
        return self.codes.dense()

    def values(self, entries):
        ch, cw = self.ch, self.cw
        n = self.unit.shape[-1]
        nch, ncw = len(ch.i0), len(cw.i0)
        cwi = (entries // n) % ncw
        chi = (entries // (n * ncw)) % nch
        img = entries // (n * ncw * nch)
        corners = tuple(a.reshape(-1)[entries] for a in self.corners)
        values, ty, tx, inside = _interpolate(corners, chi, cwi, ch, cw)
        return values, self.unit.reshape(-1)[entries], img, ty, tx, inside


def grid(acts, ch: AxisCells, cw: AxisCells) -> DenseGrid:
    """The cell grid of a dense map or of :class:`~jaxdissect.kernels.codes.SparseCodes`."""
    from jaxdissect.kernels.codes import SparseCodes

    return CodeGrid(acts, ch, cw) if isinstance(acts, SparseCodes) else DenseGrid(acts, ch, cw)


def _select_bit(words, rank):
    """Position of the ``rank``-th (0-based) set bit of each uint32 word (a binary search on popcounts)."""
    pos = jnp.zeros(words.shape, jnp.int32)
    for width in (16, 8, 4, 2, 1):
        mask = jnp.uint32((1 << width) - 1)
        low = jax.lax.population_count(words & mask).astype(jnp.int32)
        up = rank >= low
        rank = jnp.where(up, rank - low, rank)
        words = jnp.where(up, words >> width, words & mask)
        pos = pos + jnp.where(up, width, 0)
    return pos


def foreach_hot(hot, fn, carry):
    """Fold ``fn(entries, ok, carry)`` over the True entries of ``hot`` (flat indices), ``CHUNK``-th of
    them at a time; ``ok`` marks the real ones in the last chunk.

    The hot flags are packed 32 to a word and a running count of the words'
    set bits made once (a pass over the flags and a cumsum over 1/32 of
    them); each step of a ``while_loop`` finds its chunk of (static size)
    hot cells by binary search in it and a bit search in the word, in
    increasing order, so a batch costs in proportion to its hot cells and the
    (large) histogram state is updated in place.
    """
    total = hot.size
    cap = max(1, total // CHUNK)
    flags = jnp.pad(hot.reshape(-1), (0, (-total) % 32)).reshape(-1, 32)
    words = (flags.astype(jnp.uint32) << jnp.arange(32, dtype=jnp.uint32)).sum(1, dtype=jnp.uint32)
    prefix = jnp.cumsum(jax.lax.population_count(words).astype(jnp.int32))
    n = prefix[-1]
    offsets = jnp.arange(cap, dtype=jnp.int32)

    def body(c):
        k, carry = c
        j = k * cap + offsets                                          # the j-th hot cell (0-based)
        w = jnp.minimum(jnp.searchsorted(prefix, j + 1, side="left").astype(jnp.int32), prefix.size - 1)
        before = jnp.where(w > 0, prefix[jnp.maximum(w - 1, 0)], 0)
        entries = w * 32 + _select_bit(words[w], j - before)
        ok = j < n
        return k + 1, fn(jnp.where(ok, jnp.minimum(entries, total - 1), total - 1), ok, carry)

    return jax.lax.while_loop(lambda c: c[0] * cap < n, body, (jnp.int32(0), carry))[1]


# --------------------------------------------------------------------------
# Pass 1.


def floor_target(images: int | None, pixels: int, level: float) -> int:
    """``K``: values at or above a cut that prove the final level is at or above it (0 = no floor).

    ``images`` is an upper bound on the images of the whole stream (``K`` only
    grows with ``n``, so an upper bound is safe).
    """
    if not images:
        return 0
    n = int(images) * int(pixels)
    return int(n - np.floor((n - 1) * float(level)))


def pass1_init(num_units: int, target: int) -> dict:
    """Pass-1 state: per unit two windows of ``WINDOW`` high-16-bit buckets (negative and positive values,
    each just below its largest value), the count of exact +0.0 values and of positive values below the
    positive window, and the floor (see the module doc)."""
    state = quantile_k.nonfinite_init(num_units)
    state.update({"window": jnp.zeros((num_units, 2, WINDOW), jnp.int32),
                  "base": jnp.asarray(np.tile(np.array([0, _ZERO_BUCKET], np.int32), (num_units, 1))),
                  "zeros": jnp.zeros((num_units,), jnp.int32),
                  "below_pos": jnp.zeros((num_units,), jnp.int32),
                  "count": jnp.zeros((num_units,), jnp.int32),
                  "floor": jnp.zeros((num_units,), jnp.int32),
                  "target": jnp.full((), target, jnp.int32)})
    return state


def _bucket_floats(buckets):
    """Smallest float32 of each high-16-bit key bucket (device side of ``keys_to_floats``)."""
    return _key_floats(buckets.astype(jnp.uint32) << 16)


def _key_floats(keys):
    """The float32 of each uint32 key (device side of ``quantile.keys_to_floats``)."""
    bits = jnp.where(keys >> 31 == 1, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _new_floor(state):
    """Raise each unit's floor to the highest bucket with at least ``target`` counted values at or above it.

    Counts from the top, as :func:`jaxdissect.kernels.quantile.select` does:
    blocks of 256 buckets of the positive window, the values below it and
    the zeros (both at or above bucket ``+0.0``), blocks of the negative
    window; then the buckets of the block that reaches the target. Values a
    window dropped count as nothing, which can only lower the bucket found:
    still a floor.
    """
    window, base, target = state["window"], state["base"], state["target"]
    u = window.shape[0]
    side = 256
    blocks = window.reshape(u, 2, WINDOW // side, side).sum(-1)                      # [U, 2, nb]
    nb = WINDOW // side
    desc = jnp.concatenate([blocks[:, 1, ::-1], state["below_pos"][:, None], state["zeros"][:, None],
                            blocks[:, 0, ::-1]], 1)                                  # [U, 2 nb + 2]
    cum = jnp.cumsum(desc, 1)
    seg = (cum < target).sum(1)                                                      # first reaching it
    reached = (target > 0) & (seg < desc.shape[1])
    seg = jnp.minimum(seg, desc.shape[1] - 1)
    units = jnp.arange(u)
    before = cum[units, seg] - desc[units, seg]
    neg = seg > nb + 1
    block = jnp.where(neg, 2 * nb + 1 - seg, nb - 1 - jnp.minimum(seg, nb - 1))
    sign = jnp.where(neg, 0, 1)
    rows = window[units, sign].reshape(u, nb, side)[units, block]                    # [U, side]
    ftop = jnp.cumsum(rows[:, ::-1], 1)[:, ::-1] + before[:, None]
    fine = jnp.max(jnp.where(ftop >= target, jnp.arange(side, dtype=jnp.int32), 0), 1)
    bucket = base[units, sign] + block * side + fine
    bucket = jnp.where((seg == nb) | (seg == nb + 1), _ZERO_BUCKET, bucket)
    return jnp.maximum(state["floor"], jnp.where(reached, bucket, 0))


def _corners_any(flag, ch: AxisCells, cw: AxisCells):
    """``[B, Ch, Cw, U]``: whether any of a cell's four source corners has ``flag [B, h, w, U]``."""
    rows = flag[:, ch.i0] | flag[:, ch.i1]
    return rows[:, :, cw.i0] | rows[:, :, cw.i1]


def _pixels(ch: AxisCells, cw: AxisCells) -> int:
    """Target pixels per image."""
    return int((ch.members >= 0).sum()) * int((cw.members >= 0).sum())


def _zero_cells(acts, ch: AxisCells, cw: AxisCells):
    """``[B, Ch, Cw, U]``: cells whose four corners are +0.0, so that every value in them is +0.0.

    Such cells are never visited; the passes count their pixels as the
    valid pixels minus those visited.
    """
    bits = jax.lax.bitcast_convert_type(acts, jnp.uint32)
    rows = jnp.maximum(bits[:, ch.i0], bits[:, ch.i1])
    return jnp.maximum(rows[:, :, cw.i0], rows[:, :, cw.i1]) == 0


def _slide(window, base, new_base):
    """Move each window up to ``new_base`` (never down): ``(window, positive counts that fell below)``.

    Only the windows that move are read and written, a chunk of rows at a
    time (:func:`foreach_hot`), so a batch in which a few units find a new
    largest value costs little.
    """
    u = window.shape[0]
    rows = window.reshape(u * 2, WINDOW)
    shift = (new_base - base).reshape(-1)                                     # [2U] >= 0
    idx = jnp.arange(WINDOW, dtype=jnp.int32)

    def visit(entries, ok, carry):
        rows, lost = carry
        old = rows[entries]                                                   # [E, WINDOW]
        src = idx + shift[entries][:, None]
        moved = jnp.where(src < WINDOW, jnp.take_along_axis(old, jnp.minimum(src, WINDOW - 1), 1), 0)
        dropped = jnp.where((idx < shift[entries][:, None]) & (entries % 2 == 1)[:, None], old, 0).sum(1)
        rows = rows.at[jnp.where(ok, entries, 2 * u)].set(moved, mode="drop")
        lost = lost.at[jnp.where(ok, entries // 2, u)].add(dropped, mode="drop")
        return rows, lost

    rows, lost = foreach_hot(shift > 0, visit, (rows, jnp.zeros_like(window[:, 0, 0])))  # varying under shard_map
    return rows.reshape(u, 2, WINDOW), lost


def pass1_update(state, acts, valid, batch_id, ch, cw):
    """Pass-1 quantile state after one batch of raw ``acts [B, h, w, U]`` or sparse codes (see the module doc)."""
    g = grid(acts, ch, cw)
    b, u = acts.shape[0], g.num_units
    pixels = _pixels(ch, cw)
    valid = jnp.asarray(valid, bool)
    batch_id = jnp.broadcast_to(jnp.asarray(batch_id, jnp.int32), (b,))
    floor = state["floor"]
    cut = jnp.where(floor >= _FIRST_FINITE, _bucket_floats(floor), -jnp.inf)
    hot = _hot(g.bounds(), g.per_entry(cut), valid) & ~g.skip()
    nb = WINDOW

    # Anchor the windows at this batch's largest values before counting them, so none lies above a window:
    # the positive one at the bound of the largest raw value (no upsampled value exceeds it) ...
    m = g.positive_max(valid)
    top_pos = (quantile_k.float_keys(m + m * SLACK) >> 16).astype(jnp.int32)
    # ... the negative one at the largest negative upsampled value, found in the cells with a negative corner.
    negative = hot & g.negative()

    def negative_top(_):
        def visit(entries, ok, top):
            values, unit, _, _, _, inside = g.values(entries)
            keys = quantile_k.float_keys(values)
            high = (keys >> 16).astype(jnp.int32)
            neg = ok[:, None, None] & inside & jnp.isfinite(values) & (keys < _ZK) & (high >= floor[unit][:, None, None])
            units = jnp.broadcast_to(unit[:, None, None], values.shape)
            return top.at[jnp.where(neg, units, u).reshape(-1)].max(high.reshape(-1), mode="drop")

        return foreach_hot(negative, visit, none)

    # Made from the state, so they carry its device-varying type under shard_map.
    none = jnp.full_like(state["floor"], -1)
    top_neg = jax.lax.cond(negative.any(), negative_top, lambda _: none, None)
    # A window that must move goes HEADROOM above what this batch needs, so later batches rarely move it.
    need = jnp.stack([top_neg, top_pos], 1) - (WINDOW - 1)
    new_base = jnp.where(need > state["base"], need + HEADROOM, state["base"])
    window, lost = _slide(state["window"], state["base"], new_base)
    start = {**state, "window": window, "base": new_base, "below_pos": state["below_pos"] + lost}

    def visit(entries, ok, carry):
        state, counters = carry
        values, unit, img, _, _, inside = g.values(entries)
        seen = ok[:, None, None] & inside
        finite = jnp.isfinite(values)
        bad = seen & ~finite
        keys = quantile_k.float_keys(values)
        high = (keys >> 16).astype(jnp.int32)
        keep = seen & finite & (high >= floor[unit][:, None, None])
        sign = (keys >= _ZK).astype(jnp.int32)                           # 0 negative, 1 positive
        slot = high - jnp.where(sign == 1, state["base"][unit, 1][:, None, None], state["base"][unit, 0][:, None, None])
        nonzero = keep & (keys != _ZK)
        inwin = nonzero & (slot >= 0) & (slot < nb)
        units = unit[:, None, None]
        win = state["window"].reshape(-1).at[jnp.where(inwin, (units * 2 + sign) * nb + slot, u * 2 * nb)
                                             .reshape(-1)].add(1, mode="drop").reshape(u, 2, nb)
        # Per-unit counters, summed per cell first (one small scatter): pixels visited, exact zeros,
        # positive values below the positive window, NaN/Inf.
        per_cell = jnp.stack([seen, keep & (keys == _ZK), nonzero & (slot < 0) & (sign == 1), bad], -1)
        counters = counters.at[jnp.where(ok, unit, u)].add(per_cell.sum((1, 2), dtype=jnp.int32), mode="drop")
        first = state["first_bad_batch"].at[jnp.where(ok & bad.any((1, 2)), unit, u)].min(batch_id[img], mode="drop")
        return {**state, "window": win, "first_bad_batch": first}, counters

    new, counters = foreach_hot(hot, visit, (start, jnp.zeros_like(state["window"][:, 0, :4])))
    visited, zeros, below, bad = (counters[:, i] for i in range(4))
    # With the floor at or below +0.0 every cell but the all-zero ones is hot: their pixels are the rest.
    seen = valid.sum(dtype=jnp.int32) * pixels
    bulk = jnp.where(floor <= _ZERO_BUCKET, seen - visited, 0)
    new = {**new, "count": state["count"] + seen - bad, "zeros": new["zeros"] + zeros + bulk,
           "below_pos": new["below_pos"] + below, "nonfinite": state["nonfinite"] + bad}
    return {**new, "floor": _new_floor(new)}


# --------------------------------------------------------------------------
# Pass 2.


def pass2_update(state, acts, valid, ch, cw):
    """Pass-2 state (:func:`jaxdissect.kernels.quantile.low_init`) after one batch, upsampling only the
    cells that can reach a unit's selected range, for the units that need pass 2 at all."""
    g = grid(acts, ch, cw)
    u = g.num_units
    valid = jnp.asarray(valid, bool)
    lo, hi, need = state["lo"], state["hi"], state["need"]
    cut = jnp.where(need, _key_floats(lo), jnp.inf)
    hot = _hot(g.bounds(), g.per_entry(cut), valid) & ~g.skip() & g.per_entry(need)

    def visit(entries, ok, carry):
        state, visited = carry
        values, unit, _, _, _, inside = g.values(entries)
        seen = ok[:, None, None] & inside
        visited = visited.at[jnp.where(ok, unit, u)].add(seen.sum((1, 2), dtype=jnp.int32), mode="drop")
        return quantile_k.low_fold(state, quantile_k.float_keys(values), unit, seen & jnp.isfinite(values)), visited

    state, visited = foreach_hot(hot, visit, (state, jnp.zeros_like(state["row"])))
    # A unit whose cut is at most +0.0 had every cell visited but the all-zero ones: +0.0 (key ZERO_KEY,
    # low bits 0) that many times.
    zk = _ZK
    zeros = jnp.where(need & (lo <= zk), valid.sum(dtype=jnp.int32) * _pixels(ch, cw) - visited, 0)
    some = zeros > 0
    z_in = some & (lo <= zk) & (zk <= hi)
    state = quantile_k.add_zeros(state, zeros, z_in)
    return {**state, "min_in": jnp.where(z_in, jnp.minimum(state["min_in"], zk), state["min_in"]),
            "min_above": jnp.where(some & (zk > hi), jnp.minimum(state["min_above"], zk), state["min_above"])}


# --------------------------------------------------------------------------
# Pass 3.


def pass3_update(counts, acts, thresholds, seg, valid, batch_id, image_labels, upsample, ch, cw,
                 method="auto"):
    """IoU counts after one batch, upsampling only cells that can exceed the thresholds.

    ``upsample`` is the dense fallback's (used when many cells are hot).
    """
    g = grid(acts, ch, cw)
    u = g.num_units
    num_labels = counts["intersection"].shape[1]
    valid = jnp.asarray(valid, bool)
    thresholds = jnp.asarray(thresholds, jnp.float32)
    bounds = g.bounds()
    hot = ((bounds > g.per_entry(thresholds)) | jnp.isnan(bounds)) & valid[:, None, None, None] & ~g.repeat()

    def dense(counts):
        return iou_k.update(counts, upsample(g.dense()), thresholds, seg, valid, batch_id, image_labels,
                            method=method)

    def sparse(counts):
        chans, bad_img = iou_k.label_channels(seg, image_labels, num_labels, valid)    # [B*S*S, C]
        s1, s2 = seg.shape[2], seg.shape[3]

        def visit(entries, ok, c):
            inter, act_n = c
            values, unit, img, ty, tx, inside = g.values(entries)
            active = ok[:, None, None] & inside & (values > thresholds[unit][:, None, None])
            pix = (img[:, None, None] * s1 + ty) * s2 + tx                          # [E, Mh, Mw]
            labs = chans[pix]                                                        # [E, Mh, Mw, C]
            # Ignored label entries (num_labels) and inactive pixels land outside the counts and are dropped.
            slot = jnp.where(active[..., None] & (labs < num_labels), unit[:, None, None, None] * num_labels + labs,
                             u * num_labels)
            inter = inter.at[slot.reshape(-1)].add(1, mode="drop")
            act_n = act_n.at[jnp.where(active, unit[:, None, None], u).reshape(-1)].add(1, mode="drop")
            return inter, act_n

        # Intersections go straight into the state (no per-batch [U, L] array); zeros made from the state, so
        # they carry its device-varying type under shard_map.
        inter, act_n = foreach_hot(hot, visit, (counts["intersection"].reshape(-1), jnp.zeros_like(counts["active"])))
        npix = valid.sum(dtype=jnp.int32) * (s1 * s2)
        return iou_k.add_counts({**counts, "intersection": inter.reshape(u, num_labels)}, npix,
                                iou_k.label_pixel_counts(chans, num_labels), act_n, None, bad_img, batch_id)

    return jax.lax.cond(g.many_hot(hot, thresholds), dense, sparse, counts)
