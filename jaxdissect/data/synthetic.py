"""Synthetic scenes with known pixel labels: the embedded default dissection dataset.

Each 64x64 image shows two or three objects (shapes) on a grey, slightly noisy
background, one object per quadrant so they never overlap. Every object has a
material (a texture pattern) and a colour, all drawn at random; the scene class
is defined only by which two objects are present (``kitchen`` = disc + square,
...), and a third object, when present, never completes another class's pair.
A classifier trained on the classes therefore has to learn shape detectors,
which dissection should then find.

Pixel labels come from the same geometry that draws the image, so they are
exact. The segmentation ``seg`` is ``int32 [B, 3, 16, 16]`` (downsample 4,
majority of each 4x4 block) with channels ``[object, material, colour]`` in one
merged numbering (0 = no label). The source follows the data-source contract of
the dissection pipeline (``get_batch`` -> ``image``, ``display``, ``seg``,
``label``, ``valid``) and is deterministic: item ``i`` depends only on
``(seed, i)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

OBJECTS = ("disc", "square", "triangle", "bar", "ring", "cross")
MATERIALS = ("stripes", "dots", "checker", "noise")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
    "white": (245, 245, 245),
}
# Scene class -> the two objects that define it (a ring of pairs, so a third
# object can be chosen that completes no other class's pair).
SCENES = {
    "kitchen": ("disc", "square"),
    "bedroom": ("square", "triangle"),
    "street": ("triangle", "bar"),
    "forest": ("bar", "ring"),
    "beach": ("ring", "cross"),
    "office": ("cross", "disc"),
}
CATEGORIES = ["object", "material", "color"]
LABEL_NAMES = ["-"] + list(OBJECTS) + list(MATERIALS) + list(COLORS)
LABEL_CATEGORIES = ["-"] + ["object"] * len(OBJECTS) + ["material"] * len(MATERIALS) + ["color"] * len(COLORS)
OBJECT_BASE = 1
MATERIAL_BASE = OBJECT_BASE + len(OBJECTS)
COLOR_BASE = MATERIAL_BASE + len(MATERIALS)
BACKGROUND = 90
VERSION = 1


def _third_objects() -> list[list[int]]:
    """Per class, the objects that may join its pair without completing another class's pair."""
    pairs = [frozenset(OBJECTS.index(o) for o in p) for p in SCENES.values()]
    allowed = []
    for pair in pairs:
        ok = [d for d in range(len(OBJECTS)) if d not in pair
              and not any(q <= (pair | {d}) for q in pairs if q != pair)]
        allowed.append(ok)
    return allowed


_THIRD = _third_objects()


def _disc(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8


def _triangle(u, v):  # apex up
    return (v >= -0.9) & (v <= 0.8) & (np.abs(u) <= (v + 0.9) / 1.7)


def _bar(u, v):  # horizontal
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.3)


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55 ** 2)


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.28) & (av <= 1.0)) | ((av <= 0.28) & (au <= 1.0))


# Membership of object-centred points (u, v), in units of the object's radius.
SHAPES = dict(disc=_disc, square=_square, triangle=_triangle, bar=_bar, ring=_ring, cross=_cross)


