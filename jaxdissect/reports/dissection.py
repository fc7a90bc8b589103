"""Every output of a dissection: per layer ``arrays.npz``, strips, bar graph, ``report.json``; the run's pages.

:class:`Outputs` writes what :func:`jaxdissect.dissect` found, asking each
method strategy (``jaxdissect.driver.Strategy``, in the order they are
listed) for its additions: per-unit fields of ``report.json``, summary
columns, per-layer headline numbers and settings lines of ``index.html``,
page options and extra files.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from jaxdissect import fileio

ARRAYS = ("thresholds", "iou", "label", "label_iou", "interpretable", "top_values", "top_index",
          "label_pixels", "active", "intersection", "act_mean", "act_max")


def unit_entries(result) -> list[dict]:
    """``report.json`` unit entries (``unit``, ``label``, ``cat``, ``iou``) of a ``DissectionResult``."""
    return [{"unit": u["unit"], "label": u["label"], "cat": u["category"], "iou": u["iou"]}
            for u in result.labels]


def layer_arrays(result) -> dict[str, np.ndarray]:
    """The arrays of ``arrays.npz``: thresholds, IoU, labels, top-k, counts, activation mean/max."""
    out = {k: np.asarray(getattr(result, k)) for k in ARRAYS}
    out["pixels"] = np.asarray(result.pixels)
    out["images"] = np.asarray(result.images)
    return out


class Outputs:
    """The files of one dissection in ``output_dir`` (``found``: each strategy's finish() output by view)."""

    def __init__(self, output_dir: str, strategies: Sequence, found: Mapping[str, Mapping], *, miniou: float,
                 title: str):
        self.output_dir, self.strategies, self.found = output_dir, list(strategies), found
        self.miniou, self.title = miniou, title
        self.extra_keys: dict = {}   # per-unit keys the strategies add, in order (kept in report.json)

    def layer_dir(self, view: str) -> str:
        return os.path.join(self.output_dir, view.replace("/", "_"))

    def units(self, view: str, result) -> list[dict]:
        """``report.json`` units with every strategy's fields."""
        units = unit_entries(result)
        for s in self.strategies:
            extra = s.unit_fields(view, self.found.get(s.name, {}).get(view))
            for u, fields in zip(units, extra or ()):
                u.update(fields)
                self.extra_keys.update(dict.fromkeys(fields))
        return units

    def write_layer(self, view: str, result, strips: Mapping[int, np.ndarray]) -> None:
        from jaxdissect.reports import bargraph, report_json
        from jaxdissect.reports import strips as strip_lib

        d = self.layer_dir(view)
        os.makedirs(d, exist_ok=True)
        fileio.savez(os.path.join(d, "arrays.npz"), **layer_arrays(result))
        strip_lib.save_strips(d, strips)
        units = self.units(view, result)
        bargraph.write_concept_bargraph(os.path.join(d, "concepts_99.svg"), units, self.miniou)
        report_json.write_report_json(os.path.join(d, "report.json"), self.title, units, extra=list(self.extra_keys))
        for s in self.strategies:
            s.write_layer(d, view, result)

    def write_run(self, views: Sequence[str], results: Mapping, settings: Mapping, *, images: int, skipped: int,
                  skipped_files: Sequence[str] = ()) -> str:
        """``summary.*`` and ``index.html``; ``settings``: the run's table, to which strategies add lines."""
        from jaxdissect.reports import html, summary

        units = {v: self.units(v, results[v]) for v in views}
        rows = summary.layer_summary([(v, units[v]) for v in views], self.miniou)
        for v, row in zip(views, rows):
            for s in self.strategies:
                row.update(s.summary_row(v, self.found.get(s.name, {}).get(v), units[v]))
        summary.write_summary(self.output_dir, rows, title=self.title)
        layers = []
        for v, row in zip(views, rows):
            r = results[v]
            shown = [dict(u, interpretable=bool(r.interpretable[i]), dead=bool(np.asarray(r.active)[i] == 0))
                     for i, u in enumerate(units[v])]
            numbers = {"units": row["units"], "interpretable": row["interpretable"],
                       "never fire": sum(u["dead"] for u in shown), "unique concepts": row["unique_concepts"],
                       "images": images, "skipped images": skipped}
            for s in self.strategies:
                numbers.update(s.layer_numbers(v, r, shown))
            layers.append({"name": v, "dir": os.path.basename(self.layer_dir(v)), "units": shown,
                           "svg": "concepts_99.svg", "summary": numbers,
                           "figures": [f for s in self.strategies for f in s.layer_figures(v)]})
        settings = dict(settings)
        options = {}
        for s in self.strategies:
            settings.update(s.settings())
            for k, v in s.page_options().items():   # every strategy's extra columns, in strategy order
                options[k] = list(options.get(k, [])) + list(v) if k == "columns" else v
        return html.write_run_report(self.output_dir, self.title, layers, settings=settings,
                                     skipped_files=list(skipped_files), **options)
