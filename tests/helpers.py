"""Helpers shared by several test files. Test files import them from here, never from each other.

- random weights drawn with NumPy (:func:`numpy_init`), ``launch.dissect``'s settings (:func:`launcher_config`);
- the planted dissection model and scenes (:class:`Planted`, :class:`PlantedScenes`): every unit of layer
  ``det`` is a known detector, so a dissection's labels are known;
- the planted formula model (:class:`ComboPlanted`, :func:`run_combo`) of the explanation tests;
- Broden folders written from planted labels (:func:`write_broden`, :func:`write_planted_broden`);
- references written from the definitions (:func:`reference_quad`, :func:`enumerate_best`,
  :func:`numpy_topk`) and the toy generator's colour segmenter (:func:`toy_segment`).
"""

import collections
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- random weights, launcher settings


def numpy_init(module, shape, seed=1):
    """Random variables drawn with NumPy (``module.init`` would compile JAX's RNG, slow on a busy CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(shape))
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * np.sqrt(2.0 / max(1, np.prod(s.shape[:-1]))))
                        .astype(s.dtype), shapes)


def launcher_config(**kw):
    """``launch.dissect.build``/``run``'s settings dictionary: the flags' values, overridden by ``kw``."""
    base = dict(model=None, layers=None, data=None, segmenter=None, quantile=0.01, miniou=0.04, topk=5,
                thumbsize=100, batch_size=4, output_dir=None, cache_dir=None, num_images=None,
                on_bad_image="raise", checkpoint_every=50, coordinator_address=None, num_processes=None,
                process_id=None)
    base.update(kw)
    return base


# ----------------------------------------------------------------------------- the planted dissection model

SIZE, CELL = 32, 4           # 32x32 images, labels constant on 4x4 cells -> 8x8 segmentation
PLANTED_LABELS = ["-", "disc", "window", "wood", "sky"]
PLANTED_CATS = ["-", "object", "part", "material", "object"]
# Layer "det" unit u fires exactly where label DET[u] is drawn; unit 4 is noise.
DET = [1, 2, 3, 4]
# Layer "mix" permutes "det": unit j of mix is unit MIX[j] of det (4 = the noise unit).
MIX = (3, 4, 0, 2, 1)


class Pool(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.avg_pool(x, (CELL, CELL), strides=(CELL, CELL))


class Permute(nn.Module):
    order: tuple

    @nn.compact
    def __call__(self, x):
        return 2.0 * x[..., jnp.array(self.order)]


class Planted(nn.Module):
    """Input channel c (c < 4) holds the intensity of label c + 1; channel 4 is noise."""

    @nn.compact
    def __call__(self, x):
        det = Pool(name="det")(x)
        mix = Permute(MIX, name="mix")(det)
        return nn.Dense(3, name="fc")(mix.mean((1, 2)))


class PlantedScenes:
    """Cells carry label 1..4 (about 8% of cells each) at a random intensity in [0.5, 1]."""

    label_names = PLANTED_LABELS
    label_categories = PLANTED_CATS
    categories = ["object", "part", "material"]

    def __init__(self, n, seed=0):
        self.n, self.seed, self.name = n, seed, "planted"

    def __len__(self):
        return self.n

    def fingerprint(self):
        return {"kind": "planted", "n": self.n, "seed": self.seed}

    def get_batch(self, indices):
        g = SIZE // CELL
        images, displays, segs = [], [], []
        for i in indices:
            rng = np.random.default_rng([self.seed, int(i)])
            cells = rng.choice(5, size=(g, g), p=[0.68, 0.08, 0.08, 0.08, 0.08])
            intensity = rng.uniform(0.5, 1.0, (g, g))
            x = np.zeros((g, g, 5), np.float32)
            for c in range(1, 5):
                x[..., c - 1] = np.where(cells == c, intensity, 0)
            x = x.repeat(CELL, 0).repeat(CELL, 1)
            x[..., 4] = rng.uniform(0, 1, (SIZE, SIZE))
            images.append(x)
            displays.append((x[..., :3] * 255).astype(np.uint8))
            segs.append(cells[None].astype(np.int32))
        return {"image": np.stack(images), "display": np.stack(displays), "seg": np.stack(segs),
                "valid": np.ones(len(indices), bool)}


# ----------------------------------------------------------------------------- the planted formula model

# Unit 0 of layer "combo" fires exactly where "disc" OR "window" is drawn, unit 1 exactly on "wood", unit 2 is
# noise; at quantile 0.25 the exact threshold is 0, so each planted unit's mask is its formula.
COMBO_IMAGES, COMBO_BATCH = 40, 8


class Combo(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.stack([x[..., 0] + x[..., 1], x[..., 2], x[..., 4]], -1)


class ComboPlanted(nn.Module):
    @nn.compact
    def __call__(self, x):
        combo = Combo(name="combo")(Pool(name="det")(x))
        return combo.mean((1, 2))


def run_combo(tmp_path, name, **kw):
    """Dissect layer "combo" of :class:`ComboPlanted` into ``tmp_path/name``; returns (results, output dir)."""
    from jaxdissect.pipelines.dissect import dissect

    out = str(tmp_path / name)
    results = dissect(ComboPlanted(), {"params": {}}, ["combo"], PlantedScenes(COMBO_IMAGES), "dataset",
                      quantile=0.25, topk=5, thumbsize=16, batch_size=COMBO_BATCH, output_dir=out, progress=False,
                      **kw)
    return results, out


def combo_report(out):
    """The units of layer "combo"'s report.json."""
    return json.load(open(os.path.join(out, "combo", "report.json")))["units"]


