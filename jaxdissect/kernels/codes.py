"""Sparse codes: a layer's units given by the few that are nonzero at each position.

A TopK sparse autoencoder's code of a feature map has ``k`` of its ``U``
features nonzero per position (k = 32 of 4,096: under 1%). The statistics
read :class:`SparseCodes` directly (:mod:`jaxdissect.kernels.sparse` finds
the cells to upsample from the nonzeros), so no pass touches every
``[image, cell, unit]``; every result equals that of the dense map
:meth:`SparseCodes.dense` bit for bit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class SparseCodes:
    """``indices [..., k]`` (int32, distinct per position, in ``[0, num_units)``) and their ``values [..., k]``.

    Units not listed at a position are +0.0 there. A pytree (the arrays are
    its leaves, ``num_units`` static), so it travels through ``jit``,
    ``shard_map`` and ``jax.tree.map`` like an array of shape :attr:`shape`.
    """

    indices: object
    values: object
    num_units: int

    def tree_flatten(self):
        return (self.indices, self.values), self.num_units

    @classmethod
    def tree_unflatten(cls, num_units, children):
        return cls(*children, num_units)

    @property
    def shape(self) -> tuple:
        """The shape of the dense map: ``indices.shape[:-1] + (num_units,)``."""
        return tuple(np.shape(self.indices)[:-1]) + (int(self.num_units),)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def k(self) -> int:
        return int(np.shape(self.indices)[-1])

    def dense(self):
        """The dense ``[..., num_units]`` float32 map (the listed values scattered into zeros)."""
        idx = jnp.asarray(self.indices, jnp.int32)
        rows = idx.reshape(-1, idx.shape[-1])
        out = jnp.zeros((rows.shape[0], self.num_units), jnp.float32)
        out = out.at[jnp.arange(rows.shape[0])[:, None], rows].set(
            jnp.asarray(self.values, jnp.float32).reshape(rows.shape))
        return out.reshape(self.shape)


def dense(acts):
    """``acts`` as a dense array (a :class:`SparseCodes` is scattered; anything else is returned as is)."""
    return acts.dense() if isinstance(acts, SparseCodes) else acts


def check(codes: SparseCodes) -> str | None:
    """What is wrong with host ``codes`` (shapes, index range, repeated indices), or None."""
    idx, val = np.asarray(codes.indices), np.asarray(codes.values)
    if idx.shape != val.shape:
        return f"indices {idx.shape} and values {val.shape} must have the same shape"
    if not np.issubdtype(idx.dtype, np.integer):
        return f"indices must be integers, got {idx.dtype}"
    if idx.size and (idx.min() < 0 or idx.max() >= codes.num_units):
        return f"indices must lie in [0, {codes.num_units}), got [{idx.min()}, {idx.max()}]"
    if idx.shape[-1] > 1 and (np.diff(np.sort(idx, -1), axis=-1) == 0).any():
        return "an index is listed twice at one position; each unit may appear once per position"
    return None


def pad(codes: SparseCodes, n: int) -> SparseCodes:
    """Host ``codes`` padded along axis 0 to ``n`` items of zeros (distinct indices, values +0.0)."""
    idx, val = np.asarray(codes.indices, np.int32), np.asarray(codes.values, np.float32)
    extra = n - idx.shape[0]
    fill = np.broadcast_to(np.arange(idx.shape[-1], dtype=np.int32),
                           (extra,) + idx.shape[1:])
    return SparseCodes(np.concatenate([idx, fill]), np.concatenate([val, np.zeros(fill.shape, np.float32)]),
                       codes.num_units)
