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


@dataclasses.dataclass(frozen=True)
class ImageMasks:
    """``num_masks`` boolean masks over ``num_images`` images x ``positions`` pixels, stored per image.

    Only the non-empty (mask, image) pairs are kept: ``mask_ids [K]`` and
    ``image_ids [K]`` (int32, sorted by mask then image) and ``words [K, W]``
    uint32, that image's bits (:func:`pack_bits` of its ``positions`` pixels,
    ``W = ceil(positions / 32)``). A concept absent from an image costs
    nothing there; a mask over all ``N * positions`` pixels is image-major.
    """

    mask_ids: np.ndarray
    image_ids: np.ndarray
    words: np.ndarray
    num_masks: int
    num_images: int
    positions: int

    @property
    def words_per_image(self) -> int:
        return -(-self.positions // WORD)

    @property
    def nbytes(self) -> int:
        return self.mask_ids.nbytes + self.image_ids.nbytes + self.words.nbytes

    @property
    def counts(self) -> np.ndarray:
        """Pixels set per mask, int64 ``[num_masks]``."""
        per_row = np.bitwise_count(self.words).sum(1, dtype=np.int64)
        return np.bincount(self.mask_ids, per_row, minlength=self.num_masks).astype(np.int64)

    @classmethod
    def from_pairs(cls, mask_ids, image_ids, words, num_masks: int, num_images: int,
                   positions: int) -> "ImageMasks":
        """From unsorted (mask, image, words) rows; empty rows are dropped, a repeated pair is an error."""
        mask_ids = np.asarray(mask_ids, np.int64).reshape(-1)
        image_ids = np.asarray(image_ids, np.int64).reshape(-1)
        w = -(-positions // WORD)
        words = np.asarray(words, np.uint32).reshape(len(mask_ids), w)
        if mask_ids.size and (mask_ids.min() < 0 or mask_ids.max() >= num_masks or image_ids.min() < 0
                              or image_ids.max() >= num_images):
            raise ValueError(f"mask ids must be in [0, {num_masks}) and image ids in [0, {num_images})")
        keep = words.any(1)
        key = mask_ids[keep] * num_images + image_ids[keep]
        order = np.argsort(key, kind="stable")
        key = key[order]
        if key.size > 1 and (np.diff(key) == 0).any():
            raise ValueError("a (mask, image) pair is given twice; give each image of a mask once")
        return cls(mask_ids=mask_ids[keep][order].astype(np.int32), image_ids=image_ids[keep][order].astype(np.int32),
                   words=np.ascontiguousarray(words[keep][order]), num_masks=int(num_masks),
                   num_images=int(num_images), positions=int(positions))

    @classmethod
    def from_dense(cls, masks, num_images: int) -> "ImageMasks":
        """From boolean ``[M, num_images * positions]`` (image-major)."""
        masks = np.asarray(masks)
        if masks.ndim != 2 or masks.dtype != bool:
            raise ValueError(f"masks must be boolean [masks, pixels], got {masks.dtype} {masks.shape}")
        if num_images < 1 or masks.shape[1] % num_images:
            raise ValueError(f"masks have {masks.shape[1]} pixels, not a multiple of num_images={num_images}")
        m = masks.shape[0]
        return cls.from_words(pack_bits(masks.reshape(m, num_images, -1)), masks.shape[1] // num_images)

    @classmethod
    def from_words(cls, words, positions: int) -> "ImageMasks":
        """From bit-packed ``[M, N, W]`` words (:func:`pack_bits` per image)."""
        words = np.asarray(words, np.uint32)
        m, n, _ = words.shape
        mi, ii = np.nonzero(words.any(-1))
        return cls(mask_ids=mi.astype(np.int32), image_ids=ii.astype(np.int32),
                   words=np.ascontiguousarray(words[mi, ii]), num_masks=m, num_images=n, positions=int(positions))

    @classmethod
    def concat_images(cls, parts) -> "ImageMasks":
        """The masks of consecutive image ranges (e.g. batches) joined into one set over all their images."""
        parts = list(parts)
        if not parts:
            raise ValueError("no masks to join")
        m, p = parts[0].num_masks, parts[0].positions
        if any(x.num_masks != m or x.positions != p for x in parts):
            raise ValueError("masks to join must have the same number of masks and positions per image")
        offsets = np.cumsum([0] + [x.num_images for x in parts])
        mask_ids = np.concatenate([x.mask_ids for x in parts]).astype(np.int64)
        image_ids = np.concatenate([x.image_ids.astype(np.int64) + o for x, o in zip(parts, offsets)])
        order = np.argsort(mask_ids * offsets[-1] + image_ids, kind="stable")
        return cls(mask_ids=mask_ids[order].astype(np.int32), image_ids=image_ids[order].astype(np.int32),
                   words=np.ascontiguousarray(np.concatenate([x.words for x in parts])[order]), num_masks=m,
                   num_images=int(offsets[-1]), positions=p)

    def _starts(self) -> np.ndarray:
        return np.searchsorted(self.mask_ids, np.arange(self.num_masks + 1))

    def take(self, rows) -> "ImageMasks":
        """Masks ``rows`` (any order, repeats allowed) as a new set."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_masks):
            raise ValueError(f"mask rows must be in [0, {self.num_masks})")
        starts = self._starts()
        idx = [np.arange(starts[r], starts[r + 1]) for r in rows]
        sizes = np.asarray([len(i) for i in idx], np.int64)
        idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        return ImageMasks(mask_ids=np.repeat(np.arange(len(rows)), sizes).astype(np.int32),
                          image_ids=self.image_ids[idx], words=self.words[idx], num_masks=len(rows),
                          num_images=self.num_images, positions=self.positions)

    def dense_words(self, mask: int) -> np.ndarray:
        """Mask ``mask`` as bit-packed ``[num_images, W]`` words."""
        lo, hi = np.searchsorted(self.mask_ids, [mask, mask + 1])
        out = np.zeros((self.num_images, self.words_per_image), np.uint32)
        out[self.image_ids[lo:hi]] = self.words[lo:hi]
        return out

    def to_dense(self) -> np.ndarray:
        """Boolean ``[M, num_images * positions]`` (for tests and small data)."""
        words = np.zeros((self.num_masks, self.num_images, self.words_per_image), np.uint32)
        words[self.mask_ids, self.image_ids] = self.words
        bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")[..., : self.positions]
        return bits.reshape(self.num_masks, -1).astype(bool)

    def to_sparse(self, block_words: int = 16, rows: int = 4096) -> SparseMasks:
        """The same masks as :class:`SparseMasks`, images word-aligned (``N * W * 32`` pixels).

        Each image starts at a word boundary; the padding bits are zero in
        every mask, so every count (and IoU) is that of the unpadded masks.
        Built from the stored words, ``rows`` pairs at a time, never a full mask.
        """
        w = self.words_per_image
        nb = -(-self.num_images * w // block_words)
        if self.num_masks * nb >= _KEY_LIMIT:
            raise ValueError(f"{self.num_masks} masks x {nb} blocks exceed the int32 block keys; "
                             "use a larger block_words")
        keys, offsets, values = [], [], []
        for s in range(0, len(self.mask_ids), rows):
            words = self.words[s : s + rows]
            r, k = np.nonzero(words)
            g = self.image_ids[s : s + rows][r].astype(np.int64) * w + k
            keys.append(self.mask_ids[s : s + rows][r].astype(np.int64) * nb + g // block_words)
            offsets.append(g % block_words)
            values.append(words[r, k])
        key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        uniq, inverse = np.unique(key, return_inverse=True)
        blocks = np.zeros((len(uniq), block_words), np.uint32)
        if key.size:
            blocks[inverse, np.concatenate(offsets)] = np.concatenate(values)
        return SparseMasks(blocks=blocks, keys=uniq.astype(np.int64), counts=self.counts,
                           num_masks=self.num_masks, num_pixels=self.num_images * w * WORD, block_words=block_words)
