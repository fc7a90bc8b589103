"""Random rotations of a layer's basis (NetDissect 2017, "is interpretability axis-aligned?").

The 2017 paper rotates the ``C``-dimensional channel space of a layer by a
random orthogonal matrix ``Q`` (or a fractional power ``Q^alpha`` on the
geodesic from the identity to ``Q``) and dissects the rotated activations
``a' = R a`` at every spatial position. The network computes the same thing,
yet the number of unique detectors falls as ``alpha`` goes from 0 to 1.

:func:`random_rotation_powers` builds the matrices the way NetDissect's
``rotate.py`` did, so a seed gives the original's matrices (host NumPy/SciPy,
float64; JAX's PRNG would not match):

1. ``G ~ N(0, 1)^{n x n}`` from ``numpy.random.RandomState(seed).normal``;
   ``G = QR`` (``numpy.linalg.qr``), ``Q <- Q diag(sign R_ii)`` (Haar measure);
   if ``det Q < 0`` the first ROW is negated, so ``Q`` is in SO(n);
2. real Schur form ``Q = W T W^T`` (``scipy.linalg.schur``); the rotation
   angles are ``theta_j = arccos(clip(T_{2j,2j}, -1, 1))``;
3. ``Q^p = W blockdiag_j([[cos p theta_j, -sin p theta_j], [sin p theta_j,
   cos p theta_j]]) W^T``; so ``p = 0`` is the identity and ``p = 1`` is the
   rebuilt ``Q`` (the original ignores the sign of each Schur block, so this
   is a rotation by the same angles, not always bit-equal to step 1's ``Q``);
4. optional ``unpermute``: rows of the full (``p = 1``) rotation, largest
   maximum first, greedily take their largest free column; the result is
   ``P Q^p``, so rotated unit ``i`` stays near original unit ``i`` (counts of
   detectors do not change).

The pairing of channels into planes needs an even ``n``, as in the original.
:func:`rotate_activations` applies ``R`` over the last (channel) axis.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxdissect.errors import JaxDissectError


class RotationError(JaxDissectError, ValueError):
    """A rotation that cannot be built or applied; the message names the fix."""


def random_rotation(n: int, seed: int | None = None) -> np.ndarray:
    """A Haar-random ``n x n`` rotation (det +1), float64, NetDissect's ``randomRotation``."""
    rng = np.random.RandomState(seed) if seed is not None else np.random.RandomState()
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    d = np.diagonal(r)
    out = q @ np.diag(d / np.abs(d))
    if np.linalg.det(out) < 0:
        out[0] = -out[0]
    return out


def _blocks(angles) -> np.ndarray:
    n = 2 * len(angles)
    out = np.zeros((n, n))
    c, s = np.cos(angles), np.sin(angles)
    i = np.arange(0, n, 2)
    out[i, i], out[i, i + 1], out[i + 1, i], out[i + 1, i + 1] = c, -s, s, c
    return out


def random_rotation_powers(n: int, powers: Sequence[float], seed: int | None = 1,
                           unpermute: bool = False) -> list[np.ndarray]:
    """``[P Q^p for p in powers]`` (float64 ``[n, n]``); see the module docstring for the steps."""
    import scipy.linalg

    n = int(n)
    if n < 2 or n % 2:
        raise RotationError(f"a random rotation pairs channels into planes and needs an even channel "
                            f"count >= 2 (NetDissect's construction); got {n}")
    q = random_rotation(n, seed)
    t, w = scipy.linalg.schur(q, output="real")
    angles = np.arccos(np.clip(np.diag(t), -1, 1))[0:n:2]
    perm = np.eye(n)
    if unpermute:
        full = w @ _blocks(angles) @ w.T
        perm = np.zeros((n, n))
        taken = set()
        for row in np.argsort(-np.amax(full, axis=1)):
            for col in np.argsort(-full[row]):
                if col not in taken:
                    perm[col, row] = 1
                    taken.add(col)
                    break
    return [perm @ (w @ _blocks(angles * float(p)) @ w.T) for p in powers]


def rotate_activations(acts, rotation):
    """``a' = R a`` over the channel (last) axis of ``acts [..., C]``; ``rotation [C, C]``."""
    c = acts.shape[-1]
    if tuple(rotation.shape) != (c, c):
        raise RotationError(f"a {rotation.shape[0]}x{rotation.shape[1]} rotation cannot act on a layer with "
                            f"{c} channels; build it with random_rotation_powers({c}, ...)")
    return jnp.einsum("...j,ij->...i", acts, jnp.asarray(rotation, acts.dtype))


def parse_rotation(spec: str) -> tuple[float, int]:
    """``'ALPHA[:SEED]'`` -> ``(alpha, seed)``; the seed defaults to 1 (the original's)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*(?::\s*(-?\d+)\s*)?", spec or "")
    if not m:
        raise RotationError(f"--rotation={spec!r}: give ALPHA[:SEED], e.g. 0.5 or 1:7 (alpha >= 0, integer seed)")
    seed = int(m.group(2)) if m.group(2) is not None else 1
    if seed < 0:
        raise RotationError(f"--rotation={spec!r}: the seed must be >= 0")
    return float(m.group(1)), seed


def layer_rotations(shapes: dict, alpha: float, seed: int = 1, unpermute: bool = False) -> dict:
    """``{layer: float32 Q^alpha}`` for every layer of ``shapes`` (``{layer: (N, H, W, C)}``).

    Each layer gets the matrix for its own channel count with the same seed,
    as the original's probe did per blob.
    """
    out = {}
    for name, shape in shapes.items():
        c = int(shape[-1])
        try:
            out[name] = random_rotation_powers(c, [alpha], seed, unpermute)[0].astype(np.float32)
        except RotationError as e:
            raise RotationError(f"layer {name}: {e}") from e
    return out
