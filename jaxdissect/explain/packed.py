"""Bit-packed, block-sparse boolean masks over a flat pixel axis.

A mask over P pixels (images x positions, flattened) is packed into uint32
words and cut into blocks of ``block_words`` words. Only non-zero blocks are
stored, so a concept absent from most images costs only the blocks where it
occurs, not a full mask. Blocks are kept sorted by ``key = mask * num_blocks +
block``; a block of a given mask is found on device by ``searchsorted`` on the
keys (absent = all zeros). Padding bits past P are always zero.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

WORD = 32
_KEY_LIMIT = np.iinfo(np.int32).max


def pack_bits(masks) -> np.ndarray:
    """Boolean ``[..., P]`` -> uint32 words ``[..., ceil(P / 32)]`` (bit j of word w is pixel 32 w + j)."""
    masks = np.asarray(masks, bool)
    p = masks.shape[-1]
    pad = (-p) % WORD
    if pad:
        masks = np.concatenate([masks, np.zeros(masks.shape[:-1] + (pad,), bool)], -1)
    packed = np.packbits(masks, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)


@dataclasses.dataclass(frozen=True)
class SparseMasks:
    """``num_masks`` boolean masks over ``num_pixels`` pixels, stored as sorted non-zero blocks.

    ``blocks [K, block_words]`` uint32, ``keys [K]`` (``mask * num_blocks + block``,
    ascending), ``counts [num_masks]`` pixels set per mask (int64).
    """

    blocks: np.ndarray
    keys: np.ndarray
    counts: np.ndarray
    num_masks: int
    num_pixels: int
    block_words: int

    @property
    def num_blocks(self) -> int:
        return -(-self.num_pixels // (WORD * self.block_words))

    @property
    def mask_ids(self) -> np.ndarray:
        return (self.keys // self.num_blocks).astype(np.int32)

    @property
    def block_ids(self) -> np.ndarray:
        return (self.keys % self.num_blocks).astype(np.int32)

    @classmethod
    def from_dense(cls, masks, block_words: int = 16, chunk: int = 64) -> "SparseMasks":
        """From boolean ``[M, P]`` (NumPy or JAX), ``chunk`` masks at a time."""
        masks = np.asarray(masks)
        if masks.ndim != 2:
            raise ValueError(f"masks must be boolean [masks, pixels], got shape {masks.shape}")
        return cls.from_chunks((masks[i : i + chunk] for i in range(0, masks.shape[0], chunk)),
                               masks.shape[1], block_words)

    @classmethod
    def from_chunks(cls, chunks, num_pixels: int, block_words: int = 16) -> "SparseMasks":
        """From an iterable of boolean ``[m_i, P]`` arrays (consecutive masks), packing each as it comes."""
        if block_words < 1:
            raise ValueError(f"block_words must be >= 1, got {block_words}")
        nb = -(-num_pixels // (WORD * block_words))
        blocks, keys, counts, start = [], [], [], 0
        for chunk in chunks:
            chunk = np.asarray(chunk, bool)
            if chunk.ndim != 2 or chunk.shape[1] != num_pixels:
                raise ValueError(f"mask chunk of shape {chunk.shape} does not cover {num_pixels} pixels")
            words = pack_bits(chunk)
            words = np.pad(words, ((0, 0), (0, nb * block_words - words.shape[1])))
            words = words.reshape(chunk.shape[0], nb, block_words)
            nz = words.any(-1)
            m, b = np.nonzero(nz)
            blocks.append(words[m, b])
            keys.append((m.astype(np.int64) + start) * nb + b)
            counts.append(chunk.sum(1, dtype=np.int64))
            start += chunk.shape[0]
        if start * nb >= _KEY_LIMIT:
            raise ValueError(f"{start} masks x {nb} blocks exceed the int32 block keys; use a larger block_words")
        return cls(blocks=np.concatenate(blocks) if blocks else np.zeros((0, block_words), np.uint32),
                   keys=np.concatenate(keys) if keys else np.zeros((0,), np.int64),
                   counts=np.concatenate(counts) if counts else np.zeros((0,), np.int64),
                   num_masks=start, num_pixels=num_pixels, block_words=block_words)

    def to_dense(self) -> np.ndarray:
        """Boolean ``[M, P]`` (for tests and small data)."""
        words = np.zeros((self.num_masks, self.num_blocks, self.block_words), np.uint32)
        words[self.mask_ids, self.block_ids] = self.blocks
        bits = np.unpackbits(words.reshape(self.num_masks, -1).view(np.uint8), axis=-1, bitorder="little")
        return bits[:, : self.num_pixels].astype(bool)

    def device_arrays(self, pad_to: int = 1):
        """``(blocks, keys)`` as JAX arrays, padded to a multiple of ``pad_to`` blocks plus one zero block.

        Padding keys are int32 max, so they sort last and never match a lookup.
        """
        k = self.keys.shape[0]
        total = max(pad_to, -(-(k + 1) // pad_to) * pad_to)
        blocks = np.zeros((total, self.block_words), np.uint32)
        blocks[:k] = self.blocks
        keys = np.full((total,), _KEY_LIMIT, np.int32)
        keys[:k] = self.keys
        return jnp.asarray(blocks), jnp.asarray(keys)


def lookup(keys, blocks, key):
    """Blocks for ``key`` (any shape) from sorted ``keys``; zeros where the block is not stored."""
    pos = jnp.minimum(jnp.searchsorted(keys, key), keys.shape[0] - 1)
    hit = keys[pos] == key
    return jnp.where(hit[..., None], blocks[pos], jnp.uint32(0))
