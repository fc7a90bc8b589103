"""Per-unit top-k images and exact activation mean/max, mergeable across devices bit for bit.

Top-k: each image scores ``max over space`` of the RAW (not upsampled)
activation of a unit. The state keeps, per unit, the best ``k`` (score,
global image index) pairs ordered by score descending then index ascending
(a total order, since indices are unique), so the result equals a stable
``numpy`` sort and merging per-device lists gives the identical list.
Empty slots hold ``-inf`` and index ``-1`` in the result.

Mean: float sums depend on their order, hence on the device split. The sum
is therefore accumulated EXACTLY in a fixed-point integer "superaccumulator"
(every finite float32 is an integer multiple of 2**-149): per unit, 40 int32
words of 8 bits each (320 bits: 277 for any float32 plus 43 bits of
headroom, i.e. up to 2**43 values), carries propagated after every update
(three parallel rounds keep every word small; the representation is not
canonical, the exact total is).
The final mean is the correctly rounded exact mean, identical for any split.
Non-finite values are skipped here (the quantile kernel reports them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NO_INDEX = np.iinfo(np.int32).max
WORDS = 40
_WORD_BITS = 8
_MAX_VALUES_PER_UPDATE = (1 << 23) - 4  # 255 * n + 512 < 2**31: words stay int32 after an update


def init(num_units: int, k: int = 100) -> dict:
    """Empty top-k lists and activation statistics for ``num_units`` units."""
    return {
        "top_values": jnp.full((num_units, k), -jnp.inf, jnp.float32),
        "top_index": jnp.full((num_units, k), NO_INDEX, jnp.int32),
        "sum_words": jnp.zeros((num_units, WORDS), jnp.int32),
        "max": jnp.full((num_units,), -jnp.inf, jnp.float32),
        "images": jnp.zeros((), jnp.int32),
    }


def _best(values, index, k):
    """The ``k`` best (value desc, index asc) along the last axis of ``[U, n]`` arrays."""
    neg, idx = jax.lax.sort((-values, index), dimension=1, num_keys=2)
    return -neg[:, :k], idx[:, :k]


def _normalize(words):
    """Three rounds of parallel carries: words end within (-256, 512) (any |word| < 2**31 before).

    The representation need not be canonical: the value ``sum(w_i * 256**i)``
    is unchanged, and only the exact total is ever read. The top word keeps
    its carries (it stays 0 within the headroom).
    """
    for _ in range(3):
        carry = (words >> _WORD_BITS).at[:, -1].set(0)
        words = words - (carry << _WORD_BITS)
        words = words + jnp.concatenate([jnp.zeros_like(carry[:, :1]), carry[:, :-1]], axis=1)
    return words


def _pieces(values, mask):
    """Each value as its word index ``[...]`` and four signed 8-bit pieces ``[..., 4]`` (value = sum of
    ``piece_i * 256**(word + i) * 2**-149``); masked and non-finite values get zero pieces."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(jnp.int32)
    mantissa = (bits & 0x7FFFFF) | jnp.where(exponent > 0, jnp.uint32(1 << 23), jnp.uint32(0))
    shift = jnp.maximum(exponent - 1, 0)  # value = mantissa * 2**(shift - 149)
    shifted = mantissa << (shift & 7).astype(jnp.uint32)  # < 2**31
    sign = jnp.where((bits >> 31) == 1, -1, 1) * (mask & (exponent < 255))
    pieces = jnp.stack([((shifted >> (8 * i)) & 0xFF).astype(jnp.int32) * sign for i in range(4)], -1)
    return shift >> 3, pieces


def exact_sum_words(values, mask, words=None):
    """Exact per-column sums of ``values [P, U]`` where ``mask``, as unnormalised words ``[U, WORDS]``
    (added to ``words`` when given).

    Only the nonzero values are visited (found with
    :func:`jaxdissect.kernels.sparse.foreach_hot`): a post-ReLU map or a
    sparse code is mostly zeros, and a scatter costs far more per value than
    finding them.
    """
    p, u = values.shape
    values = values.astype(jnp.float32)
    return _sum_listed(values.reshape(-1), lambda entries: entries % u, (values != 0) & mask, p, u, words)


def _sum_listed(flat, unit_of, listed, per_unit, u, words):
    """Exact sums of ``flat[entries]`` into words of ``unit_of(entries)`` over the True entries of ``listed``."""
    from jaxdissect.kernels.sparse import foreach_hot

    if per_unit > _MAX_VALUES_PER_UPDATE:
        raise ValueError(f"exact sums take at most {_MAX_VALUES_PER_UPDATE} values per unit and update, got "
                         f"{per_unit}; use smaller batches")
    rows = jnp.arange(u, dtype=jnp.int32) * WORDS
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(),
                                           scatter_dims_to_operand_dims=(0,))

    def visit(entries, ok, words):
        word, pieces = _pieces(flat[entries], ok)
        # One scatter adds each value's four 8-bit pieces to its four consecutive words (a window of 4).
        return jax.lax.scatter_add(words, (rows[unit_of(entries)] + word).reshape(-1, 1), pieces, dims,
                                   mode=jax.lax.GatherScatterMode.FILL_OR_DROP)

    start = jnp.zeros(u * WORDS, jnp.int32) if words is None else words.reshape(-1)
    return foreach_hot(listed, visit, start).reshape(u, WORDS)