# ----------------------------------------------------------------------------- Broden folders


def label_png(path, labels):
    """A Broden label map: label = R + 256 G."""
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0], rgb[..., 1] = labels % 256, labels // 256
    Image.fromarray(rgb).save(path)


BRODEN_LABELS = [  # number, name, category
    (1, "black", "color"), (2, "red", "color"), (3, "dog", "object"), (4, "cat", "object"),
    (5, "leg", "part"), (6, "wood", "material"), (7, "kitchen", "scene"), (8, "dotted", "texture"),
    (9, "a<b & c", "object"), (300, "big", "object"), (301, "head", "part")]
BRODEN_CATS = ["color", "object", "part", "material", "scene", "texture"]
BRODEN_SEG, BRODEN_IMAGE = 8, 16  # label size, image size


def write_broden(root, image_size=BRODEN_IMAGE, seg_size=BRODEN_SEG):
    """A small Broden folder (4 images, two splits, every category, a greyscale file); returns what was planted.

    ``image_size`` and ``seg_size`` are the sizes of the images and label maps.
    """
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images", "sub"))
    planted = []
    rows = []
    specs = [  # split, color, objects (pngs), part (png or int), material, scene ints, texture ints
        ("val", 1, [3, 300], 5, 6, [7], [8]),
        ("train", 2, [4], None, None, [7], []),
        ("val", 2, [9], 301, None, [], [8]),
        ("val", 1, [], 5, 6, [7, 7], []),
    ]
    for n, (split, color, objs, part, mat, scene, texture) in enumerate(specs):
        image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        if n == 2:  # a greyscale file: served as RGB, like the others
            image[:] = image[..., :1]
            Image.fromarray(image[..., 0]).save(os.path.join(root, "images", "sub", f"im{n}.png"))
        else:
            Image.fromarray(image).save(os.path.join(root, "images", "sub", f"im{n}.png"))
        maps = {}

        def plant(cat, value, k):
            lab = np.where(rng.random((seg_size, seg_size)) < 0.5, value, 0).astype(np.int32)
            name = f"sub/im{n}_{cat}{k}.png"
            label_png(os.path.join(root, "images", name), lab)
            maps[(cat, k)] = lab
            return name

        cells = {"color": [plant("color", color, 0)],
                 "object": [plant("object", v, k) for k, v in enumerate(objs)],
                 "part": [] if part is None else [plant("part", part, 0)],
                 "material": [] if mat is None else [plant("material", mat, 0)],
                 "scene": [str(s) for s in scene], "texture": [str(t) for t in texture]}
        if n == 3:  # an integer in a pixel category labels the whole image
            cells["part"] = ["5"]
            maps[("part", 0)] = np.full((seg_size, seg_size), 5, np.int32)
        rows.append([f"sub/im{n}.png", split, image_size, image_size, seg_size, seg_size]
                    + [";".join(cells[c]) for c in BRODEN_CATS])
        planted.append((image, maps, scene, texture))
    with open(os.path.join(root, "index.csv"), "w") as f:
        f.write("image,split,ih,iw,sh,sw," + ",".join(BRODEN_CATS) + "\n")
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")
    with open(os.path.join(root, "category.csv"), "w") as f:
        f.write("name,first,last,count,frequency\n")
        for c in BRODEN_CATS:
            f.write(f"{c},0,0,0,0\n")
    with open(os.path.join(root, "label.csv"), "w") as f:
        f.write("number,name,category,frequency,coverage,syns\n")
        for num, name, cat in BRODEN_LABELS:
            f.write(f'{num},"{name}",{cat}(1),1,1.0,\n')
    for c in BRODEN_CATS:
        with open(os.path.join(root, f"c_{c}.csv"), "w") as f:
            f.write("code,number,name,frequency,coverage\n")
            for k, (num, name, cat) in enumerate([x for x in BRODEN_LABELS if x[2] == c]):
                f.write(f'{k + 1},{num},"{name}",1,1.0\n')
            if c == "part":  # 'dog' also appears as a part, with less coverage
                f.write('9,3,"dog",1,0.5\n')
    return planted


