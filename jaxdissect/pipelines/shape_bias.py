"""How much each unit depends on shape rather than texture (spec 3.5), for every chosen layer.

Data: pairs of an original image and its stylized copy (``launch.stylize``:
same shapes, a painting's textures). Per layer and unit:

1. ``s_99``, ``u_99``: the exact 0.99 quantiles of the stylized resp. original
   images' activations, upsampled to 64x64 (the default geometry);
2. ``I``: over all pairs and feature-map pixels at the layer's native
   resolution, the mean of ``[stylized act > s_99] * [original act > u_99]``;
3. score ``I / (0.02 - I)`` clamped to ``[0, 1]``: the IoU of the two masks
   if each covered 1% of the pixels. (``I >= 0.02``, which two 1% masks
   cannot reach, scores 1.)

``u_99`` is computed here from the original images of the pairs; the
original read it from the dissection's quantile sketch (the same level of
the same activations, at the dissection's resolution). With a dissection
directory, units with IoU ``>= 0.04`` are the ones graphed, as the original.

Outputs in ``output_dir``: per layer ``<layer>/shape_bias.npz`` (``score``,
``intersection``, ``s_99``, ``u_99``, stylized top-k), ``<layer>/s_imgs`` and
``<layer>/su_imgs`` unit strips (the stylized top 5 images, and their
originals, masked at ``s_99`` resp. ``u_99``); ``shape_bias.json`` and
``shape_bias.png`` (per layer: units with score > 0.1 and <= 0.1). All
passes are resumable (``jaxdissect.streaming.run_stream`` in ``work/``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import fileio
from jaxdissect import layers as layer_api
from jaxdissect.data.folders import DataSourceError, open_rgb, list_image_files
from jaxdissect.interventions.common import InterventionError
from jaxdissect.kernels import quantile as quantile_k
from jaxdissect.kernels import topk as topk_k
from jaxdissect.kernels import upsample as upsample_k
from jaxdissect.plotting import pyplot, save_figure

LEVEL = 0.99
RESOLUTION = 64
SCORE_CUTOFF = 0.1
MIN_IOU = 0.04
_STYLIZED = re.compile(r"^(?P<stem>.*)-stylized-.*$")
_PLACES = re.compile(r"^(.*Places365_\w+_\d+)")


def shape_bias_score(intersection) -> np.ndarray:
    """``I / (0.02 - I)`` clamped to [0, 1]; ``I >= 0.02`` gives 1."""
    i = np.asarray(intersection, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(i >= 0.02, 1.0, i / (0.02 - i))
    return np.clip(s, 0.0, 1.0)


def _pair_key(root: str, path: str, stylized: bool) -> str:
    rel = os.path.relpath(path, root)
    folder, name = os.path.split(rel)
    stem = os.path.splitext(name)[0]
    if stylized:
        m = _STYLIZED.match(stem) or _PLACES.match(stem)
        stem = m.group(1) if m else stem
    return os.path.join(folder, stem)


def resize_crop(image, size: int = 256):
    """Shorter side to ``size`` (bilinear), centre crop ``size`` x ``size``: torchvision's Resize + CenterCrop."""
    from PIL import Image

    w, h = image.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    image = image.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


class PairedFolders:
    """Original and stylized images paired by name (``<stem>-stylized-<style>`` or ``...Places365_<split>_<n>``).

    ``get_batch`` gives ``original``/``stylized`` model inputs (``normalization``
    convention), their ``*_display`` bytes and ``valid``.
    """

    def __init__(self, original_root: str, stylized_root: str, *, size: int = 256, normalization: str = "imagenet"):
        originals = {_pair_key(original_root, p, False): p for p in list_image_files(original_root)}
        self.pairs = []
        unmatched = []
        for p in list_image_files(stylized_root):
            key = _pair_key(stylized_root, p, True)
            if key in originals:
                self.pairs.append((originals[key], p))
            else:
                unmatched.append(os.path.relpath(p, stylized_root))
        if unmatched:
            raise DataSourceError(f"{len(unmatched)} stylized images have no original in {original_root} "
                                  f"(e.g. {unmatched[0]}); pair names are <stem>-stylized-<style>.<ext> in the "
                                  "same sub-folder as <stem>.<ext>")
        if not self.pairs:
            raise DataSourceError(f"no stylized images in {stylized_root}; make them with python -m launch.stylize")
        self.size, self.normalization = size, normalization
        self.roots = (original_root, stylized_root)

    def __len__(self) -> int:
        return len(self.pairs)

    def get_batch(self, indices) -> dict:
        from jaxdissect.preprocess import renormalize

        out = {}
        for j, kind in enumerate(("original", "stylized")):
            display = np.stack([resize_crop(open_rgb(self.pairs[int(i)][j]), self.size) for i in indices])
            out[kind + "_display"] = display
            out[kind] = renormalize(display.astype(np.float32) / 255.0, "pt", self.normalization).astype(np.float32)
        out["valid"] = np.ones(len(indices), bool)
        return out

    def fingerprint(self) -> dict:
        listing = "\n".join(f"{a}\t{b}" for a, b in self.pairs)
        return {"kind": "PairedFolders", "roots": list(self.roots), "count": len(self), "size": self.size,
                "pairs_sha256": hashlib.sha256(listing.encode()).hexdigest()[:16]}


