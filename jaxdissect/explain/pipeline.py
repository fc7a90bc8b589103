"""Formulas, significance and label metrics inside ``jaxdissect.dissect``: the driver strategies of the add-ons.

:class:`Explanations` (``formulas``, ``significance``) taps pass 3: its device
function computes each view's unit masks and its host fold writes them, with
the concept masks, through a :class:`MaskCollector`; after the passes it finds
formulas and p-values per layer. :class:`LabelMetrics` (``label_metrics``)
makes an extra pass once the labels are chosen: a device function with its own
per-device counts (:mod:`jaxdissect.explain.unit_metrics`) and a host fold of
per-image sums, then per-unit metrics. Both add ``report.json`` fields,
summary columns, headline numbers and settings lines (see ``jaxdissect.driver``).

:class:`MaskCollector` writes, per batch of pass 3, each layer's unit masks
(``upsampled activation > exact threshold`` at the segmentation resolution)
and the concept masks of the labels to one file in the pass's work
directory, bit-packed per image and keeping only the non-empty (mask, image)
pairs (:class:`~jaxdissect.explain.packed.ImageMasks`): a label absent from
an image, or a unit silent on it, costs nothing. The file is written
(atomically) inside the step, so before the checkpoint that covers the batch:
a killed pass 3 resumes from its checkpoint and :meth:`MaskCollector.masks`
reads the earlier batches back. :func:`explain_layer` then runs
:func:`~jaxdissect.explain.compositional` and the significance tests on the
per-image masks, without making a dense mask.

Disk and memory: the set pixels' 32-bit words of each (unit or label, image)
pair that has any, e.g. at most ``512 x 10,000 x 98`` words (2 GB) for a
512-unit layer on 10,000 images at 56 x 56, much less as units fire on few images.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxdissect import fileio
from jaxdissect.driver import Strategy, Tap, array_digest
from jaxdissect.explain.compositional import compositional, formula_image_masks
from jaxdissect.explain.packed import ImageMasks, pack_bits
from jaxdissect.explain.significance import (benjamini_hochberg, bootstrap_iou, label_significance,
                                             mask_significance)


def concept_image_masks(seg, image_labels, num_labels: int) -> ImageMasks:
    """Label masks of ``B`` images: pixel of image b carries label l in any channel of ``seg [B, K, S, S]``,
    or l is an image-level label of ``image_labels [B, J]`` (the whole image). Label 0 (none) and labels
    outside ``[1, num_labels)`` are never set; only present (label, image) pairs are stored."""
    seg = np.asarray(seg)
    b, k, h, w = seg.shape
    p = h * w
    if b == 0:
        return ImageMasks.from_pairs([], [], np.zeros((0, -(-p // 32)), np.uint32), num_labels, 0, p)
    flat = seg.reshape(b, k * p).astype(np.int64)
    img, pos = np.nonzero((flat > 0) & (flat < num_labels))
    keys = [flat[img, pos] * b + img]
    if image_labels is not None:
        il = np.asarray(image_labels).astype(np.int64).reshape(b, -1)
        ii, jj = np.nonzero((il > 0) & (il < num_labels))
        keys.append(il[ii, jj] * b + ii)
    uniq, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    bits = np.zeros((len(uniq), p), bool)
    bits[inverse[: len(img)], pos % p] = True
    bits[inverse[len(img):]] = True
    return ImageMasks.from_pairs(uniq // b, uniq % b, pack_bits(bits), num_labels, b, p)


_FIELDS = ("mask_ids", "image_ids", "words")


class MaskCollector:
    """Unit and concept masks of each batch of a pass, one file per batch in ``directory``.

    ``layers`` fixes the layer order in the files; ``num_batches`` is the
    pass's batch count (every batch gets a file, one without valid images too).
    """

    def __init__(self, directory: str, layers, num_labels: int, num_batches: int):
        self.directory = directory
        self.layers = list(layers)
        self.num_labels = num_labels
        self.num_batches = num_batches
        os.makedirs(directory, exist_ok=True)

    def path(self, batch: int) -> str:
        return os.path.join(self.directory, f"batch-{batch:06d}.npz")

    def add(self, batch: int, unit_masks: dict, seg, image_labels, valid) -> None:
        """``unit_masks {layer: bool [B, S, S, U]}``; only the ``valid`` images are kept."""
        valid = np.asarray(valid, bool)
        count = int(valid.sum())
        seg = np.asarray(seg)[valid]
        concepts = concept_image_masks(seg, None if image_labels is None else np.asarray(image_labels)[valid],
                                       self.num_labels)
        arrays = {"images": np.int64(count), "positions": np.int64(concepts.positions)}
        arrays.update({f"concept_{k}": getattr(concepts, k) for k in _FIELDS})
        for i, n in enumerate(self.layers):
            m = np.asarray(unit_masks[n])[valid]
            m = np.moveaxis(m.reshape(count, m.shape[1] * m.shape[2], m.shape[-1]), -1, 0)      # [U, b, S*S]
            units = ImageMasks.from_words(pack_bits(m), m.shape[-1])
            arrays[f"units{i}"] = np.int64(units.num_masks)
            arrays.update({f"units{i}_{k}": getattr(units, k) for k in _FIELDS})
        fileio.savez(self.path(batch), **arrays)

    def masks(self, layer: str) -> tuple[ImageMasks, ImageMasks, int]:
        """``(unit_masks, concept_masks, N)`` of one layer over all batches' images, in batch order."""
        missing = [b for b in range(self.num_batches) if not os.path.exists(self.path(b))]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {self.num_batches} batches' masks are missing from {self.directory} (first: "
                f"batch {missing[0]}); delete {os.path.dirname(self.directory)} to recompute pass 3")
        i = self.layers.index(layer)
        units, concepts = [], []
        for b in range(self.num_batches):
            with np.load(self.path(b)) as f:
                n, p = int(f["images"]), int(f["positions"])
                concepts.append(ImageMasks(*(f[f"concept_{k}"] for k in _FIELDS), self.num_labels, n, p))
                units.append(ImageMasks(*(f[f"units{i}_{k}"] for k in _FIELDS), int(f[f"units{i}"]), n, p))
        units, concepts = ImageMasks.concat_images(units), ImageMasks.concat_images(concepts)
        return units, concepts, units.num_images


