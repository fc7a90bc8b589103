"""What one unit responds to (spec 3.6): its per-image peak activation, split into groups of images.

* Classifier unit: the per-image maximum of the unit's **pre-ReLU** activation
  (``"<layer>:pre"``, see :mod:`jaxdissect.layers`) over a dataset, split by
  chosen classes (each chosen class, and all other images); the balanced
  accuracy of the best single threshold separating the chosen classes from
  the rest.
* Generator unit: the per-image peak activation of the unit, split into
  images where more than ``fraction`` of the segmentation pixels are a
  concept and the rest.

Both passes run through :func:`jaxdissect.streaming.run_stream` (resumable)
and plot a KDE of each group with its images as jittered points
(``unit_plot.png``); the numbers go to ``unit_plot.json`` and ``unit_plot.npz``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import fileio
from jaxdissect import layers as layer_api
from jaxdissect.interventions.common import InterventionError, lookup
from jaxdissect.plotting import pyplot, save_figure


def best_threshold(positive, negative) -> tuple[float, float]:
    """``(threshold, balanced accuracy)`` of the best rule "positive iff value >= threshold".

    Balanced accuracy is the mean of the true positive and true negative
    rates; every distinct value (and +inf, calling everything negative) is a
    candidate; ties go to the lowest threshold.
    """
    pos = np.sort(np.asarray(positive, np.float64))
    neg = np.sort(np.asarray(negative, np.float64))
    if not len(pos) or not len(neg):
        raise InterventionError(f"need images in both groups, got {len(pos)} positive and {len(neg)} negative")
    cands = np.append(np.unique(np.concatenate([pos, neg])), np.inf)
    tpr = (len(pos) - np.searchsorted(pos, cands, side="left")) / len(pos)
    tnr = np.searchsorted(neg, cands, side="left") / len(neg)
    ba = (tpr + tnr) / 2
    i = int(np.argmax(ba))
    return float(cands[i]), float(ba[i])


def _stream(step, state, batches, num_batches, workdir, config, desc):
    from jaxdissect.streaming import run_stream

    return run_stream(step, state, batches, num_batches=num_batches, workdir=workdir, config=config,
                      checkpoint_every=50, desc=desc)


def _unit_index(unit: int, num_units: int) -> int:
    if not 0 <= int(unit) < num_units:
        raise InterventionError(f"unit {unit} out of range; the layer has units 0..{num_units - 1}")
    return int(unit)


def classifier_unit_peaks(module, variables, layer: str, unit: int | None, source, workdir: str, *,
                          pre_relu: bool = True, batch_size: int = 32, num_images: int | None = None) -> dict:
    """Per image the unit's peak (pre-ReLU by default) activation and the label: ``{"peak", "label"}``.

    ``unit=None`` takes every unit of the layer in the same pass: ``peak`` is then ``[N, units]``.
    """
    from jaxdissect.data.loader import batches as loader_batches

    name = f"{layer}:pre" if pre_relu else layer
    n = min(len(source), num_images or len(source))
    x0 = np.asarray(source.get_batch([0])["image"], np.float32)
    shape = jax.eval_shape(lambda x: layer_api.capture(module, variables, x, [name])[1][name],
                           jax.ShapeDtypeStruct(x0.shape, jnp.float32))
    units = shape.shape[-1]
    if unit is not None:
        unit = _unit_index(unit, units)

    @jax.jit
    def peaks(v, x):
        a = layer_api.capture(module, v, x, [name])[1][name]
        a = a.reshape(a.shape[0], -1, a.shape[-1]).max(1)
        return a if unit is None else a[:, unit]

    num_batches = -(-n // batch_size)

    def step(state, batch):
        pos = jnp.asarray(batch["pos"])
        return {"peak": state["peak"].at[pos].set(peaks(variables, jnp.asarray(batch["image"])), mode="drop"),
                "label": state["label"].at[pos].set(jnp.asarray(batch["label"], jnp.int32), mode="drop"),
                "valid": state["valid"].at[pos].set(jnp.asarray(batch["valid"]), mode="drop")}

    def batches(start):
        for b, batch in enumerate(loader_batches(source, batch_size, num_items=n, start=start,
                                                 keys=("image", "label")), start):
            m = len(batch["image"])
            pos = np.arange(b * batch_size, b * batch_size + m)
            valid = np.asarray(batch.get("valid", np.ones(m, bool)))
            yield {"image": batch["image"], "label": batch["label"], "valid": valid & (pos < n),
                   "pos": np.where(pos < n, pos, n)}

    state = {"peak": jnp.zeros((n,) if unit is not None else (n, units), jnp.float32),
             "label": jnp.zeros((n,), jnp.int32), "valid": jnp.zeros((n,), bool)}
    fp = getattr(source, "fingerprint", lambda: {"count": len(source)})()
    desc = f"{name} unit {unit}" if unit is not None else f"{name} units"
    state = _stream(step, state, batches, num_batches, workdir,
                    {"layer": name, "unit": unit, "data": fp, "n": n, "batch_size": batch_size}, desc)
    valid = np.asarray(state["valid"])
    return {"peak": np.asarray(state["peak"])[valid], "label": np.asarray(state["label"])[valid]}


def generator_unit_peaks(module, variables, layer: str, unit: int, z, segment: Callable, concept: int,
                         workdir: str, *, fraction: float = 0.05, batch_size: int = 16) -> dict:
    """Per latent the unit's peak activation and whether the concept covers more than ``fraction``.

    ``segment(images) -> [N, S, h, w]`` integer labels of the generated images
    (as :func:`jaxdissect.segmentation.segment` returns); a pixel is the
    concept when any of its ``S`` label channels is ``concept``.
    """
    if not 0.0 <= fraction < 1.0:
        raise InterventionError(f"fraction={fraction} must be in [0, 1)")
    z = np.asarray(z, np.float32)
    n = len(z)
    shape = layer_api.layer_shapes(module, variables, z[:1])
    if layer not in shape:
        raise InterventionError(f"unknown layer {layer!r}; the generator has: {', '.join(shape)}")
    unit = _unit_index(unit, shape[layer].shape[-1])

    @jax.jit
    def forward(v, zb):
        images, acts = layer_api.capture(module, v, zb, [layer])
        a = acts[layer][..., unit]
        return images, a.reshape(a.shape[0], -1).max(1)

    def step(state, batch):
        images, peak = forward(variables, jnp.asarray(batch["z"]))
        seg = jnp.asarray(segment(images))
        share = jnp.mean(jnp.any(seg == concept, axis=1).reshape(seg.shape[0], -1).astype(jnp.float32), axis=1)
        pos = jnp.asarray(batch["pos"])
        return {"peak": state["peak"].at[pos].set(peak, mode="drop"),
                "share": state["share"].at[pos].set(share, mode="drop")}

    num_batches = -(-n // batch_size)

    def batches(start):
        for b in range(start, num_batches):
            pos = np.arange(b * batch_size, (b + 1) * batch_size)
            yield {"z": z[np.minimum(pos, n - 1)], "pos": np.where(pos < n, pos, n)}

    state = {"peak": jnp.zeros((n,), jnp.float32), "share": jnp.zeros((n,), jnp.float32)}
    import hashlib

    config = {"layer": layer, "unit": unit, "concept": int(concept), "batch_size": batch_size,
              "z": hashlib.sha256(z.tobytes()).hexdigest()[:16]}
    state = _stream(step, state, batches, num_batches, workdir, config, f"{layer} unit {unit}")
    share = np.asarray(state["share"])
    return {"peak": np.asarray(state["peak"]), "share": share, "has_concept": share > fraction}


def classifier_unit_plot(module, variables, layer: str, unit: int | None, source, output_dir: str, *,
                         class_names: Sequence[str], classes: Sequence[str], pre_relu: bool = True,
                         batch_size: int = 32, num_images: int | None = None) -> dict:
    """Peaks of a classifier unit by class; writes ``unit_plot.{png,json,npz}``; returns the summary.

    ``source``'s labels index ``class_names`` (``jaxdissect.data.classes.model_labelled``
    maps a data set's labels to a model's classes). ``unit=None``: the unit
    of the layer whose best single threshold separates ``classes`` from the
    other images best (ties: the lowest index), from the same pass.
    """
    wanted = [lookup(class_names, c, "class") for c in classes]
    if not wanted:
        raise InterventionError("give at least one class to split the images by")
    os.makedirs(output_dir, exist_ok=True)
    res = classifier_unit_peaks(module, variables, layer, unit, source, os.path.join(output_dir, "work"),
                                pre_relu=pre_relu, batch_size=batch_size, num_images=num_images)
    peak, label = res["peak"], res["label"]
    chosen = np.isin(label, wanted)
    if unit is None:
        scores = [best_threshold(p[chosen], p[~chosen])[1] for p in peak.T]
        unit = int(np.argmax(scores))
        peak = peak[:, unit]
    groups = {class_names[c]: peak[label == c] for c in wanted}
    groups["other classes"] = peak[~chosen]
    threshold, ba = best_threshold(peak[chosen], peak[~chosen])
    what = f"{layer} unit {unit} ({'pre-ReLU' if pre_relu else 'post-ReLU'} peak)"
    summary = {"layer": layer, "unit": int(unit), "pre_relu": pre_relu, "classes": list(classes),
               "threshold": threshold, "balanced_accuracy": ba,
               "groups": {k: {"count": int(len(v)), "mean": float(v.mean()) if len(v) else None}
                          for k, v in groups.items()}}
    _write(output_dir, summary, groups, what, threshold, ba, peak=peak, label=label)
    return summary


def generator_unit_plot(module, variables, layer: str, unit: int, z, segment: Callable, concept: str,
                        concept_names: Sequence[str], output_dir: str, *, fraction: float = 0.05,
                        batch_size: int = 16) -> dict:
    """Peaks of a generator unit for images with more than ``fraction`` of ``concept`` vs the rest."""
    c = lookup(concept_names, concept, "concept")
    os.makedirs(output_dir, exist_ok=True)
    res = generator_unit_peaks(module, variables, layer, unit, z, segment, c, os.path.join(output_dir, "work"),
                               fraction=fraction, batch_size=batch_size)
    has = res["has_concept"]
    groups = {f"> {fraction:g} {concept}": res["peak"][has], "the rest": res["peak"][~has]}
    threshold, ba = (best_threshold(res["peak"][has], res["peak"][~has]) if has.any() and (~has).any()
                     else (float("nan"), float("nan")))
    summary = {"layer": layer, "unit": int(unit), "concept": concept, "fraction": fraction,
               "threshold": threshold, "balanced_accuracy": ba,
               "groups": {k: {"count": int(len(v)), "mean": float(v.mean()) if len(v) else None}
                          for k, v in groups.items()}}
    _write(output_dir, summary, groups, f"{layer} unit {unit} (peak)", threshold, ba, peak=res["peak"],
           share=res["share"])
    return summary


def _write(output_dir, summary, groups, what, threshold, ba, **arrays) -> None:
    def clean(v):
        if isinstance(v, float) and not np.isfinite(v):
            return None
        return {k: clean(x) for k, x in v.items()} if isinstance(v, dict) else v

    fileio.write_json(os.path.join(output_dir, "unit_plot.json"), clean(summary))
    fileio.savez(os.path.join(output_dir, "unit_plot.npz"), **arrays)
    plot_groups(groups, os.path.join(output_dir, "unit_plot.png"), what, threshold, ba)


def plot_groups(groups: dict, path: str, what: str, threshold: float, ba: float, seed: int = 0) -> None:
    """One row per group: its KDE (scaled to the row) and its images as jittered points; the threshold line."""
    from scipy.stats import gaussian_kde

    plt = pyplot()

    rng = np.random.default_rng(seed)
    names = list(groups)
    values = np.concatenate([np.asarray(v, np.float64) for v in groups.values()])
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    grid = np.linspace(lo - pad, hi + pad, 400)
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.9 * len(names)))
    for row, name in enumerate(names):
        v = np.asarray(groups[name], np.float64)
        base = len(names) - 1 - row
        if len(v) > 1 and np.ptp(v) > 0:
            dens = gaussian_kde(v)(grid)
            ax.fill_between(grid, base, base + 0.8 * dens / dens.max(), alpha=0.35, color=f"C{row}")
        ax.scatter(v, base + rng.uniform(0.05, 0.35, len(v)), s=6, alpha=0.8, color=f"C{row}")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1)
    ax.set_yticks(np.arange(len(names))[::-1] + 0.3)
    ax.set_yticklabels([f"{n} ({len(groups[n])})" for n in names])
    ax.set_xlabel(what)
    ax.set_title(f"best single threshold: balanced accuracy {ba:.3f}" if np.isfinite(ba) else what)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
