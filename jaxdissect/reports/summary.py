"""Cross-layer summary: interpretable units and unique concepts per layer (spec 6).

The papers' comparison figures count, per layer, how many units match some
concept with IoU above the threshold and how many distinct concepts those
units cover, broken down by category. ``write_summary`` stores the table as
JSON, CSV and Markdown and draws it as an SVG figure.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Iterable, Mapping, Sequence

from jaxdissect import fileio
from jaxdissect.plotting import pyplot, save_figure
from jaxdissect.reports.bargraph import CATEGORIES, PALETTE, unit_fields
from jaxdissect.reports.report_json import dump_json


# Columns a row may add (``dissect(significance=True)``: units whose label is significant under BH;
# ``dissect(label_metrics=True)``: per-layer medians of the units' label metrics); any other key a method
# strategy adds (``Strategy.summary_row``) follows them.
OPTIONAL = ("significant",) + tuple(f"median_{level}_{m}" for level in ("pixel", "image")
                                    for m in ("iou", "f1", "auprc", "pearson", "cosine"))


# The columns every row has (the rest are a method strategy's additions, kept in the tables in order).
_STANDARD = ("layer", "units", "interpretable", "unique_concepts", "interpretable_by_category", "unique_by_category",
             "miniou")


def _pairs(per_layer_units) -> list[tuple[str, list]]:
    if isinstance(per_layer_units, Mapping):
        return [(str(k), list(v)) for k, v in per_layer_units.items()]
    return [(str(k), list(v)) for k, v in per_layer_units]


def layer_summary(per_layer_units: Mapping[str, Iterable] | Sequence[tuple[str, Iterable]],
                  miniou: float = 0.04) -> list[dict]:
    """One row per layer, in the given order.

    ``per_layer_units`` maps a layer name to its units (dicts with ``label``,
    ``cat``, ``iou`` as in ``report.json``, or ``(label, cat, iou)`` tuples). A
    row holds ``layer``, ``units``, ``interpretable`` (units with IoU >
    ``miniou``), ``unique_concepts`` (distinct labels among them), and per
    category ``interpretable_by_category`` and ``unique_by_category``.
    """
    rows = []
    for layer, units in _pairs(per_layer_units):
        by_units: dict[str, int] = {}
        concepts: dict[str, set] = {}
        for unit in units:
            label, cat, iou = unit_fields(unit)
            if math.isnan(iou) or not iou > miniou:
                continue
            by_units[cat] = by_units.get(cat, 0) + 1
            concepts.setdefault(cat, set()).add(label)
        order = list(CATEGORIES) + sorted(c for c in by_units if c not in CATEGORIES)
        rows.append(dict(
            layer=layer,
            units=len(units),
            interpretable=sum(by_units.values()),
            unique_concepts=sum(len(s) for s in concepts.values()),
            interpretable_by_category={c: by_units.get(c, 0) for c in order},
            unique_by_category={c: len(concepts.get(c, ())) for c in order},
            miniou=float(miniou),
        ))
    return rows


def _categories(rows: Sequence[Mapping]) -> list[str]:
    cats = list(CATEGORIES)
    for r in rows:
        cats += [c for c in r["interpretable_by_category"] if c not in cats]
    return cats


def _flat(rows: Sequence[Mapping]) -> tuple[list[str], list[list]]:
    cats = _categories(rows)
    header = ["layer", "units", "interpretable", "unique_concepts"]
    header += [f"interpretable_{c}" for c in cats] + [f"unique_{c}" for c in cats]
    extra = [k for k in OPTIONAL if rows and all(k in r for r in rows)]
    extra += [k for k in (rows[0] if rows else ()) if k not in _STANDARD + OPTIONAL and all(k in r for r in rows)]
    header += extra
    table = []
    for r in rows:
        table.append([r["layer"], r["units"], r["interpretable"], r["unique_concepts"]]
                     + [r["interpretable_by_category"].get(c, 0) for c in cats]
                     + [r["unique_by_category"].get(c, 0) for c in cats] + [r[k] for k in extra])
    return header, table


def markdown_table(rows: Sequence[Mapping]) -> str:
    """The summary as a Markdown table (layer names with ``|`` escaped)."""
    header, table = _flat(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = [str(v).replace("|", "\\|") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_summary(path: str, rows: Sequence[Mapping], title: str = "") -> str:
    """Stacked bars per layer: unique concepts (left) and interpretable units (right) by category."""
    plt = pyplot()

    cats = [c for c in _categories(rows)
            if any(r["interpretable_by_category"].get(c, 0) for r in rows)]
    layers = [r["layer"] for r in rows]
    xs = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.0 + 0.9 * len(rows)) * 2 / 1.5, 3.6))
    for ax, key, ylabel in ((axes[0], "unique_by_category", "unique concepts"),
                            (axes[1], "interpretable_by_category", "interpretable units")):
        bottom = [0] * len(rows)
        for i, cat in enumerate(cats):
            colour = PALETTE[(CATEGORIES.index(cat) if cat in CATEGORIES else i) % len(PALETTE)][0]
            values = [r[key].get(cat, 0) for r in rows]
            ax.bar(xs, values, bottom=bottom, color=colour, label=cat)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(list(xs))
        labels = ax.set_xticklabels(layers, rotation=45, ha="right")
        for t in labels:
            t.set_parse_math(False)
        ax.set_ylabel(ylabel)
    if cats:
        legend = axes[1].legend(loc="upper left", fontsize="small")
        for t in legend.get_texts():
            t.set_parse_math(False)
    if title:
        fig.suptitle(title).set_parse_math(False)
    fig.tight_layout()
    fmt = os.path.splitext(path)[1].lstrip(".") or "svg"
    # Fixed ids and no date: the same rows give the same file, byte for byte.
    with plt.rc_context({"svg.hashsalt": "jaxdissect"}), fileio.atomic_file(path) as f:
        save_figure(fig, f, format=fmt, metadata={"Date": None} if fmt in ("svg", "pdf") else None)
    return path


def write_summary(output_dir: str, rows: Sequence[Mapping], title: str = "") -> dict[str, str]:
    """Write ``summary.json``, ``summary.csv``, ``summary.md`` and ``summary.svg``; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {k: os.path.join(output_dir, f"summary.{k}") for k in ("json", "csv", "md", "svg")}
    dump_json(paths["json"], dict(layers=list(rows)))
    header, table = _flat(rows)
    with fileio.atomic_file(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)
    fileio.write_text(paths["md"], markdown_table(rows))
    plot_summary(paths["svg"], rows, title)
    return paths
