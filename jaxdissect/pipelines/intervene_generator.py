"""The generator intervention experiment (spec 3.4): remove a concept, insert a concept, in context.

Given a generator, a layer, a segmenter and that layer's dissection (its
``iou`` per unit and label), this

Any basis's features work as units (``basis=(Basis, params)``, the basis
the layer was dissected in, e.g. a sparse autoencoder: see
:func:`jaxdissect.pipelines.bases.dissected_view`): a feature is removed or
inserted by :class:`jaxdissect.layers.FeatureEdit` (its decoded
contribution changed, the reconstruction error kept, so editing nothing
changes nothing). The experiment

1. zeroes the top ``n`` units for the concept to remove (by IoU), for
   ``n = 1 .. remove_units``, and reports the share of the concept's pixels
   removed, with a 99% confidence band (2.58 standard errors), as JSON, npz, a
   plot and an image grid before/after;
2. optionally zeroes every single unit of the layer (segmentation statistics
   per unit, as the original's ``segstats/ablated_unit_<u>.npz``);
3. switches the top ``insert_units`` units for the concept to insert on, at
   their ``insert_quantile`` level, in one feature-map cell at every location,
   and reports how much of the concept appears by what was there before (the
   context experiment), as JSON, npz, a bar chart and an image grid.

Each sweep runs resumably in ``output_dir/work/<step>``: interrupted, it
continues from its last checkpoint; finished, it is restored, not recomputed.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxdissect import fileio
from jaxdissect import layers as layer_api
from jaxdissect.interventions import generator as gi
from jaxdissect.errors import JaxDissectError
from jaxdissect.plotting import pyplot, save_figure
from jaxdissect.preprocess import zc_to_uint8

CI99 = 2.58


class ExperimentError(JaxDissectError, ValueError):
    """The experiment's inputs do not fit together; the message says what to do."""


def load_dissection(dissection_dir: str, layer: str) -> dict:
    """``iou [U, L]`` and ``thresholds [U]`` of ``layer`` from a ``launch.dissect`` output directory."""
    path = os.path.join(dissection_dir, layer, "arrays.npz")
    if not os.path.exists(path):
        raise ExperimentError(
            f"no dissection of {layer!r} at {path}; dissect the layer first: python -m launch.dissect "
            f"--model=... --layers={layer} --segmenter=... --output_dir={dissection_dir}"
        )
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def unit_quantile(module, variables, layer: str, z: np.ndarray, level: float, resolution: int,
                  batch_size: int = 25, basis=None) -> np.ndarray:
    """Exact per-unit ``level`` quantile of ``layer``'s activations upsampled to ``resolution``.

    Two passes of the lower generator only (radix select, :mod:`jaxdissect.kernels.quantile`),
    upsampled with the original's geometry, as dissection measures them. With
    ``basis`` (``(Basis, params)``), of its features' codes.
    """
    from jaxdissect.kernels import quantile as qk
    from jaxdissect.kernels import upsample as up

    feature, bp = (None, None) if basis is None else (basis[0], jax.tree.map(jnp.asarray, dict(basis[1])))

    def acts(variables, bp, batch):
        _, captured = layer_api.capture(module, variables, batch, [layer])
        a = captured[layer] if feature is None else feature.encode(bp, captured[layer])
        a = up.upsample(a, (resolution, resolution))
        return a.reshape(-1, a.shape[-1])

    # The weights are arguments, not constants closed over: XLA would fold a real ProGAN's into the program.
    high = jax.jit(lambda state, variables, batch, i: qk.high_update(state, acts(variables, bp, batch), batch_id=i))
    low = jax.jit(lambda state, variables, batch: qk.low_update(state, acts(variables, bp, batch)))
    batches = [jnp.asarray(z[i:i + batch_size]) for i in range(0, len(z), batch_size)]
    shape = jax.eval_shape(acts, variables, bp, batches[0])
    state = qk.high_init(shape.shape[-1])
    for i, b in enumerate(batches):
        state = high(state, variables, b, i)
    state = jax.device_get(state)
    bad = np.nonzero(np.asarray(state["nonfinite"]))[0]
    if bad.size:
        u = int(bad[0])
        raise ExperimentError(
            f"{layer} unit {u} has NaN or Inf activations (first in batch {int(state['first_bad_batch'][u])}); "
            "check the generator's weights and inputs")
    selection = qk.select(state, level)
    low_state = qk.low_init(selection)
    for b in batches:
        low_state = low(low_state, variables, b)
    return np.asarray(qk.finish(selection, jax.device_get(low_state)))