def explain_layer(unit_masks, concept_masks_, label_names, num_images: int, *, length: int = 0,
                  exact: bool = False, beam: int = 5, permutations: int = 0, q: float = 0.05,
                  seed: int = 0) -> list[dict]:
    """Per unit: ``formula``, ``formula_iou`` (``length`` > 0) and ``p_value``, ``q_value``,
    ``significant``, ``iou_ci`` of its best label, ``formula_p_value``, ``formula_q_value``
    (``permutations`` > 0). Masks: boolean ``[U, P]``, ``[L, P]`` or :class:`ImageMasks`.
    Label 0 (no label) is never used; BH runs over every tested pair."""
    if not isinstance(unit_masks, ImageMasks):
        unit_masks = ImageMasks.from_dense(unit_masks, num_images)
    if not isinstance(concept_masks_, ImageMasks):
        concept_masks_ = ImageMasks.from_dense(concept_masks_, num_images)
    names = list(label_names)[1:]
    concepts = concept_masks_.take(np.arange(1, concept_masks_.num_masks))
    num_units = unit_masks.num_masks
    out = [{} for _ in range(num_units)]
    found = None
    if length > 0:
        found = compositional(unit_masks, concepts, names, length=length, beam=beam, exact=exact)
        for u, e in enumerate(found):
            out[u].update(formula=e.formula, formula_iou=float(e.iou))
    if permutations > 0:
        sig = label_significance(unit_masks, concepts, num_images, permutations=permutations, seed=seed)
        best = concepts.take(sig["label"])
        ci = bootstrap_iou(unit_masks, best, num_images, samples=permutations, seed=seed)
        p = [sig["p_value"]]
        if found is not None:
            fm = formula_image_masks(concepts, found)
            p.append(mask_significance(unit_masks, fm, num_images, permutations=permutations, seed=seed)["p_value"])
        significant, adjusted = benjamini_hochberg(np.concatenate(p), q)
        for u in range(num_units):
            out[u].update(p_value=float(sig["p_value"][u]), q_value=float(adjusted[u]),
                          significant=bool(significant[u]), iou_ci=[float(ci[u, 0]), float(ci[u, 1])])
            if found is not None:
                out[u].update(formula_p_value=float(p[1][u]), formula_q_value=float(adjusted[num_units + u]),
                              formula_significant=bool(significant[num_units + u]))
    return out