def _stripes(y, x, noise):  # diagonal, period 6
    return ((x + y) // 3) % 2


def _dots(y, x, noise):
    return ((x % 6) - 2.5) ** 2 + ((y % 6) - 2.5) ** 2 <= 4.0


def _checker(y, x, noise):
    return ((x // 4) + (y // 4)) % 2


def _noise(y, x, noise):
    return noise


# Brightness pattern (0 or 1) at integer, phase-shifted pixel coordinates.
TEXTURES = dict(stripes=_stripes, dots=_dots, checker=_checker, noise=_noise)


class SyntheticScenes:
    """A deterministic dataset of ``n`` synthetic scenes (see the module docstring)."""

    label_names = LABEL_NAMES
    label_categories = LABEL_CATEGORIES
    categories = CATEGORIES
    class_names = list(SCENES)

    def __init__(self, n: int, seed: int = 0, size: int = 64, downsample: int = 4,
                 third_object: float = 0.5, noise: float = 6.0):
        if n < 0:
            raise ValueError(f"dataset size must be >= 0, got {n}")
        if size % (2 * downsample) or size < 32:
            raise ValueError(f"image size {size} must be >= 32 and a multiple of 2 * downsample = {2 * downsample}")
        self.n, self.seed, self.size, self.downsample = int(n), int(seed), int(size), int(downsample)
        self.third_object, self.noise = float(third_object), float(noise)
        self.name = f"synthetic-{self.seed}"

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> dict:
        """Everything that determines the items (changes if the data would change)."""
        return dict(name="synthetic-scenes", version=VERSION, n=self.n, seed=self.seed, size=self.size,
                    downsample=self.downsample, third_object=self.third_object, noise=self.noise)

    def objects(self, index: int) -> list[dict]:
        """The objects drawn in item ``index``: shape, material, colour, quadrant, centre ``(y, x)``, radius, phase."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for a dataset of {self.n} scenes")
        rng = np.random.default_rng([self.seed, int(index)])
        cls = int(rng.integers(len(SCENES)))
        shapes = [OBJECTS.index(o) for o in SCENES[self.class_names[cls]]]
        if rng.random() < self.third_object:
            shapes.append(int(rng.choice(_THIRD[cls])))
        quadrants = rng.permutation(4)[:len(shapes)]
        half = self.size // 2
        out = []
        for shape, quad in zip(shapes, quadrants):
            radius = rng.uniform(0.30, 0.42) * half
            slack = half / 2 - radius
            cy = (quad // 2) * half + half / 2 + rng.uniform(-slack, slack)
            cx = (quad % 2) * half + half / 2 + rng.uniform(-slack, slack)
            out.append(dict(shape=OBJECTS[shape], material=MATERIALS[int(rng.integers(len(MATERIALS)))],
                            color=list(COLORS)[int(rng.integers(len(COLORS)))], quadrant=int(quad),
                            center=(float(cy), float(cx)), radius=float(radius),
                            phase=int(rng.integers(12)), scene=cls))
        return out

    def _render(self, indices: Sequence[int]):
        """``display uint8 [B, S, S, 3]``, full-resolution labels ``int32 [B, 3, S, S]``, classes.

        Objects lie inside their quadrant, so each is drawn on a ``S/2 x S/2`` patch,
        grouped by shape and material to keep the work vectorised.
        """
        b, s, half = len(indices), self.size, self.size // 2
        specs = [self.objects(i) for i in indices]
        objs = [(bi, o) for bi, os_ in enumerate(specs) for o in os_]
        n = len(objs)
        img_of = np.array([bi for bi, _ in objs], np.int64)
        quad = np.array([o["quadrant"] for _, o in objs], np.int64)
        shape = np.array([OBJECTS.index(o["shape"]) for _, o in objs], np.int64)
        material = np.array([MATERIALS.index(o["material"]) for _, o in objs], np.int64)
        color = np.array([list(COLORS).index(o["color"]) for _, o in objs], np.int64)
        col = lambda key, j: np.array([o[key][j] for _, o in objs], np.float32).reshape(n, 1, 1)
        oy, ox = (quad // 2 * half).reshape(n, 1, 1), (quad % 2 * half).reshape(n, 1, 1)
        cy, cx = col("center", 0) - oy, col("center", 1) - ox
        radius = np.array([o["radius"] for _, o in objs], np.float32).reshape(n, 1, 1)
        phase = np.array([o["phase"] for _, o in objs], np.int64).reshape(n, 1, 1)
        ly, lx = np.mgrid[0:half, 0:half].astype(np.float32)
        # Pixel centres at integer coordinates.
        u, v = (lx - cx) / radius, (ly - cy) / radius
        inside = np.zeros((n, half, half), bool)
        for k, name in enumerate(OBJECTS):
            sel = shape == k
            inside[sel] = SHAPES[name](u[sel], v[sel])
        noise = np.stack([np.random.default_rng([self.seed, int(i), 1]).random((s, s)) < 0.5
                          for i in indices]) if b else np.zeros((0, s, s), bool)
        gy = (ly.astype(np.int64) + oy)
        gx = (lx.astype(np.int64) + ox)
        bright = np.zeros((n, half, half), np.float32)
        for k, name in enumerate(MATERIALS):
            sel = material == k
            pattern = TEXTURES[name](gy[sel] + phase[sel], gx[sel] + phase[sel], noise[img_of[sel, None, None], gy[sel], gx[sel]])
            bright[sel] = 0.55 + 0.45 * np.asarray(pattern, np.float32)
        palette = np.array(list(COLORS.values()), np.float32)
        rgb = palette[color][:, None, None, :] * bright[..., None]
        image = np.full((b, 2, half, 2, half, 3), float(BACKGROUND), np.float32)
        labels = np.zeros((b, 3, 2, half, 2, half), np.int32)
        qy, qx = quad // 2, quad % 2
        image[img_of, qy, :, qx] = np.where(inside[..., None], rgb, image[img_of, qy, :, qx])
        for c, value in enumerate((OBJECT_BASE + shape, MATERIAL_BASE + material, COLOR_BASE + color)):
            labels[img_of, c, qy, :, qx] = np.where(inside, value[:, None, None], 0)
        grain = np.stack([np.random.default_rng([self.seed, int(i), 2]).normal(0, self.noise, (s, s, 3))
                          for i in indices]) if b else 0.0
        display = np.clip(np.rint(image.reshape(b, s, s, 3) + grain), 0, 255).astype(np.uint8)
        classes = np.array([o[0]["scene"] for o in specs], np.int32)
        return display, labels.reshape(b, 3, s, s), classes

    def pixel_labels(self, indices: Sequence[int]) -> np.ndarray:
        """Full-resolution labels ``int32 [B, 3, size, size]`` (the segmentation before downsampling)."""
        return self._render(indices)[1]

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """``image`` (float32 in [-1, 1]), ``display``, ``seg``, ``label`` and ``valid`` for ``indices``."""
        indices = [int(i) for i in indices]
        display, labels, classes = self._render(indices)
        return dict(
            image=preprocess(display),
            display=display,
            seg=block_majority(labels, self.downsample),
            label=classes,
            valid=np.ones(len(indices), bool),
        )


def block_majority(labels: np.ndarray, factor: int) -> np.ndarray:
    """Downsample ``[B, K, H, W]`` labels by the most common label of each block (ties: smallest)."""
    b, k, h, w = labels.shape
    blocks = labels.reshape(b, k, h // factor, factor, w // factor, factor).transpose(0, 1, 2, 4, 3, 5)
    blocks = blocks.reshape(b, k, h // factor, w // factor, factor * factor)
    nlabels = int(blocks.max(initial=0)) + 1
    keys = np.arange(blocks[..., 0].size).reshape(blocks.shape[:-1] + (1,)) * nlabels + blocks
    counts = np.bincount(keys.ravel(), minlength=blocks[..., 0].size * nlabels)
    best = counts.reshape(blocks.shape[:-1] + (nlabels,)).argmax(-1)
    return best.astype(np.int32)


def preprocess(display: np.ndarray) -> np.ndarray:
    """The model input for display images: bytes scaled to [-1, 1]."""
    return np.asarray(display, np.float32) / 127.5 - 1.0