def image_grid(rows: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Rows of uint8 images ``[n, H, W, 3]`` pasted into one grid with white gaps."""
    n, h, w, _ = rows[0].shape
    grid = np.full((len(rows) * (h + gap) - gap, n * (w + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = img
    return grid


def _box(img: np.ndarray, y0: int, x0: int, size: int) -> np.ndarray:
    img = img.copy()
    y1, x1 = min(y0 + size, img.shape[0]) - 1, min(x0 + size, img.shape[1]) - 1
    yellow = np.array([255, 255, 0], np.uint8)
    img[y0, x0:x1 + 1] = img[y1, x0:x1 + 1] = yellow
    img[y0:y1 + 1, x0] = img[y0:y1 + 1, x1] = yellow
    return img


def _save_png(path: str, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def _plot(path: str, draw) -> None:

    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    draw(ax)
    fig.tight_layout()
    save_figure(fig, path)


def _edit(basis, edit):
    """``edit`` of the layer's units, or of ``basis``'s features."""
    return edit if basis is None else layer_api.FeatureEdit(basis[0], basis[1], edit)


def removal_experiment(module, variables, layer, segment, label_names, iou, z, *, concept, max_units,
                       batch_size, output_dir, grid_samples=8, basis=None) -> dict:
    """Share of ``concept``'s pixels removed by zeroing its top n units, n = 1..max_units."""
    label = gi.find_label(label_names, concept)
    order = gi.top_units(iou, label_names, concept, max_units)
    sets = [order[:n] for n in range(1, max_units + 1)]
    stats = gi.ablation_segstats(module, variables, layer, sets, z, segment, len(label_names),
                                 batch_size=batch_size, workdir=os.path.join(output_dir, "work", f"remove-{concept}"),
                                 basis=basis)
    base = stats.baseline.mean[label]
    removed = stats.removed_fraction(label)
    sem = np.sqrt(stats.delta.variance[:, label] / stats.delta.count) / base
    summary = {
        "concept": concept, "layer": layer, "samples": int(stats.baseline.count),
        "baseline_fraction": float(base), "units": [int(u) for u in order],
        "removed": [{"n": n, "removed_fraction": float(r), "ci99": float(CI99 * s)}
                    for n, r, s in zip(range(1, max_units + 1), removed, sem)],
    }
    fileio.savez(os.path.join(output_dir, f"remove_{concept}.npz"), units=order, **stats.arrays())
    fileio.write_json(os.path.join(output_dir, f"remove_{concept}.json"), summary)

    def draw(ax):
        n = np.arange(0, max_units + 1)
        r = np.concatenate([[0.0], removed])
        band = np.concatenate([[0.0], CI99 * sem])
        ax.plot(n, r, marker="o", ms=3)
        ax.fill_between(n, r - band, r + band, alpha=0.3)
        ax.set_xlabel(f"top {concept!r} units of {layer} removed")
        ax.set_ylabel(f"portion of {concept} pixels removed")

    _plot(os.path.join(output_dir, f"remove_{concept}.png"), draw)
    shown = [n for n in (0, 1, 2, 4, 8, 20, 30) if n <= max_units]
    zs = jnp.asarray(z[:grid_samples])
    rows = []
    for n in shown:
        edits = {layer: _edit(basis, layer_api.Ablate(order[:n]))} if n else {}
        rows.append(zc_to_uint8(layer_api.run(module, variables, zs, edits=edits)))
    _save_png(os.path.join(output_dir, f"remove_{concept}_grid.png"), image_grid(rows))
    summary["grid_rows"] = shown
    return summary


def single_unit_experiment(module, variables, layer, segment, num_labels, num_units, z, *, batch_size,
                           output_dir, basis=None) -> None:
    """Segmentation statistics with each single unit zeroed (``single_units.npz``)."""
    stats = gi.ablation_segstats(module, variables, layer, [[u] for u in range(num_units)], z, segment,
                                 num_labels, batch_size=batch_size,
                                 workdir=os.path.join(output_dir, "work", "single-units"), basis=basis)
    fileio.savez(os.path.join(output_dir, "single_units.npz"), **stats.arrays())


def insertion_experiment(module, variables, layer, segment, label_names, iou, z, *, concept, num_units,
                         values, batch_size, output_dir, min_samples=1000, grid_samples=6, basis=None) -> dict:
    """Added ``concept`` area when its units are switched on in one cell, by the label there before."""
    label = gi.find_label(label_names, concept)
    units = gi.top_units(iou, label_names, concept, num_units)
    stats = gi.insertion_context(module, variables, layer, units, values[units], z, segment,
                                 len(label_names), batch_size=batch_size,
                                 workdir=os.path.join(output_dir, "work", f"insert-{concept}"), basis=basis)
    base = stats.baseline.mean[label]
    added = stats.added(label, min_samples=min_samples)
    rows = sorted(
        ({"context": label_names[c], "label": c, "added_fraction": m / base if base else float("nan"),
          "std": s / base if base else float("nan"), "samples": n} for c, (m, s, n) in added.items()),
        key=lambda r: -r["added_fraction"])
    summary = {"concept": concept, "layer": layer, "units": [int(u) for u in units],
               "values": [float(v) for v in values[units]], "baseline_count": float(base),
               "min_samples": min_samples, "contexts": rows}
    fileio.savez(os.path.join(output_dir, f"insert_{concept}.npz"), units=units, **stats.arrays())
    fileio.write_json(os.path.join(output_dir, f"insert_{concept}.json"), summary)

    def draw(ax):
        top = rows[:12]
        ax.bar(range(len(top)), [r["added_fraction"] for r in top], yerr=[r["std"] for r in top])
        ax.set_xticks(range(len(top)), [r["context"] for r in top], rotation=45, ha="right")
        ax.set_ylabel(f"added {concept} (x baseline area)")

    _plot(os.path.join(output_dir, f"insert_{concept}.png"), draw)
    zs = jnp.asarray(z[:grid_samples])
    _, acts = layer_api.capture(module, variables, zs, [layer])
    h, w = acts[layer].shape[1:3]
    clean = zc_to_uint8(module.apply(variables, zs))
    cell = clean.shape[1] // h
    grid_rows = [clean]
    for y, x in ((h // 2, w // 4), (h - 2, w // 2), (h // 4, 3 * w // 4)):
        region = np.zeros((h, w), np.float32)
        region[y, x] = 1
        edit = _edit(basis, layer_api.SetUnits(units, values[units], region))
        out = zc_to_uint8(layer_api.run(module, variables, zs, edits={layer: edit}))
        grid_rows.append(np.stack([_box(img, y * cell, x * cell, cell) for img in out]))
    _save_png(os.path.join(output_dir, f"insert_{concept}_grid.png"), image_grid(grid_rows))
    return summary


def run_experiment(module, variables, layer: str, segmenter, segmenter_variables, dissection: dict, z, *,
                   output_dir: str, remove: str | None = "tree", remove_units: int = 30,
                   insert: str | None = "door", insert_units: int = 20, insert_quantile: float = 0.995,
                   single_units: bool = False, batch_size: int = 25, min_samples: int = 1000,
                   basis=None) -> dict:
    """All steps, resumably; returns the summaries (also written as JSON in ``output_dir``).

    ``basis``: ``(Basis, params)`` of the dissection's view (its units are the
    basis's features); None: the layer's own units.
    """
    os.makedirs(output_dir, exist_ok=True)
    label_names = list(segmenter.label_names)
    iou = np.asarray(dissection["iou"])
    if iou.ndim != 2 or iou.shape[1] != len(label_names):
        raise ExperimentError(
            f"the dissection's iou has shape {iou.shape}, but the segmenter has {len(label_names)} labels: "
            "dissect with the same segmenter and setting"
        )
    z = np.asarray(z, np.float32)
    if basis is not None:
        channels = int(layer_api.layer_shapes(module, variables, jnp.asarray(z[:1]))[layer].shape[-1])
        units = basis[0].num_units(basis[1], channels)
        if iou.shape[0] != units:
            raise ExperimentError(f"the dissection has {iou.shape[0]} units but the basis {basis[0].describe()} has "
                                  f"{units} features on {layer}: give the dissection of {layer} in that basis")
    segment = gi.segmenter_fn(segmenter, segmenter_variables)
    summaries = {}
    if remove:
        logging.info("removing %r: top 1..%d units of %s", remove, remove_units, layer)
        summaries["remove"] = removal_experiment(
            module, variables, layer, segment, label_names, iou, z, concept=remove, max_units=remove_units,
            batch_size=batch_size, output_dir=output_dir, basis=basis)
    if single_units:
        logging.info("single-unit ablations of all %d units of %s", iou.shape[0], layer)
        single_unit_experiment(module, variables, layer, segment, len(label_names), iou.shape[0], z,
                               batch_size=batch_size, output_dir=output_dir, basis=basis)
    if insert:
        images = jax.eval_shape(lambda v, x: module.apply(v, x), variables, jnp.asarray(z[:1]))
        resolution = images.shape[1] // 4
        logging.info("insert %r: %s quantile of %s at %dx%d", insert, insert_quantile, layer, resolution,
                     resolution)
        values = unit_quantile(module, variables, layer, z, insert_quantile, resolution, batch_size, basis)
        summaries["insert"] = insertion_experiment(
            module, variables, layer, segment, label_names, iou, z, concept=insert, num_units=insert_units,
            values=values, batch_size=batch_size, output_dir=output_dir, min_samples=min_samples, basis=basis)
    fileio.write_json(os.path.join(output_dir, "summary.json"), summaries)
    return summaries