def _single_process(what: str) -> None:
    import jax

    from jaxdissect.config import DissectError

    if jax.process_count() > 1:
        raise DissectError(f"{what} run in one process; drop them for a multi-host run")


@dataclasses.dataclass(frozen=True)
class _UnitMasks:
    """Pass 3's tap: each view's unit masks ``upsampled act > threshold`` (thresholds as params)."""

    plans: tuple

    def __call__(self, state, thresholds, acts, batch):
        return state, {v: p.upsample(acts[v]) > thresholds[v] for v, p in self.plans}


@dataclasses.dataclass(frozen=True)
class Explanations(Strategy):
    """Formulas of up to ``formulas`` concepts (``exact``: provably optimal) and, with ``permutations`` > 0,
    image-permutation p-values, Benjamini-Hochberg q-values at FDR ``q`` and bootstrap IoU intervals.

    Adds no pass: pass 3's tap writes every batch's unit and concept masks to
    ``work/pass3/masks`` inside the step (before its checkpoint), so it
    resumes like the pass; one layer's masks are read back at a time.
    """

    formulas: int = 0
    exact: bool = False
    permutations: int = 0
    q: float = 0.05
    name = "explain"

    def check(self, driver):
        _single_process("formulas and significance")
        if driver.workdir is None:
            from jaxdissect.config import DissectError

            raise DissectError("formulas and significance need a work directory for pass 3's masks")

    def collector(self, driver) -> "MaskCollector":
        return MaskCollector(os.path.join(driver.workdir, "pass3", "masks"), driver.views,
                             len(driver.tables.label_names), driver.num_batches)

    def tap(self, pass_name, driver):
        if pass_name != "pass3":
            return None
        import jax.numpy as jnp

        collector = self.collector(driver)

        def fold(host, masks, batch):
            collector.add(int(batch["batch_id"][0]), masks, batch["seg"], batch.get("image_labels"), batch["valid"])
            return host

        return Tap(update=_UnitMasks(tuple(driver.plans.items())), fold=fold,
                   params={v: jnp.asarray(t, jnp.float32) for v, t in driver.thresholds.items()})

    def finish(self, driver, taps):
        collector, out = self.collector(driver), {}
        for v in driver.views:
            driver.log(f"{v}: " + ", ".join(
                ([f"formulas of length {self.formulas}" + (" (exact)" if self.exact else "")] if self.formulas
                 else []) + ([f"significance ({self.permutations} permutations)"] if self.permutations else [])))
            units, concepts, num_images = collector.masks(v)
            out[v] = explain_layer(units, concepts, driver.tables.label_names, num_images, length=self.formulas,
                                   exact=self.exact, permutations=self.permutations, q=self.q)
        return out

    def unit_fields(self, view, found):
        return found

    def summary_row(self, view, found, units):
        return {"significant": sum(bool(u.get("significant")) for u in units)} if self.permutations else {}

    def layer_numbers(self, view, result, units):
        if not self.permutations:
            return {}
        return {f"significant at q = {self.q:g}": sum(bool(u.get("significant")) for u in units)}

    def settings(self):
        out = {}
        if self.formulas:
            out["formulas"] = (f"up to {self.formulas} concepts, "
                               + ("exact (branch and bound)" if self.exact else "beam search"))
        if self.permutations:
            out["significance"] = (f"image-permutation p-values ({self.permutations} permutations), "
                                   "Benjamini-Hochberg q over every tested pair")
        return out

    def page_options(self):
        return {"q": self.q}


