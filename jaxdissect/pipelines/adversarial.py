"""Which units an adversarial attack changes (PNAS 2020, Fig. 7), for any classifier and layer.

For each target class: the first ``num_images`` images (in the data's order)
whose label and prediction are both not the target are attacked toward it
(Carlini-Wagner L2 by default, or PGD). For each image the peak activation of
every unit of ``layer`` (its maximum over the feature map) is taken before
and after; the change ``|peak(adv) - peak(orig)|`` is grouped as

* **target**: the 4 most important units of the target class,
* **source**: the 4 most important units of the source class (the original
  prediction),
* **other**: every unit in neither group,

importance being the classifier ablation experiment's ranking on train
(``results.npz`` ``order`` of ``jaxdissect.pipelines.ablate_classifier``,
written by ``python -m launch.ablate_classifier``). Only successful attacks
count. Per image the mean change of each group is taken; the bar chart shows
their mean over images with a 99% interval (2.58 standard errors).

Outputs in ``output_dir``: ``adversarial.json`` (every number),
``adversarial.png`` (the bar chart), per target ``<target>/images.npz``
(original and adversarial images in the ``[0, 1]`` box, dataset indices,
source and adversarial predictions, success, every unit's peak before and
after) and ``<target>/examples.png``
(originals, adversarials, their difference amplified). Each target runs
resumably in ``<target>/work`` (``jaxdissect.streaming.run_stream``);
finished targets are restored, not recomputed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxdissect import attacks as atk
from jaxdissect import fileio
from jaxdissect import layers as layer_api
from jaxdissect.interventions.common import InterventionError
from jaxdissect.plotting import pyplot, save_figure
from jaxdissect.preprocess import renormalize

# Places365 folder names ('hangar-indoor'); the category list's 'hangar/indoor' spelling is accepted too.
PAPER_TARGETS = ("bedroom", "computer_room", "hangar-indoor", "ski_resort", "volleyball_court-outdoor")
TOP = 4
CI99 = 2.58
GROUPS = ("target", "source", "other")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def resolve_targets(class_names: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    """Class indices of ``targets``; ``a/b`` and ``a-b`` spellings of a Places class name are the same class."""
    out = []
    for t in targets:
        alternates = [t, t.replace("/", "-"), t.replace("-", "/")]
        found = next((a for a in alternates if a in class_names), t)
        out.append(int(atk.class_indices(class_names, [found])[0]))
    return np.asarray(out, np.int32)


def read_ablation_order(ablation_dir: str, layer: str, num_classes: int, num_units: int) -> np.ndarray:
    """Per class the units ranked most important first (``[C, U]``) from the ablation experiment's output."""
    path = os.path.join(ablation_dir, "results.npz")
    command = (f"python -m launch.ablate_classifier --model=<model> --layer={layer} --data=<val> "
               f"--train_data=<train> --output_dir={ablation_dir}")
    if not os.path.exists(path):
        raise InterventionError(f"no classifier ablation result {path}; produce it with: {command}")
    with np.load(path, allow_pickle=False) as z:
        if "order" not in z:
            raise InterventionError(f"{path} has no 'order' array; rerun: {command}")
        order = np.asarray(z["order"])
    summary = os.path.join(ablation_dir, "summary.json")
    if os.path.exists(summary):
        with open(summary) as f:
            ablated = json.load(f).get("layer")
        if ablated is not None and ablated != layer:
            raise InterventionError(f"{ablation_dir} ranks units of layer {ablated!r}, not {layer!r}; "
                                    f"produce the ranking for {layer!r} with: {command}")
    if order.shape != (num_classes, num_units):
        raise InterventionError(f"{path} ranks {order.shape[1]} units for {order.shape[0]} classes; this model's "
                                f"{layer!r} has {num_units} units and {num_classes} classes. Rerun: {command}")
    return order


def group_changes(delta: np.ndarray, order: np.ndarray, target: int, sources: np.ndarray, top: int = TOP) -> dict:
    """Per image mean ``delta`` of the target's, the source's top units and the rest: ``{group: [n]}``."""
    n, u = delta.shape
    tmask = np.zeros(u, bool)
    tmask[order[target, :top]] = True
    smask = np.zeros((n, u), bool)
    smask[np.arange(n)[:, None], order[sources, :top]] = True
    omask = ~(tmask[None] | smask)
    return {
        "target": delta[:, tmask].mean(1),
        "source": (delta * smask).sum(1) / top,
        "other": (delta * omask).sum(1) / np.maximum(omask.sum(1), 1),
    }


