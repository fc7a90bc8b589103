"""A classifier whose layer ``mixed`` holds planted concepts along the directions of a random rotation.

The ground truth for comparing bases (``launch.compare --demo=planted``,
``docs/bases.md``): 16 concepts, each present at a position of a 16x16 scene
with probability 0.1 and a log-normal strength. :class:`PlantedModel` reads
the concept strengths ``c`` (the input ``image [N, 16, 16, 16]``) and has
three named layers, all without bias:

* ``concepts``: ``c`` itself (identity weights): concept ``k`` is unit ``k``;
* ``mixed``: ``c Q^T``, ``Q`` NetDissect's random rotation (seed 1) of 16
  channels: concept ``k`` lies along ``Q[:, k]``, so no channel is a concept
  detector while a basis aligned with the columns of ``Q`` is;
* ``fc``: the mean over positions of ``mixed``, times ``Q``: the logits are the
  concepts' mean strengths, and the class of a scene is its strongest concept.

:class:`PlantedScenes` is the matching data source: ``image``, ``display``
(each concept a colour), ``seg`` (one channel per concept, label ``k + 1``
where it is present), ``label`` (the class) and the label tables. Both are
deterministic; nothing is downloaded.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

CONCEPTS = 16
SIZE = 16
IMAGES = 256
PRESENT = 0.1
LAYERS = ("concepts", "mixed", "fc")
LABEL_NAMES = ("-",) + tuple(f"concept{k}" for k in range(CONCEPTS))
CATEGORY = "concept"


def rotation() -> np.ndarray:
    """``Q`` (float32 ``[16, 16]``): concept ``k`` of layer ``mixed`` lies along ``Q[:, k]``."""
    from jaxdissect.rotation import random_rotation_powers

    return random_rotation_powers(CONCEPTS, [1.0], 1)[0].astype(np.float32)


class PlantedModel(nn.Module):
    """``concepts`` (identity) -> ``mixed`` (rotated) -> ``fc`` (pooled, rotated back): see the module docstring."""

    num_concepts: int = CONCEPTS

    @nn.compact
    def __call__(self, x):
        c = nn.Dense(self.num_concepts, use_bias=False, name="concepts")(x)
        mixed = nn.Dense(self.num_concepts, use_bias=False, name="mixed")(c)
        return nn.Dense(self.num_concepts, use_bias=False, name="fc")(mixed.mean(axis=(1, 2)))


def planted_model():
    """``(module, variables)`` with the planted weights."""
    q = rotation()
    return PlantedModel(), {"params": {"concepts": {"kernel": jnp.eye(CONCEPTS, dtype=jnp.float32)},
                                       "mixed": {"kernel": jnp.asarray(q.T)}, "fc": {"kernel": jnp.asarray(q)}}}


PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
                    [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195]], np.float32)


class PlantedScenes:
    """``n`` planted scenes (seed ``seed``); item ``i`` is the same scene whatever else is asked."""

    label_names = LABEL_NAMES
    label_categories = ("-",) + (CATEGORY,) * CONCEPTS
    categories = (CATEGORY,)
    classes = LABEL_NAMES[1:]

    def __init__(self, n: int = IMAGES, seed: int = 0):
        self.n, self.seed = int(n), int(seed)
        self.name = f"planted{self.n}"

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> dict:
        return {"kind": "PlantedScenes", "count": self.n, "seed": self.seed, "version": 1}

    def scene(self, i: int) -> np.ndarray:
        """Concept strengths ``[16, 16, 16]`` of scene ``i`` (0 where a concept is absent)."""
        rng = np.random.default_rng([self.seed, int(i)])
        present = rng.random((SIZE, SIZE, CONCEPTS)) < PRESENT
        return (present * np.exp(1.5 * rng.standard_normal((SIZE, SIZE, CONCEPTS)))).astype(np.float32)

    def get_batch(self, indices) -> dict:
        strengths = np.stack([self.scene(i) for i in np.asarray(indices, np.int64)])
        present = strengths > 0
        seg = np.where(present, np.arange(1, CONCEPTS + 1), 0).transpose(0, 3, 1, 2).astype(np.int32)
        colour = np.einsum("nhwk,kc->nhwc", np.minimum(strengths, 1.0), PALETTE) / np.maximum(
            np.minimum(strengths, 1.0).sum(-1, keepdims=True), 1.0)
        return {"image": strengths, "display": np.clip(colour, 0, 255).astype(np.uint8), "seg": seg,
                "label": strengths.sum((1, 2)).argmax(-1).astype(np.int32), "valid": np.ones(len(seg), bool)}
