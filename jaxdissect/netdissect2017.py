"""The 2017 NetDissect scoring on Broden: per-category IoU, unit labels, unique detectors, result.csv.

From the dataset-wide integer counts of one layer (the IoU kernel's
``intersection [U, L]`` and ``label_pixels [L]``, and the category-conditioned
``category_active [U, C]`` of :mod:`jaxdissect.kernels.category`):

* every label is scored only in its *primary* category ``cat(l)`` (most
  coverage, Broden reader), with the activation term conditioned on it::

      IoU(u, l) = I(u, l) / (A_cat(l)(u) + G(l) - I(u, l) + 1e-20)

  (NetDissect ``makeresult.score_tally_stats``); label 0 and labels with no
  category are never scored (IoU 0);
* per category ``c``: the unit's best label ``l_c(u)`` and score ``s_c(u)``
  (ties: the lowest label number; a category where every IoU is 0 reports
  label 0, ``'-'``, as the original's csv does);
* the unit's category ``c* = argmax_c s_c(u)`` (ties: the later category, as
  the original's reversed sort), label ``l_c*(u)``, score ``s_c*(u)``.

Unique detectors, both conventions of the original code (reference 1.7):

* ``'top'`` (report and bar graph): detectors are units with top score
  ``>= threshold``; unique = distinct top labels among them;
* ``'per_category'`` (CVPR figure, ``extract_csv.m``): per category, units
  with ``s_c(u) > threshold`` are category-c detectors even when c is not
  their best category; ``unique_c`` = distinct ``l_c`` among them; the total
  is ``sum_c unique_c``; detectors = units with ``max_c s_c > threshold``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Sequence

import numpy as np

from jaxdissect import fileio
from jaxdissect.config import DissectError
from jaxdissect.driver import Scoring

METHODS = ("pnas", "netdissect2017")
EPSILON = 1e-20


def label_category_index(label_categories: Sequence[str], categories: Sequence[str]) -> np.ndarray:
    """int32 ``[L]``: index in ``categories`` of each label's primary category; -1 for label 0 or none."""
    where = {c: i for i, c in enumerate(categories)}
    out = np.array([where.get(str(c), -1) for c in label_categories], np.int32)
    if len(out):
        out[0] = -1
    return out


@dataclasses.dataclass
class Scores:
    """Per-category scoring of one layer (arrays indexed by unit, then category)."""

    iou: np.ndarray            # [U, L] the 2017 IoU
    category_label: np.ndarray  # [U, C] l_c(u)
    category_score: np.ndarray  # [U, C] s_c(u)
    best_category: np.ndarray   # [U] c*
    label: np.ndarray           # [U]
    score: np.ndarray           # [U]


def score(intersection, category_active, label_pixels, label_category) -> Scores:
    """The 2017 IoU and per-category labels from integer counts (see the module docstring)."""
    inter = np.asarray(intersection, np.float64)
    cat_act = np.asarray(category_active, np.float64)
    g = np.asarray(label_pixels, np.float64)
    lc = np.asarray(label_category, np.int64)
    num_units, num_labels = inter.shape
    num_categories = cat_act.shape[1]
    scored = lc >= 0
    act = np.where(scored[None], cat_act[:, np.clip(lc, 0, None)] if num_categories else 0.0, 0.0)
    iou = np.where(scored[None], inter / (act + g[None] - inter + EPSILON), 0.0)
    cat_label = np.zeros((num_units, num_categories), np.int64)
    cat_score = np.zeros((num_units, num_categories), np.float64)
    for c in range(num_categories):
        members = np.flatnonzero(lc == c)
        if members.size:
            sub = iou[:, members]
            best = np.argmax(sub, axis=1)
            cat_score[:, c] = sub[np.arange(num_units), best]
            cat_label[:, c] = np.where(cat_score[:, c] > 0, members[best], 0)
    if num_categories:
        best_cat = num_categories - 1 - np.argmax(cat_score[:, ::-1], axis=1)
    else:
        best_cat = np.zeros(num_units, np.int64)
    rows = np.arange(num_units)
    label = cat_label[rows, best_cat] if num_categories else np.zeros(num_units, np.int64)
    top = cat_score[rows, best_cat] if num_categories else np.zeros(num_units)
    return Scores(iou=iou, category_label=cat_label, category_score=cat_score, best_category=best_cat,
                  label=label, score=top)


def unique_detectors(scores: Scores, categories: Sequence[str], threshold: float = 0.04) -> dict:
    """Detector and unique-detector counts, both conventions, with per-category breakdowns."""
    categories = [str(c) for c in categories]
    top = scores.score >= threshold
    top_labels = {}
    for u in np.flatnonzero(top):
        top_labels.setdefault(categories[scores.best_category[u]], set()).add(int(scores.label[u]))
    per_cat_units = scores.category_score > threshold
    per_cat = {c: len({int(x) for x in scores.category_label[per_cat_units[:, i], i]})
               for i, c in enumerate(categories)}
    return {
        "threshold": float(threshold),
        "units": int(len(scores.score)),
        "top": {"detectors": int(top.sum()), "unique": int(len({int(x) for x in scores.label[top]})),
                "per_category": {c: len(top_labels.get(c, ())) for c in categories}},
        "per_category": {"detectors": int(per_cat_units.any(axis=1).sum()), "unique": int(sum(per_cat.values())),
                         "per_category": per_cat,
                         "detectors_per_category": {c: int(per_cat_units[:, i].sum())
                                                    for i, c in enumerate(categories)}},
    }