def _stats(values: np.ndarray) -> dict:
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    se = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "ci99": CI99 * se, "n": n}


class _Model:
    """The classifier in the pixel box, and its jitted pieces (compiled once per batch shape)."""

    def __init__(self, module, variables, layer: str, normalization: str):
        self.layer = layer

        def logits(v, x):
            return module.apply(v, renormalize(x, "pt", normalization))

        def peaks(v, x):
            _, acts = layer_api.capture(module, v, renormalize(x, "pt", normalization), [layer])
            a = acts[layer]
            return a.reshape(a.shape[0], -1, a.shape[-1]).max(1) if a.ndim > 2 else a

        self.logits_fn = Partial(logits, variables)
        self.predict = jax.jit(lambda v, x: jnp.argmax(logits(v, x), -1))
        self.peaks = jax.jit(peaks)
        self.variables = variables


def select_images(model: _Model, source, targets: np.ndarray, num_images: int, batch_size: int,
                  normalization: str, cache: str) -> dict:
    """Dataset indices and predictions: per target the first ``num_images`` with label and prediction not it."""
    from jaxdissect.progress import progress

    fp = json.dumps(getattr(source, "fingerprint", lambda: {"count": len(source)})(), sort_keys=True, default=str)
    key = json.dumps({"fp": fp, "targets": targets.tolist(), "n": num_images, "norm": normalization})
    if os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return {"indices": z["indices"], "labels": z["labels"], "preds": z["preds"]}
    chosen: list[list[int]] = [[] for _ in targets]
    all_idx, all_labels, all_preds = [], [], []
    bar = progress(total=len(source), desc="choosing images", unit="img")
    for start in range(0, len(source), batch_size):
        idx = np.arange(start, min(start + batch_size, len(source)))
        batch = source.get_batch(idx)
        if "label" not in batch:
            raise InterventionError("the data has no class labels; the attack needs labelled images "
                                    "(a Places-style folder <dir>/<class>/<image>)")
        x = np.clip(renormalize(np.asarray(batch["image"], np.float32), normalization, "pt"), 0.0, 1.0)
        preds = np.asarray(model.predict(model.variables, x))
        valid = np.asarray(batch.get("valid", np.ones(len(idx), bool)))
        for j, i in enumerate(idx):
            if not valid[j]:
                continue
            all_idx.append(i), all_labels.append(int(batch["label"][j])), all_preds.append(int(preds[j]))
            for k, t in enumerate(targets):
                if len(chosen[k]) < num_images and batch["label"][j] != t and preds[j] != t:
                    chosen[k].append(len(all_idx) - 1)
        bar.update(len(idx))
        if all(len(c) >= num_images for c in chosen):
            break
    bar.close()
    pos = np.full((len(targets), num_images), -1, np.int64)
    for k, c in enumerate(chosen):
        pos[k, :len(c)] = c
    all_idx, all_labels, all_preds = map(np.asarray, (all_idx, all_labels, all_preds))
    out = {"indices": np.where(pos >= 0, all_idx[np.maximum(pos, 0)], -1),
           "labels": np.where(pos >= 0, all_labels[np.maximum(pos, 0)], -1),
           "preds": np.where(pos >= 0, all_preds[np.maximum(pos, 0)], -1)}
    fileio.savez(cache, key=np.asarray(key), **out)
    return out


def _attack_fn(attack: str, options: dict):
    if attack == "cw":
        return lambda fn, x, t: atk.carlini_wagner_l2(fn, x, t, **options)
    if attack == "pgd":
        opts = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, **options}

        def run_pgd(fn, x, t):
            adv = atk.pgd(fn, x, t, **opts)
            return adv, jnp.argmax(fn(adv), -1) == t

        return run_pgd
    raise InterventionError(f"unknown attack {attack!r}; choose 'cw' (Carlini-Wagner L2) or 'pgd'")