@dataclasses.dataclass(frozen=True)
class _MetricsUpdate:
    """The label-metrics pass's device function: :func:`unit_metrics.update` per view."""

    plans: tuple

    def __call__(self, state, params, acts, batch):
        from jaxdissect.explain import unit_metrics

        out = {v: unit_metrics.update(state[v], p.upsample(acts[v]), acts[v], batch["seg"], batch["valid"],
                                      batch.get("image_labels")) for v, p in self.plans}
        return {v: o[0] for v, o in out.items()}, {v: o[1] for v, o in out.items()}


def _fold_metrics(host, outputs, batch):
    from jaxdissect.explain import unit_metrics

    return {v: unit_metrics.HostSums.add(host[v], outputs[v], batch["index"], batch["valid"]) for v in host}


@dataclasses.dataclass(frozen=True)
class LabelMetrics(Strategy):
    """IoU, F1, AUPRC, Pearson r and cosine of every unit against its label, at pixel and image level.

    One extra resumable pass once the labels are chosen (from the activation
    cache when pass 1 filled it): a device function with per-device counts
    and binned histograms, whose per-image sums the host folds in float64
    (:mod:`jaxdissect.explain.unit_metrics`). Pixel AUPRC is binned with
    bounds on the exact value; recall and precision are not reported (they
    fail NeuronEval's extra- and missing-labels checks).
    """

    name = "metrics"
    extra_pass = "metrics"
    describe_pass = "label metrics: every unit against its label, at pixel and image level"

    def check(self, driver):
        _single_process("label metrics")

    def tap(self, pass_name, driver):
        if pass_name != "metrics":
            return None
        from jaxdissect.explain import unit_metrics

        results = driver.results
        return Tap(update=_MetricsUpdate(tuple(driver.plans.items())), fold=_fold_metrics,
                   init={v: unit_metrics.init(r.thresholds, r.label, r.act_mean, r.act_max)
                         for v, r in results.items()},
                   host_init={v: unit_metrics.HostSums.init(driver.num_images, len(r.thresholds))
                              for v, r in results.items()},
                   identity={"labels": {v: array_digest(np.asarray(r.label, np.int32)) for v, r in results.items()},
                             "thresholds": {v: array_digest(np.asarray(r.thresholds, np.float32))
                                            for v, r in results.items()}})

    def finish(self, driver, taps):
        from jaxdissect.explain import unit_metrics

        device, host = taps["metrics"]
        return {v: unit_metrics.unit_entries(unit_metrics.finish(device[v], host[v])) for v in driver.views}

    def unit_fields(self, view, found):
        return [{"metrics": entry} for entry in found]

    def summary_row(self, view, found, units):
        from jaxdissect.explain import unit_metrics

        return unit_metrics.medians(found)

    def layer_numbers(self, view, result, units):
        from jaxdissect.explain import unit_metrics

        row = unit_metrics.medians([u.get("metrics") for u in units])
        return {"median label metrics": "; ".join(
            f"{lvl}: " + ", ".join(f"{m} {row[f'median_{lvl}_{m}']:.3f}" for m in unit_metrics.METRIC_NAMES)
            for lvl in ("pixel", "image"))}

    def settings(self):
        from jaxdissect.explain import unit_metrics

        return {"label metrics": unit_metrics.describe(), "label metric checks": unit_metrics.SANITY}
