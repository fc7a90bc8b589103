"""Generator latents exactly as the original draws them (``netdissect/zdataset.py``, spec 1.6).

NumPy's legacy ``RandomState`` is used on purpose, not ``jax.random``: the
dissection of a GAN is defined on the original's z's (10000 of them, seed 1),
and this reproduces them bit for bit. Draws are prefix-stable: the first k
rows are the same for any ``size >= k``.
"""

from __future__ import annotations

import numpy as np


def standard_z_sample(size: int, depth: int = 512, seed: int = 1) -> np.ndarray:
    """``size`` standard-normal latents, float32 ``[size, depth]``, identical to the original's."""
    if size < 0 or depth < 1:
        raise ValueError(f"standard_z_sample needs size >= 0 and depth >= 1, got size={size}, depth={depth}")
    rng = np.random.RandomState(seed)
    return rng.standard_normal(size * depth).reshape(size, depth).astype(np.float32)