def _attack_target(model: _Model, source, target: int, indices: np.ndarray, workdir: str,
                   attack, config: dict, normalization: str, batch_size: int, checkpoint_every: int,
                   desc: str) -> dict:
    """Attack ``indices`` toward ``target`` resumably; returns the per-image arrays (and writes image shards)."""
    from jaxdissect.streaming import run_stream

    n = len(indices)
    x0 = np.asarray(source.get_batch(indices[:1])["image"], np.float32)
    units = int(jax.eval_shape(model.peaks, model.variables, jax.ShapeDtypeStruct(x0.shape, jnp.float32)).shape[-1])
    state = {"orig_peak": jnp.zeros((n, units), jnp.float32), "adv_peak": jnp.zeros((n, units), jnp.float32),
             "success": jnp.zeros((n,), bool), "adv_pred": jnp.zeros((n,), jnp.int32)}
    num_batches = -(-n // batch_size)
    shards = os.path.join(workdir, "images")
    os.makedirs(shards, exist_ok=True)

    def batches(start):
        for b in range(start, num_batches):
            pos = np.arange(b * batch_size, (b + 1) * batch_size)
            real = pos < n
            idx = indices[np.minimum(pos, n - 1)]
            batch = source.get_batch(idx)
            x = np.clip(renormalize(np.asarray(batch["image"], np.float32), normalization, "pt"), 0.0, 1.0)
            yield {"b": b, "pos": np.where(real, pos, n), "x": x}

    def step(st, batch):
        x = jnp.asarray(batch["x"])
        t = jnp.full((x.shape[0],), target, jnp.int32)
        adv, success = attack(model.logits_fn, x, t)
        orig_peak = model.peaks(model.variables, x)
        adv_peak = model.peaks(model.variables, adv)
        adv_pred = model.predict(model.variables, adv)
        pos = jnp.asarray(batch["pos"])
        real = np.asarray(batch["pos"]) < n
        fileio.savez(os.path.join(shards, f"batch{batch['b']:05d}.npz"), original=batch["x"][real],
                     adversarial=np.asarray(adv)[real])
        return {"orig_peak": st["orig_peak"].at[pos].set(orig_peak, mode="drop"),
                "adv_peak": st["adv_peak"].at[pos].set(adv_peak, mode="drop"),
                "success": st["success"].at[pos].set(success, mode="drop"),
                "adv_pred": st["adv_pred"].at[pos].set(adv_pred.astype(jnp.int32), mode="drop")}

    state = run_stream(step, state, batches, num_batches=num_batches, workdir=os.path.join(workdir, "work"),
                       config=config, checkpoint_every=checkpoint_every, desc=desc)
    out = {k: np.asarray(v) for k, v in state.items()}
    missing = [b for b in range(num_batches) if not os.path.exists(os.path.join(shards, f"batch{b:05d}.npz"))]
    if missing:
        raise InterventionError(f"image shards {missing[:5]} missing from {shards} although the stream finished; "
                                f"delete {workdir} to recompute this target")
    return out


def adversarial_units(module, variables, layer: str, source, output_dir: str, *, ablation_dir: str,
                      class_names: Sequence[str], targets: Sequence[str] = PAPER_TARGETS, num_images: int = 1000,
                      attack: str = "cw", attack_options: dict | None = None, normalization: str = "imagenet",
                      batch_size: int = 16, checkpoint_every: int = 10, examples: int = 8) -> dict:
    """The whole experiment; writes the outputs listed in the module docstring and returns the JSON summary."""
    attack_options = dict(attack_options or {})
    attack_fn = _attack_fn(attack, attack_options)
    class_names = list(class_names)
    target_ids = resolve_targets(class_names, list(targets))
    if num_images < 1 or batch_size < 1:
        raise InterventionError(f"num_images and batch_size must be positive, got {num_images} and {batch_size}")
    os.makedirs(output_dir, exist_ok=True)
    model = _Model(module, variables, layer, normalization)
    x0 = np.asarray(source.get_batch([0])["image"], np.float32)
    shapes = layer_api.layer_shapes(module, variables, x0)
    if layer not in shapes or isinstance(shapes[layer], tuple):
        raise InterventionError(f"unknown layer {layer!r}; {type(module).__name__} has: {', '.join(shapes)}")
    num_units = int(shapes[layer].shape[-1])
    num_classes = int(jax.eval_shape(model.logits_fn, jax.ShapeDtypeStruct(x0.shape, jnp.float32)).shape[-1])
    if num_classes != len(class_names):
        raise InterventionError(f"{len(class_names)} class names for a model with {num_classes} classes")
    order = read_ablation_order(ablation_dir, layer, num_classes, num_units)

    sel = select_images(model, source, target_ids, num_images, batch_size, normalization,
                        os.path.join(output_dir, "selection.npz"))
    summary = {"layer": layer, "attack": attack, "attack_options": attack_options, "num_images": num_images,
               "ablation_dir": os.path.abspath(ablation_dir), "top_units": TOP, "targets": {}}
    for k, (name, t) in enumerate(zip(targets, target_ids)):
        keep = sel["indices"][k] >= 0
        indices, preds = sel["indices"][k][keep], sel["preds"][k][keep]
        if not len(indices):
            raise InterventionError(f"no image with label and prediction other than {name!r} in the data")
        tdir = os.path.join(output_dir, _safe(class_names[t]))
        config = {"layer": layer, "attack": attack, "options": attack_options, "target": int(t),
                  "indices": indices.tolist(), "normalization": normalization, "batch_size": batch_size}
        res = _attack_target(model, source, int(t), indices, tdir, attack_fn, config, normalization,
                             batch_size, checkpoint_every, f"attack -> {class_names[t]}")
        ok = res["success"]
        delta = np.abs(res["adv_peak"] - res["orig_peak"])[ok]
        groups = group_changes(delta, order, int(t), preds[ok])
        _write_images(tdir, indices, preds, res, examples)
        summary["targets"][class_names[t]] = {
            "class_index": int(t), "attacked": int(len(indices)), "succeeded": int(ok.sum()),
            "target_units": order[t, :TOP].tolist(),
            "groups": {g: _stats(v) for g, v in groups.items()},
            "unit_mean_change": delta.mean(0).tolist() if len(delta) else None,
        }
    _write_json(os.path.join(output_dir, "adversarial.json"), summary)
    plot_groups(summary, os.path.join(output_dir, "adversarial.png"))
    return summary


def _write_images(tdir: str, indices, preds, res: dict, examples: int) -> None:
    shards = sorted(f for f in os.listdir(os.path.join(tdir, "images")) if f.endswith(".npz"))
    parts = [np.load(os.path.join(tdir, "images", f)) for f in shards]
    original = np.concatenate([p["original"] for p in parts])
    adversarial = np.concatenate([p["adversarial"] for p in parts])
    fileio.savez(os.path.join(tdir, "images.npz"), original=original, adversarial=adversarial, index=indices,
                 source=preds, adversarial_prediction=res["adv_pred"], success=res["success"],
                 original_peak=res["orig_peak"], adversarial_peak=res["adv_peak"])
    m = min(examples, len(original))
    if m:
        from PIL import Image

        from jaxdissect.pipelines.intervene_generator import image_grid

        diff = np.abs(adversarial[:m] - original[:m])
        diff = diff / max(float(diff.max()), 1e-12)
        rows = [np.clip(r * 255 + 0.5, 0, 255).astype(np.uint8) for r in (original[:m], adversarial[:m], diff)]
        Image.fromarray(image_grid(rows)).save(os.path.join(tdir, "examples.png"))


def _write_json(path: str, data) -> None:
    def clean(v):
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    fileio.write_json(path, clean(data))


def plot_groups(summary: dict, path: str) -> None:
    """Bar chart: per target class the mean peak change of the target, source and other units, 99% intervals."""
    plt = pyplot()

    names = list(summary["targets"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.6))
    width = 0.26
    colors = {"target": "tab:red", "source": "tab:blue", "other": "tab:gray"}
    for g_i, g in enumerate(GROUPS):
        means = [summary["targets"][n]["groups"][g]["mean"] for n in names]
        errs = [summary["targets"][n]["groups"][g]["ci99"] for n in names]
        xs = np.arange(len(names)) + (g_i - 1) * width
        ax.bar(xs, np.nan_to_num(means), width, yerr=np.nan_to_num(errs), capsize=3, color=colors[g],
               label={"target": f"top {TOP} units of the target", "source": f"top {TOP} units of the source",
                      "other": "other units"}[g])
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel(f"|peak activation change| ({summary['layer']})")
    ax.set_title(f"Units changed by the {summary['attack'].upper()} attack (99% intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