# The 2017 scoring's planted folder: 8 images, labels drawn per category channel, scene and texture labels.
ND2017_CATS = ["color", "object", "part", "material", "scene", "texture"]
ND2017_LABELS = {1: ("red", "color"), 2: ("blue", "color"), 3: ("dog", "object"), 4: ("cat", "object"),
                 5: ("leg", "part"), 6: ("wood", "material"), 7: ("kitchen", "scene"), 8: ("street", "scene"),
                 9: ("dotted", "texture"), 10: ("unseen", "object")}
ND2017_IMAGES, ND2017_IMAGE, ND2017_SEG = 8, 16, 8


def write_planted_broden(root):
    """Images, pixel maps per category channel and image-level labels; returns what was planted."""
    rng = np.random.default_rng(3)
    os.makedirs(os.path.join(root, "images"))
    planted = []
    rows = []
    for n in range(ND2017_IMAGES):
        image = rng.integers(0, 256, (ND2017_IMAGE, ND2017_IMAGE, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(root, "images", f"im{n}.png"))
        maps, cells = [], {c: [] for c in ND2017_CATS}

        def plant(cat, values, k):
            lab = rng.choice(np.array(values, np.int32), size=(ND2017_SEG, ND2017_SEG))
            name = f"im{n}_{cat}{k}.png"
            label_png(os.path.join(root, "images", name), lab)
            cells[cat].append(name)
            maps.append(lab)

        plant("color", [0, 1, 2], 0)
        plant("object", [0, 0, 3, 4, 6] if n % 2 else [0, 3, 4], 0)   # wood (material) inside object maps
        if n == 1:
            plant("object", [0, 0, 0, 3], 1)                           # a second object map on one image
        if n % 3 == 0:
            plant("part", [0, 0, 5], 0)
        if n in (2, 5):
            plant("material", [0, 6], 0)
        scalars = []
        if n < 5:                                                       # images 5..7 carry no scene label
            cells["scene"] = [str(7 if n % 2 else 8)]
            scalars.append(7 if n % 2 else 8)
        if n in (0, 6):
            cells["texture"] = ["9"]
            scalars.append(9)
        rows.append([f"im{n}.png", "val", ND2017_IMAGE, ND2017_IMAGE, ND2017_SEG, ND2017_SEG] + [";".join(cells[c]) for c in ND2017_CATS])
        planted.append((image, maps, scalars))
    with open(os.path.join(root, "index.csv"), "w") as f:
        f.write("image,split,ih,iw,sh,sw," + ",".join(ND2017_CATS) + "\n")
        f.writelines(",".join(str(v) for v in r) + "\n" for r in rows)
    with open(os.path.join(root, "category.csv"), "w") as f:
        f.write("name,first,last,count,frequency\n")
        f.writelines(f"{c},0,0,0,0\n" for c in ND2017_CATS)
    with open(os.path.join(root, "label.csv"), "w") as f:
        f.write("number,name,category,frequency,coverage,syns\n")
        f.write("0,-,-,0,0,\n")
        f.writelines(f'{k},"{name}",{cat}(1),1,1.0,\n' for k, (name, cat) in ND2017_LABELS.items())
    for c in ND2017_CATS:
        with open(os.path.join(root, f"c_{c}.csv"), "w") as f:
            f.write("code,number,name,frequency,coverage\n")
            members = [(k, name) for k, (name, cat) in ND2017_LABELS.items() if cat == c]
            f.writelines(f'{j + 1},{k},"{name}",1,0.9\n' for j, (k, name) in enumerate(members))
            if c == "object":
                f.write(f'{len(members) + 1},6,"wood",1,0.3\n')        # less coverage than as a material
    return planted


class Tiny(nn.Module):
    """2x2 average pooling then a 1x1 projection ``proj``: an 8x8x6 layer on the 8x8 label grid."""

    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(6, name="proj")(x)


# ----------------------------------------------------------------------------- references from the definitions


def reference_quad(obj, n_object, quirk):
    """The original's expand_segment_quad on one [h, w] map, with BFS labelling (8-connected)."""
    h, w = obj.shape
    comp = np.zeros((h, w), int)
    num = 0
    for y in range(h):
        for x in range(w):
            if obj[y, x] == 0 or comp[y, x]:
                continue
            num += 1
            comp[y, x] = num
            queue = collections.deque([(y, x)])
            while queue:
                cy, cx = queue.popleft()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if (0 <= ny < h and 0 <= nx < w and not comp[ny, nx]
                                and obj[ny, nx] == obj[y, x]):
                            comp[ny, nx] = num
                            queue.append((ny, nx))
    tb, lr = obj.copy(), obj.copy()
    last = num if quirk else num + 1
    for label in range(1, last):
        mask = comp == label
        ys, xs = np.nonzero(mask)
        vmid = (ys.min() + ys.max() + 1) // 2
        hmid = (xs.min() + xs.max() + 1) // 2
        rows, cols = np.indices((h, w))
        tb += mask * np.where(rows < vmid, n_object, 3 * n_object)
        lr += mask * np.where(cols < hmid, 2 * n_object, 4 * n_object)
    tb[tb <= n_object] = 0
    lr[lr <= n_object] = 0
    return tb, lr, comp


def np_iou(f, u):
    inter = np.count_nonzero(f & u)
    union = np.count_nonzero(f | u)
    return inter / union if union else 0.0


def enumerate_best(u, c, length):
    """Exhaustive best IoU over all left-grown formulas of up to ``length`` concepts (NumPy, no pruning)."""
    best = 0.0
    level = list(c)
    for depth in range(1, length + 1):
        best = max(best, max(np_iou(f, u) for f in level))
        if depth == length:
            break
        level = [g for f in level for x in c for g in (f | x, f & x, f & ~x)]
    return best


def numpy_topk(params, acts, k):
    """Codes and reconstruction written from the definition, one position at a time."""
    x = np.asarray(acts, np.float64).reshape(-1, params["b_dec"].shape[0])
    codes = np.zeros((len(x), params["w_dec"].shape[0]))
    for i, row in enumerate(x):
        pre = np.maximum((row - params["b_dec"]) @ params["w_enc"] + params["b_enc"], 0)
        top = np.argsort(-pre, kind="stable")[:k]
        codes[i, top] = pre[top]
    return codes, codes @ params["w_dec"] + params["b_dec"]


def random_sae(rng, channels, units):
    w = rng.standard_normal((units, channels)).astype(np.float32)
    return {"w_enc": (rng.standard_normal((channels, units)) * 0.5).astype(np.float32),
            "b_enc": (rng.standard_normal(units) * 0.1).astype(np.float32),
            "w_dec": w / np.linalg.norm(w, axis=1, keepdims=True),
            "b_dec": (rng.standard_normal(channels) * 0.1).astype(np.float32)}


def toy_segment(images):
    """The toy generator's colour "segmenter" at full resolution: 0 none, 1 red, 2 green, 3 blue."""
    from jaxdissect.models import toy_generator

    return toy_generator.color_segment(images, downsample=1)


# CLIP-Dissect's similarity functions (float64, from the formulas)


def _top(target, k):
    """[k, units] image indices of each unit's k largest values, ties to the lower index."""
    return np.argsort(-target, axis=0, kind="stable")[:k]


def _logsumexp(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def ref_soft_wpmi(clip, target, top_k=100, a=10, lam=1, min_prob=1e-7, p_start=0.998, p_end=0.97, soft=True):
    clip = np.asarray(clip, np.float64)
    logits = a * clip
    prob = np.exp(logits - _logsumexp(logits, 1)[:, None])
    inds = _top(np.asarray(target, np.float64), top_k)
    w = p_start - np.arange(top_k) / top_k * (p_start - p_end) if soft else np.ones(top_k)
    units = target.shape[1]
    s = np.zeros((units, clip.shape[1]))
    for u in range(units):
        pc = prob[inds[:, u]]
        s[u] = np.sum(np.log(1 + w[:, None] * (pc - 1) + min_prob), axis=0)
    prob_d = _logsumexp(s, 0) - np.log(units)
    # The score is a small difference of sums of top_k logs: float32 rounding scales with the sums.
    return s - lam * prob_d[None, :], np.max(np.abs(s))


def ref_wpmi(clip, target, top_k=28, a=2, lam=0.6, min_prob=1e-7):
    return ref_soft_wpmi(clip, target, top_k, a, lam, min_prob, soft=False)


def ref_cos(clip, target):
    c = np.asarray(clip, np.float64)
    t = np.asarray(target, np.float64)
    cn, tn = np.linalg.norm(c, axis=0), np.linalg.norm(t, axis=0)
    c = np.where(cn > 0, c / np.where(cn > 0, cn, 1), 0)
    t = np.where(tn > 0, t / np.where(tn > 0, tn, 1), 0)
    return t.T @ c


def ref_cos_cubed(clip, target, min_norm=1e-3):
    def prep(x):
        x = np.asarray(x, np.float64)
        x = (x - x.mean(0, keepdims=True)) ** 3
        return x / np.maximum(np.linalg.norm(x, axis=0, keepdims=True), min_norm)

    return prep(target).T @ prep(clip)


def ref_rank_reorder(clip, target, p=3, top_fraction=0.05, scale_p=0.5):
    clip = np.asarray(clip, np.float64)
    target = np.asarray(target, np.float64)
    n = int(target.shape[0] * top_fraction)
    inds = _top(target, n)
    out = np.zeros((target.shape[1], clip.shape[1]))
    for u in range(target.shape[1]):
        v = target[inds[:, u], u]  # descending
        baseline = np.mean(np.abs(v[:, None] - v[None, :]) ** p)
        for c in range(clip.shape[1]):
            x = clip[inds[:, u], c]
            rank = np.argsort(np.argsort(x, kind="stable"), kind="stable")
            reorg = v[::-1][rank]
            err = np.mean(np.abs(v - reorg) ** p) / baseline
            out[u, c] = -err / np.mean(x) ** scale_p
    return out