def unit_order(scores: Scores) -> np.ndarray:
    """Units by descending score, as the original's csv (reversed stable sort)."""
    return np.argsort(scores.score, kind="stable")[::-1]


def result_rows(scores: Scores, counts: dict, categories: Sequence[str], label_names: Sequence[str]):
    """``(header, rows)`` of ``[layer]-result.csv`` (NetDissect ``makeresult.generate_csv_summary``).

    A category with no overlap reports label ``''`` with truth and intersection 0.
    """
    categories = [str(c) for c in categories]
    header = ["unit", "category", "label", "score"]
    for c in categories:
        header += [f"{c}-label", f"{c}-truth", f"{c}-activation", f"{c}-intersect", f"{c}-iou"]
    g = np.asarray(counts["label_pixels"])
    inter = np.asarray(counts["intersection"])
    cat_act = np.asarray(counts["category_active"])

    def name(label):
        return "" if label == 0 else str(label_names[label])

    rows = []
    for u in unit_order(scores):
        row = [int(u) + 1, categories[scores.best_category[u]] if categories else "", name(int(scores.label[u])),
               float(scores.score[u])]
        for i in range(len(categories)):
            lab = int(scores.category_label[u, i])
            row += [name(lab), int(g[lab]) if lab else 0, int(cat_act[u, i]), int(inter[u, lab]) if lab else 0,
                    float(scores.category_score[u, i])]
        rows.append(row)
    return header, rows


def write_result_csv(path: str, scores: Scores, counts: dict, categories, label_names) -> None:
    """Write ``[layer]-result.csv`` (atomically)."""
    header, rows = result_rows(scores, counts, categories, label_names)
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    fileio.write_text(path, text.getvalue())


def category_report(scores: Scores, categories, label_names, threshold: float = 0.04) -> dict:
    """The per-category report of one layer: counts both ways and every unit's per-category best."""
    categories = [str(c) for c in categories]
    units = []
    for u in unit_order(scores):
        units.append({
            "unit": int(u), "category": categories[scores.best_category[u]] if categories else "",
            "label": str(label_names[int(scores.label[u])]) if scores.label[u] else "-",
            "score": float(scores.score[u]),
            "per_category": {c: {"label": str(label_names[int(scores.category_label[u, i])])
                                 if scores.category_label[u, i] else "-",
                                 "iou": float(scores.category_score[u, i])} for i, c in enumerate(categories)}})
    return {"method": "netdissect2017", "categories": categories,
            "counts": unique_detectors(scores, categories, threshold), "units": units}


def scores_of(result) -> Scores:
    """The :class:`Scores` of a ``DissectionResult`` dissected with ``method='netdissect2017'``."""
    if result.category_active is None or "category_names" not in result.config:
        raise ValueError("this result was not dissected with method='netdissect2017' (no category-conditioned "
                         "counts); dissect again with method='netdissect2017'")
    index = label_category_index(result.categories, result.config["category_names"])
    return score(result.intersection, result.category_active, result.label_pixels, index)


def write_layer_files(directory: str, name: str, result, threshold: float = 0.04) -> dict:
    """``<name>-result.csv`` and ``netdissect2017.json`` (per-category report) in ``directory``."""
    scores = scores_of(result)
    cats = result.config["category_names"]
    counts = {"label_pixels": result.label_pixels, "intersection": result.intersection,
              "category_active": result.category_active}
    write_result_csv(os.path.join(directory, f"{name.replace('/', '_')}-result.csv"), scores, counts, cats,
                     result.label_names)
    report = category_report(scores, cats, result.label_names, threshold)
    fileio.write_json(os.path.join(directory, "netdissect2017.json"), report)
    return report


def summary_numbers(result, threshold: float = 0.04) -> dict:
    """Headline counts of one layer for the run page (both conventions)."""
    c = unique_detectors(scores_of(result), result.config["category_names"], threshold)
    return {f"detectors (IoU >= {threshold:g})": c["top"]["detectors"],
            "unique detectors (top labels)": c["top"]["unique"],
            "unique detectors (per category, summed)": c["per_category"]["unique"],
            **{f"unique {k}": v for k, v in c["per_category"]["per_category"].items()}}


@dataclasses.dataclass(frozen=True)
class Netdissect2017Scoring(Scoring):
    """The driver strategy of ``method='netdissect2017'``: per-category scoring with the category-conditioned
    activation count (pass 3 counts it per primary category), ``<layer>-result.csv`` and ``netdissect2017.json``
    per layer, both unique-detector conventions on the run page. A unit is a detector when its score reaches
    ``miniou`` (as the 2017 report counted)."""

    miniou: float = 0.04

    def plan_options(self, tables) -> dict:
        index = label_category_index(tables.label_categories, tables.categories)
        if not (index >= 0).any():
            raise DissectError(f"method netdissect2017 needs labels with categories; none of the "
                               f"{len(tables.label_names)} labels has one of {tables.categories}")
        return dict(label_category=tuple(int(c) for c in index), num_categories=len(tables.categories))

    def score(self, counts, plan, tables):
        scores = score(counts["intersection"], counts["category_active"], counts["label_pixels"],
                       plan.label_category)
        interpretable = (scores.score >= self.miniou) & (scores.label > 0)
        return scores.iou, scores.label, scores.score, interpretable, {
            "method": "netdissect2017", "category_names": list(tables.categories)}

    def layer_numbers(self, view, result, units):
        return summary_numbers(result, self.miniou)

    def write_layer(self, directory, view, result):
        write_layer_files(directory, view, result, self.miniou)