def _batches(source, batch_size: int, n: int):
    def gen(start):
        for b in range(start, -(-n // batch_size)):
            pos = np.arange(b * batch_size, (b + 1) * batch_size)
            batch = source.get_batch(np.minimum(pos, n - 1))
            batch["valid"] = np.asarray(batch["valid"]) & (pos < n)
            batch["index"] = pos.astype(np.int32)
            yield batch
    return gen


def shape_bias(module, variables, layers: Sequence[str], source, output_dir: str, *, dissection: str | None = None,
               batch_size: int = 10, num_images: int | None = None, topk: int = 100, strip_images: int = 5,
               thumb: int = 128) -> dict:
    """The whole experiment (module docstring); returns the JSON summary."""
    from jaxdissect.streaming import run_stream

    layers = list(layers)
    n = min(len(source), num_images or len(source))
    probe = source.get_batch([0])
    shapes = layer_api.layer_shapes(module, variables, probe["original"])
    bad = [name for name in layers if name not in shapes or len(getattr(shapes[name], "shape", ())) != 4]
    if bad:
        four_d = [k for k, v in shapes.items() if len(getattr(v, "shape", ())) == 4]
        raise InterventionError(f"unknown or non-spatial layers {bad}; layers with feature maps: {', '.join(four_d)}")
    hw = {name: tuple(shapes[name].shape[1:3]) for name in layers}
    units = {name: int(shapes[name].shape[-1]) for name in layers}
    taps = {name: upsample_k.make_taps(hw[name], (RESOLUTION, RESOLUTION), "original") for name in layers}
    cfg = {"layers": layers, "data": source.fingerprint(), "n": n, "batch_size": batch_size, "topk": topk}
    work = os.path.join(output_dir, "work")
    gen = _batches(source, batch_size, n)
    num_batches = -(-n // batch_size)
    pix = RESOLUTION * RESOLUTION

    @jax.jit
    def acts(v, x):
        return layer_api.capture(module, v, x, layers)[1]

    def rows(name, a):
        return upsample_k.apply_taps(a, *taps[name]).reshape(-1, units[name])

    # Pass 1: high-bit histograms of both image sets, stylized top-k.
    def step1(state, batch):
        valid = jnp.repeat(jnp.asarray(batch["valid"]), pix)
        ao, as_ = acts(variables, batch["original"]), acts(variables, batch["stylized"])
        return {name: {"u": quantile_k.high_update(state[name]["u"], rows(name, ao[name]), valid),
                       "s": quantile_k.high_update(state[name]["s"], rows(name, as_[name]), valid),
                       "top": topk_k.update(state[name]["top"], as_[name], batch["valid"], batch["index"])}
                for name in layers}

    init1 = {name: {"u": quantile_k.high_init(units[name]), "s": quantile_k.high_init(units[name]),
                    "top": topk_k.init(units[name], topk)} for name in layers}
    st1 = run_stream(jax.jit(step1), init1, gen, num_batches=num_batches, workdir=os.path.join(work, "pass1"), config=cfg,
                     desc="shape bias: quantiles 1/2")
    sel = {name: {k: quantile_k.select(jax.tree.map(np.asarray, st1[name][k]), LEVEL) for k in ("u", "s")}
           for name in layers}

    # Pass 2: low-bit histograms inside the selected buckets -> exact quantiles.
    def step2(state, batch):
        valid = jnp.repeat(jnp.asarray(batch["valid"]), pix)
        ao, as_ = acts(variables, batch["original"]), acts(variables, batch["stylized"])
        return {name: {"u": quantile_k.low_update(state[name]["u"], rows(name, ao[name]), valid),
                       "s": quantile_k.low_update(state[name]["s"], rows(name, as_[name]), valid)} for name in layers}

    init2 = {name: {k: quantile_k.low_init(sel[name][k]) for k in ("u", "s")} for name in layers}
    st2 = run_stream(jax.jit(step2), init2, gen, num_batches=num_batches, workdir=os.path.join(work, "pass2"), config=cfg,
                     desc="shape bias: quantiles 2/2")
    q = {name: {k: np.asarray(quantile_k.finish(sel[name][k], jax.tree.map(np.asarray, st2[name][k])), np.float32)
                for k in ("u", "s")} for name in layers}

    # Pass 3: the intersection of the two masks at the native resolution.
    def step3(state, batch):
        valid = jnp.asarray(batch["valid"]).astype(jnp.float32)
        ao, as_ = acts(variables, batch["original"]), acts(variables, batch["stylized"])
        out = {}
        for name in layers:
            both = (as_[name] > q[name]["s"]) & (ao[name] > q[name]["u"])
            out[name] = state[name] + jnp.einsum("bhwu,b->u", both.astype(jnp.float32), valid)
        return out

    init3 = {name: jnp.zeros((units[name],), jnp.float32) for name in layers}
    st3 = run_stream(jax.jit(step3), init3, gen, num_batches=num_batches, workdir=os.path.join(work, "pass3"),
                     config={**cfg, "levels": {k: {kk: hashlib.sha256(v.tobytes()).hexdigest()[:12]
                                                   for kk, v in d.items()} for k, d in q.items()}},
                     desc="shape bias: intersection")

    summary = {"layers": {}, "images": n, "level": LEVEL, "score_cutoff": SCORE_CUTOFF}
    for name in layers:
        inter = np.asarray(st3[name], np.float64) / (n * hw[name][0] * hw[name][1])
        score = shape_bias_score(inter)
        top = topk_k.merge(jax.tree.map(lambda a: np.asarray(a)[None], st1[name]["top"]), hw[name][0] * hw[name][1])
        d = os.path.join(output_dir, name)
        os.makedirs(d, exist_ok=True)
        fileio.savez(os.path.join(d, "shape_bias.npz"), score=score, intersection=inter, s_99=q[name]["s"],
                     u_99=q[name]["u"], s_top_values=top["top_values"], s_top_index=top["top_index"])
        iou = _dissection_iou(dissection, name, units[name]) if dissection else None
        graphed = np.ones(units[name], bool) if iou is None else iou >= MIN_IOU
        summary["layers"][name] = {
            "units": units[name], "graphed_units": int(graphed.sum()),
            "shape_units": int((graphed & (score > SCORE_CUTOFF)).sum()),
            "texture_units": int((graphed & (score <= SCORE_CUTOFF)).sum()),
            "mean_score": float(score[graphed].mean()) if graphed.any() else None,
        }
        if strip_images:
            _strips(module, variables, name, source, top["top_index"][:, :strip_images], q[name], d, thumb)
    fileio.write_json(os.path.join(output_dir, "shape_bias.json"), summary)
    plot_summary(summary, os.path.join(output_dir, "shape_bias.png"))
    return summary


def _dissection_iou(dissection: str, layer: str, num_units: int) -> np.ndarray:
    path = os.path.join(dissection, layer, "arrays.npz")
    if not os.path.exists(path):
        raise InterventionError(f"no dissection of {layer!r} in {dissection} ({path} missing); run "
                                f"python -m launch.dissect --layers={layer} --output_dir={dissection} first, "
                                "or leave out --dissection to graph every unit")
    with np.load(path) as z:
        iou = np.asarray(z["label_iou"] if "label_iou" in z else z["iou"], np.float64)
    iou = iou.max(1) if iou.ndim == 2 else iou
    if iou.shape != (num_units,):
        raise InterventionError(f"{path} has {iou.shape[0]} units; the model's {layer!r} has {num_units}")
    return iou


def _strips(module, variables, layer, source, top_index, levels, directory, thumb) -> None:
    """``s_imgs/unit<u>.jpg`` (stylized, masked at s_99) and ``su_imgs`` (their originals, masked at u_99)."""
    from PIL import Image

    from jaxdissect.reports.strips import masked_thumbnail, unit_strip

    wanted = np.unique(top_index[top_index >= 0])
    if not len(wanted):
        return
    batch = source.get_batch(wanted)
    where = {int(i): j for j, i in enumerate(wanted)}
    _, ao = layer_api.capture(module, variables, batch["original"], [layer])
    _, as_ = layer_api.capture(module, variables, batch["stylized"], [layer])
    ao, as_ = np.asarray(ao[layer]), np.asarray(as_[layer])
    for kind, key, a, lv in (("s_imgs", "stylized_display", as_, levels["s"]),
                             ("su_imgs", "original_display", ao, levels["u"])):
        os.makedirs(os.path.join(directory, kind), exist_ok=True)
        for u in range(top_index.shape[0]):
            thumbs = [masked_thumbnail(batch[key][where[int(i)]], a[where[int(i)], :, :, u], float(lv[u]), thumb)
                      for i in top_index[u] if i >= 0]
            if thumbs:
                Image.fromarray(unit_strip(thumbs)).save(os.path.join(directory, kind, f"unit{u}.jpg"), quality=95)


def plot_summary(summary: dict, path: str) -> None:
    """Per layer: units with shape-bias score above and at most the cutoff (the original's two graphs in one)."""
    plt = pyplot()

    names = list(summary["layers"])
    shape = [summary["layers"][n]["shape_units"] for n in names]
    texture = [summary["layers"][n]["texture_units"] for n in names]
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(names), 3.5))
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, shape, 0.4, label=f"score > {SCORE_CUTOFF} (shape)", color="tab:orange")
    ax.bar(xs + 0.2, texture, 0.4, label=f"score <= {SCORE_CUTOFF} (texture)", color="tab:gray")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel("units")
    ax.set_title("Shape bias of units (stylized vs original images)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