def update(state: dict, acts, valid=None, index=None) -> dict:
    """Fold raw activations ``acts [B, h, w, U]`` (or :class:`~jaxdissect.kernels.codes.SparseCodes`) of images
    ``index [B]`` (global, int32) into ``state``.

    ``valid [B]`` marks real images; padded ones are ignored.
    """
    from jaxdissect.kernels.codes import SparseCodes

    b, h, w, u = acts.shape
    k = state["top_values"].shape[1]
    valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
    index = jnp.arange(b, dtype=jnp.int32) if index is None else jnp.asarray(index, jnp.int32)
    if isinstance(acts, SparseCodes):
        score, words, finite_max = _codes_update(state, acts, valid)
    else:
        acts = jnp.asarray(acts, jnp.float32)
        score = jnp.where(valid[:, None], acts.max(axis=(1, 2)), -jnp.inf)  # [B, U]
        flat = acts.reshape(b * h * w, u)
        pixel_valid = jnp.repeat(valid, h * w)[:, None]
        words = exact_sum_words(flat, pixel_valid, state["sum_words"])
        finite_max = jnp.where(pixel_valid & jnp.isfinite(flat), flat, -jnp.inf).max(0)
    idx = jnp.broadcast_to(jnp.where(valid, index, NO_INDEX)[None], (u, b))
    top_values, top_index = _best(jnp.concatenate([state["top_values"], score.T], 1),
                                  jnp.concatenate([state["top_index"], idx], 1), k)
    return {
        "top_values": top_values,
        "top_index": top_index,
        "sum_words": _normalize(words),
        "max": jnp.maximum(state["max"], finite_max),
        "images": state["images"] + valid.sum(dtype=jnp.int32),
    }


def _codes_update(state, codes, valid):
    """Per-image maxima ``[B, U]``, exact sum words and finite maximum ``[U]`` of sparse codes.

    An unlisted unit is +0.0 at that position, so an image's maximum takes 0
    wherever the unit is listed at fewer than all ``h * w`` positions.
    """
    b, h, w, u = codes.shape
    idx = jnp.asarray(codes.indices, jnp.int32).reshape(b, -1)
    val = jnp.asarray(codes.values, jnp.float32).reshape(b, -1)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], idx.shape)
    listed = jnp.zeros((b, u), jnp.int32).at[rows, idx].add(1)
    top = jnp.full((b, u), -jnp.inf, jnp.float32).at[rows, idx].max(val)
    score = jnp.where(listed < h * w, jnp.maximum(top, 0.0), top)
    score = jnp.where(valid[:, None], score, -jnp.inf)
    finite = jnp.where(jnp.isfinite(val), val, -jnp.inf)
    fmax = jnp.full((b, u), -jnp.inf, jnp.float32).at[rows, idx].max(finite)
    fmax = jnp.where(listed < h * w, jnp.maximum(fmax, 0.0), fmax)
    finite_max = jnp.where(valid[:, None], fmax, -jnp.inf).max(0)
    flat_idx = idx.reshape(-1)
    words = _sum_listed(val.reshape(-1), lambda e: flat_idx[e], (val != 0) & valid[:, None], b * h * w, u,
                        state["sum_words"])
    return score, words, finite_max


def merge(states: dict, pixels_per_image: int) -> dict:
    """Final statistics from states stacked on a leading device axis (NumPy).

    Returns ``top_values [U, k]``, ``top_index [U, k]`` (``-1`` = no image),
    ``mean [U]`` (float64, exact sum / count), ``max [U]`` and ``images``.
    """
    values = np.asarray(states["top_values"])
    index = np.asarray(states["top_index"])
    d, u, k = values.shape
    values = np.transpose(values, (1, 0, 2)).reshape(u, d * k)
    index = np.transpose(index, (1, 0, 2)).reshape(u, d * k)
    order = np.lexsort((index, -values), axis=1)[:, :k]
    top_values = np.take_along_axis(values, order, 1)
    top_index = np.take_along_axis(index, order, 1).astype(np.int64)
    top_index[top_index == NO_INDEX] = -1
    images = int(np.asarray(states["images"]).astype(np.int64).sum())
    words = np.asarray(states["sum_words"]).astype(np.int64).sum(0)
    count = images * int(pixels_per_image)
    mean = np.full(u, np.nan)
    if count:
        # Five words at a time in int64 (each word is small: |word| < 2**9 per device), then exact Python
        # integers; int / int is correctly rounded, as float(Fraction(total, count << 149)) is.
        group = 5
        parts = (words.reshape(u, WORDS // group, group) << (_WORD_BITS * np.arange(group))).sum(-1)
        den = count << 149
        for unit, row in enumerate(parts.tolist()):
            mean[unit] = sum(p << (_WORD_BITS * group * i) for i, p in enumerate(row)) / den
    return {
        "top_values": top_values,
        "top_index": top_index,
        "mean": mean,
        "max": np.asarray(states["max"]).max(0),
        "images": images,
    }
