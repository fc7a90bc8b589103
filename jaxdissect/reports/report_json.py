"""``report.json``: every unit's best concept, in the original's format (spec 3.1 step 7).

``{"header": {"name": ..., "image": "concepts_99.svg"}, "units": [{"image":
"image/unit<u>.jpg", "unit": u, "iou": x, "label": ..., "cat": ...}, ...]}``,
indented by one space; NaN and infinities are written as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` so the file stays valid JSON.
"""

from __future__ import annotations

import json
import math
from typing import Mapping, Sequence

from jaxdissect import fileio
from jaxdissect.reports.strips import strip_path


def _plain(value):
    """``value`` with NumPy scalars made Python ones and non-finite floats made strings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
    return value


def dump_json(path: str, data) -> None:
    """Write ``data`` as JSON (indent 1, non-finite floats as strings), atomically."""
    fileio.write_text(path, json.dumps(_plain(data), indent=1, allow_nan=False))


# Optional per-unit entries of ``dissect(formulas=..., significance=True)`` (jaxdissect.explain.pipeline).
EXPLAIN_KEYS = ("formula", "formula_iou", "p_value", "q_value", "significant", "iou_ci", "formula_p_value",
                "formula_q_value", "formula_significant")

# ``dissect(label_metrics=True)``: ``{"pixel": {...}, "image": {...}}`` per unit (jaxdissect.explain.unit_metrics).
METRICS_KEYS = ("metrics",)


def report_units(units, extra: Sequence[str] = ()) -> list[dict]:
    """The ``units`` list of ``report.json``.

    ``units``: a ``DissectionResult`` (its ``labels``), or dicts with
    ``unit``, ``label``, ``cat`` (or ``category``), ``iou`` and the
    :data:`EXPLAIN_KEYS`, :data:`METRICS_KEYS` and ``extra`` keys a unit has.
    """
    out = []
    for u in getattr(units, "labels", units):
        cat = u.get("cat", u.get("category"))
        missing = [k for k in ("unit", "label", "iou") if k not in u] + (["cat"] if cat is None else [])
        if missing:
            raise ValueError(f"unit entry {dict(u)!r} lacks {missing}; each unit needs unit, label, cat and iou")
        unit = int(u["unit"])
        out.append(dict(image=u.get("image", strip_path(unit)), unit=unit,
                        iou=float(u["iou"]), label=str(u["label"]), cat=str(cat)))
        out[-1].update({k: u[k] for k in EXPLAIN_KEYS + METRICS_KEYS + tuple(extra) if k in u})
    return out


def write_report_json(path: str, name: str, units: Sequence[Mapping], image: str = "concepts_99.svg",
                      extra: Sequence[str] = ()) -> str:
    """Write ``report.json`` for one dissected layer; returns ``path``.

    ``name`` is the header name (``"<model> <dataset> <seg>"`` in the original),
    ``units`` one dict per unit with ``unit``, ``label``, ``cat`` and ``iou``;
    ``extra``: more per-unit keys to keep (a method strategy's fields).
    """
    dump_json(path, dict(header=dict(name=str(name), image=str(image)), units=report_units(units, extra)))
    return path


def _float(value) -> float:
    if isinstance(value, str):
        return float(value.replace("Infinity", "inf"))
    return float(value)


def read_report_json(path: str) -> dict:
    """Read a ``report.json`` back, with ``"NaN"``-style strings turned into floats again."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read dissection report {path}: {e}; run the dissection again") from e
    if not isinstance(data, dict) or "units" not in data or "header" not in data:
        raise ValueError(f"{path} is not a dissection report.json (needs 'header' and 'units')")
    for u in data["units"]:
        u["iou"] = _float(u["iou"])
    return data
