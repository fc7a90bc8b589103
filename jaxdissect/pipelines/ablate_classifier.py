"""The classifier ablation experiment of spec 3.3, resumable: what each unit of a layer does for each class.

:func:`classifier_ablation_experiment` runs the whole experiment on a val and
a train source (``python -m launch.ablate_classifier``): single-unit sweeps,
per-class unit rankings, ablating or keeping each class's top units, unit
importance against dissection IoU, and the paper's plots. Every pass is a
piece cached in the work directory. The reusable pieces (counts, metrics,
sweeps, rankings) are in :mod:`jaxdissect.interventions.classifier`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxdissect import fileio
from jaxdissect import layers as layer_api
from jaxdissect.interventions import classifier as ci
from jaxdissect.interventions.classifier import (
    IMPORTANT_TOP,
    as_source,
    class_index,
    class_unit_masks,
    clean_counts,
    importance_buckets,
    perclass_metrics,
    rank_units,
    set_counts,
    unit_importance,
)
from jaxdissect.interventions.common import InterventionError
from jaxdissect.plotting import pyplot, save_figure

DEFAULT_SIZES = (1, 2, 3, 4, 5, 20, 64, 128, 256)


def classifier_ablation_experiment(
    module,
    variables,
    layer: str,
    val_data,
    train_data,
    work_dir: str,
    *,
    class_names: Sequence[str] | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    plot_class: str | None = None,
    full_classes: Sequence[str] = (),
    iou_path: str | None = None,
    batch_size: int = 32,
    val_items: int | None = None,
    train_items: int | None = None,
    method: str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
    basis=None,
    **apply_kwargs,
) -> dict:
    """The whole of spec 3.3, resumable: every piece is cached in ``work_dir`` and never recomputed.

    1. val and train passes: clean counts plus every single-unit ablation;
    2. per class, units ranked by train BA after single-unit ablation;
    3. for each ``n`` in ``sizes``, on val: ablate each class's ``n`` top
       units, and keep only them (ablate the rest);
    4. unit importance (classes for which a unit is in the top 4) and, given
       ``iou_path``, its relation to dissection IoU;
    5. for each class in ``full_classes`` (the paper used computer_room,
       hangar-indoor, ski_resort, volleyball_court-outdoor), every n = 1 .. U-1.

    Writes ``summary.json``, ``results.npz`` and plots (``ice-all-classes.png``,
    ``ice-one-class.png``, ``ice-vs-iou.png``) to ``work_dir``; returns the summary.

    ``basis``: ``(Basis, params)`` (:mod:`jaxdissect.bases`, e.g. a trained
    SAE): the "units" are then the basis's features, each removed by
    :class:`jaxdissect.layers.FeatureEdit` (its decoded contribution
    subtracted, the reconstruction error kept; ``iou_path`` the report of the
    basis's dissection). The cached pieces record the basis's identity: a
    directory of another basis is refused.
    """
    os.makedirs(work_dir, exist_ok=True)
    val, train = as_source(val_data), as_source(train_data)
    class_names = list(class_names if class_names is not None else (getattr(val, "classes", None) or []))
    plot_idx = class_index(class_names, plot_class) if plot_class else None
    full_idx = [class_index(class_names, name) for name in full_classes]
    sizes = sorted({int(n) for n in sizes})
    common = dict(batch_size=batch_size, apply_kwargs=apply_kwargs, basis=basis)

    def piece(name: str, compute: Callable[[str], dict]) -> dict:
        path = os.path.join(work_dir, f"{name}.npz")
        if os.path.exists(path):
            return {k: (v.item() if v.ndim == 0 else v) for k, v in np.load(path, allow_pickle=False).items()}
        if os.path.exists(os.path.join(work_dir, f"{name}.partial.npz")):
            raise InterventionError(
                f"{os.path.join(work_dir, name + '.partial.npz')} is a partial result of an older version "
                "(the sweep now resumes through jaxdissect.streaming.run_stream); delete it to recompute")
        partial = os.path.join(work_dir, f"{name}.partial")
        result = compute(partial)
        fileio.savez(path, **{k: np.asarray(v) for k, v in result.items()})
        shutil.rmtree(partial, ignore_errors=True)
        return result

    def prog(name):
        return (lambda b, n: progress(name, b, n)) if progress else None

    def singles(source, items, name):
        return lambda ck: ci.evaluate_counts(module, variables, layer, source, single_units=np.arange(num_units),
                                             method=method, num_items=items, checkpoint=ck, progress=prog(name),
                                             **common)

    x = np.zeros((1,) + np.asarray(val.get_batch([0])["image"]).shape[1:], np.float32)
    shape = layer_api.layer_shapes(module, variables, x, **apply_kwargs).get(layer)
    if shape is None or isinstance(shape, tuple):
        raise InterventionError(
            f"unknown layer {layer!r}; {type(module).__name__} has: "
            + ", ".join(layer_api.layer_names(module, variables, x, **apply_kwargs))
        )
    num_units = int(shape.shape[-1]) if basis is None else basis[0].num_units(basis[1], int(shape.shape[-1]))
    _check_basis_record(work_dir, basis)
    bad = [n for n in sizes if not 0 < n < num_units]
    if bad:
        raise InterventionError(f"sizes {bad} out of range; n must be between 1 and {num_units - 1}")

    val_single = piece("pra_val_single_units", singles(val, val_items, "val single units"))
    train_single = piece("pra_train_single_units", singles(train, train_items, "train single units"))
    num_classes = int(val_single["num_classes"])
    if class_names and len(class_names) != num_classes:
        raise InterventionError(f"{len(class_names)} class names for a model with {num_classes} classes")
    if not class_names:
        class_names = [str(i) for i in range(num_classes)]

    train_ba = perclass_metrics(set_counts(train_single))["balanced_accuracy"]
    order = rank_units(train_ba)
    val_base = perclass_metrics(clean_counts(val_single))
    train_base = perclass_metrics(clean_counts(train_single))

    per_n = {}
    for n in sizes:
        ablate, keep = class_unit_masks(order, n)
        res = piece(f"pra_val_classunits_n{n}", lambda ck, a=ablate, k=keep, n=n: ci.evaluate_counts(
            module, variables, layer, val, masks=np.concatenate([a, k]), num_items=val_items, checkpoint=ck,
            progress=prog(f"val top-{n} sets"), **common))
        ba = perclass_metrics(set_counts(res))["balanced_accuracy"]  # [2C, C]
        idx = np.arange(num_classes)
        per_n[n] = {"ablate": ba[idx, idx], "keep": ba[num_classes + idx, idx]}

    full_curves = {}
    for name, c in zip(full_classes, full_idx):
        ns = np.arange(1, num_units)
        top = np.zeros((len(ns), num_units), bool)
        for i, n in enumerate(ns):
            top[i, order[c, :n]] = True
        res = piece(f"pra_val_class_{_safe(name)}_all_n", lambda ck, t=top, name=name: ci.evaluate_counts(
            module, variables, layer, val, masks=np.concatenate([t, ~t]), num_items=val_items, checkpoint=ck,
            progress=prog(f"val {name} n=1..{num_units - 1}"), **common))
        ba = perclass_metrics(set_counts(res))["balanced_accuracy"][:, c]
        full_curves[name] = {"ablate": ba[: len(ns)], "keep": ba[len(ns):]}

    importance = unit_importance(order)
    iou = labels = None
    if iou_path:
        iou, labels = read_unit_iou(iou_path, num_units)
    buckets = importance_buckets(importance, iou)

    val_single_ba = perclass_metrics(set_counts(val_single))["balanced_accuracy"]
    summary = {
        "layer": layer,
        **({} if basis is None else {"basis": basis[0].describe()}),
        "num_units": num_units,
        "num_classes": num_classes,
        "val_images": int(val_single["total"]),
        "train_images": int(train_single["total"]),
        "val_accuracy": float(np.sum(val_single["clean_correct"]) / max(int(val_single["total"]), 1)),
        "mean_balanced_accuracy": {
            "val_baseline": float(np.nanmean(val_base["balanced_accuracy"])),
            "train_baseline": float(np.nanmean(train_base["balanced_accuracy"])),
            "ablate_top": {str(n): float(np.nanmean(per_n[n]["ablate"])) for n in sizes},
            "keep_only_top": {str(n): float(np.nanmean(per_n[n]["keep"])) for n in sizes},
        },
        "importance_histogram": buckets,
        "classes": {},
        "all_n": {name: {"ablate_top_ba": [_f(v) for v in curve["ablate"]],
                         "keep_only_top_ba": [_f(v) for v in curve["keep"]]} for name, curve in full_curves.items()},
    }
    for c, name in enumerate(class_names):
        top = order[c, :IMPORTANT_TOP]
        summary["classes"][name] = {
            "val_baseline_ba": _f(val_base["balanced_accuracy"][c]),
            "top_units": [
                {"unit": int(u), "train_ba_drop": _f(train_base["balanced_accuracy"][c] - train_ba[u, c]),
                 "val_ba_drop": _f(val_base["balanced_accuracy"][c] - val_single_ba[u, c]),
                 **({"label": labels[u]} if labels else {}), **({"iou": _f(iou[u])} if iou is not None else {})}
                for u in top
            ],
            "ablate_top_ba": {str(n): _f(per_n[n]["ablate"][c]) for n in sizes},
            "keep_only_top_ba": {str(n): _f(per_n[n]["keep"][c]) for n in sizes},
        }
    arrays = {
        "order": order, "importance": importance, "sizes": np.asarray(sizes),
        "train_single_ba": train_ba, "val_single_ba": val_single_ba,
        "val_baseline_ba": val_base["balanced_accuracy"], "train_baseline_ba": train_base["balanced_accuracy"],
        "val_ablate_top_ba": np.stack([per_n[n]["ablate"] for n in sizes]),
        "val_keep_only_top_ba": np.stack([per_n[n]["keep"] for n in sizes]),
    }
    if iou is not None:
        arrays["iou"] = iou
    fileio.savez(os.path.join(work_dir, "results.npz"), **arrays)
    fileio.write_json(os.path.join(work_dir, "summary.json"), summary)
    if plot_idx is None:
        drops = val_base["balanced_accuracy"] - per_n[sizes[0]]["ablate"]
        plot_idx = int(np.nanargmax(drops))
    plot_results(work_dir, arrays, class_names, plot_idx, labels)
    return summary


def _check_basis_record(work_dir: str, basis) -> None:
    """A basis's ablations keep its identity in ``basis.json`` beside the pieces; pieces of other units are refused."""
    path = os.path.join(work_dir, "basis.json")
    record = None if basis is None else json.loads(json.dumps(basis[0].identity(basis[1])))
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
    else:  # pieces without a record are of the layer's own units
        stored = None if any(n.startswith("pra_") for n in os.listdir(work_dir)) else record
    if stored != record:
        held = "the features of another basis" if stored else "the layer's own units"
        raise InterventionError(f"{work_dir} holds ablations of {held}; give another directory or delete it to "
                                "recompute")
    if record is not None and not os.path.exists(path):
        fileio.write_json(path, record)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _f(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def plot_results(work_dir: str, arrays: dict[str, Any], class_names: Sequence[str], plot_class: int,
                 labels: Sequence[str] | None = None) -> list[str]:
    """The paper's three plots from ``results.npz`` arrays; returns the written paths."""
    plt = pyplot()

    written = []
    sizes = arrays["sizes"]
    fig, ax = plt.subplots(figsize=(6, 4))
    base = np.nanmean(arrays["val_baseline_ba"])
    ax.axhline(base, color="gray", ls="--", label=f"no units removed ({base:.1%})")
    ax.plot(sizes, np.nanmean(arrays["val_ablate_top_ba"], axis=1), "o-", color="tab:red",
            label="n most important units removed")
    ax.plot(sizes, np.nanmean(arrays["val_keep_only_top_ba"], axis=1), "o-", color="tab:blue",
            label="all but the n most important removed")
    ax.set_xscale("log")
    ax.set_xlabel("n (units)")
    ax.set_ylabel("mean balanced single-class accuracy (val)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(save_figure(fig, os.path.join(work_dir, "ice-all-classes.png"), dpi=100))

    c = plot_class
    top = arrays["order"][c, :8]
    train_drop = arrays["train_baseline_ba"][c] - arrays["train_single_ba"][top, c]
    val_drop = arrays["val_baseline_ba"][c] - arrays["val_single_ba"][top, c]
    fig, ax = plt.subplots(figsize=(7, 4))
    pos = np.arange(len(top))
    ax.bar(pos - 0.2, train_drop, 0.4, label="train")
    ax.bar(pos + 0.2, val_drop, 0.4, label="val")
    ax.set_xticks(pos, [f"unit {u}" + (f"\n{labels[u]}" if labels else "") for u in top], fontsize=7)
    ax.set_ylabel(f"balanced accuracy lost ({class_names[c]})")
    ax.set_title(f"Most important units for {class_names[c]}")
    ax.legend()
    fig.tight_layout()
    written.append(save_figure(fig, os.path.join(work_dir, "ice-one-class.png"), dpi=100))

    buckets = importance_buckets(arrays["importance"], arrays.get("iou"))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(buckets["bucket"], buckets["units"], color="tab:gray")
    ax.set_xlabel(f"number of classes for which the unit is among the top {IMPORTANT_TOP}")
    ax.set_ylabel("units")
    if "mean_iou" in buckets:
        ax2 = ax.twinx()
        ax2.plot(buckets["bucket"], [np.nan if v is None else v for v in buckets["mean_iou"]], "o-", color="tab:red")
        ax2.set_ylabel("mean IoU of the unit's best concept", color="tab:red")
    fig.tight_layout()
    written.append(save_figure(fig, os.path.join(work_dir, "ice-vs-iou.png"), dpi=100))
    return written


def read_unit_iou(path: str, num_units: int) -> tuple[np.ndarray, list[str] | None]:
    """Per-unit IoU (and labels) from a dissection ``report.json`` or an ``.npz``/``.npy`` of IoUs.

    An npz needs an ``iou`` array ``[U]`` or ``[U, L]`` (best label per unit taken).
    """
    if not os.path.exists(path):
        raise InterventionError(f"IoU file {path} does not exist; pass a dissection report.json or an iou npz")
    labels = None
    if path.endswith(".json"):
        with open(path) as f:
            report = json.load(f)
        if "units" not in report:
            raise InterventionError(f"{path} is not a dissection report.json (no 'units' list)")
        iou = np.full(num_units, np.nan)
        labels = [""] * num_units
        for u in report["units"]:
            if 0 <= int(u["unit"]) < num_units:
                v = u.get("iou")
                iou[int(u["unit"])] = float(v) if v not in (None, "NaN", "nan") else np.nan
                labels[int(u["unit"])] = str(u.get("label", ""))
    else:
        loaded = np.load(path, allow_pickle=False)
        iou = loaded["iou"] if hasattr(loaded, "files") else loaded
        iou = np.asarray(iou, np.float64)
        if iou.ndim == 2:
            iou = iou.max(axis=1) if iou.shape[0] == num_units else iou.max(axis=0)
    if iou.shape != (num_units,):
        raise InterventionError(f"{path} has IoUs for {iou.shape} units; the layer has {num_units}")
    return iou, labels
