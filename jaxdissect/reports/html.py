"""``index.html``: one self-contained page per dissection run.

Each dissected layer gets a section with its concept bar graph, its summary
numbers and a table of units (image strip, unit, label, category, IoU). The
unit data is embedded in the page as JSON and rendered by a little plain
JavaScript that sorts (IoU, label, unit) and filters (label text, category,
minimum IoU), so the page works opened from the file system and served over
HTTP alike, with no network access. The controls' state lives in the URL
fragment (``#sort=label&label=door&cat=object&miniou=0.04``), so a filtered
view can be bookmarked. Every string that comes from data is escaped: HTML
escaping in the markup, and ``<``, ``>``, ``&`` as ``\\u003c``-style JSON
escapes inside the data block, and the script inserts text with
``textContent`` only.

Units below the IoU cut-off (``interpretable: false``) are greyed out, as
NetDissect showed them, and a unit that never fires (``dead: true``: no pixel
above its threshold) or matches no concept (IoU 0) shows no label. The header
lists the run's settings, explains the strips, links the cross-layer
``summary.svg`` and lists the images that could not be read.
"""

from __future__ import annotations

import html
import json
import math
import os
import posixpath
from typing import Mapping, Sequence
from urllib.parse import quote

from jaxdissect import fileio
from jaxdissect.reports.bargraph import CATEGORIES
from jaxdissect.reports.strips import BORDER_COLOR, OUTER_BORDER_COLOR, strip_path

_STYLE = """
body { font-family: sans-serif; margin: 1em 2em; color: #222; }
nav a { margin-right: 1em; }
#controls { position: sticky; top: 0; background: #f4f4f4; padding: 0.5em; border-bottom: 1px solid #ccc; z-index: 1; }
#controls label { margin-right: 1.2em; }
section.layer { margin-top: 1.5em; }
.summary span { margin-right: 1.2em; }
table.units { border-collapse: collapse; }
table.units td, table.units th { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; vertical-align: middle; }
table.units td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.units img { display: block; height: 100px; }
.count { color: #555; }
table.units tr.below td, table.units tr.dead td { color: #9a9a9a; }
table.units tr.below img, table.units tr.dead img { opacity: 0.35; }
table.units tr.dead td.label { font-style: italic; }
dl.settings { display: grid; grid-template-columns: max-content auto; gap: 2px 1em; margin: 0.5em 0; }
dl.settings dt { font-weight: bold; }
dl.settings dd { margin: 0; }
img.bargraph { max-width: 100%; height: auto; }
img.summary { max-width: 100%; height: auto; }
.legend { max-width: 60em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 2px solid rgb(255, 255, 0); background: #777; vertical-align: middle; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var controls = {
    sort: document.getElementById("sort"),
    label: document.getElementById("filter-label"),
    cat: document.getElementById("filter-cat"),
    miniou: document.getElementById("filter-iou")
  };
  var significant = document.getElementById("filter-significant");
  function readHash() {
    var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    if (params.has("sort")) controls.sort.value = params.get("sort");
    if (params.has("label")) controls.label.value = params.get("label");
    if (params.has("cat")) controls.cat.value = params.get("cat");
    if (params.has("miniou")) controls.miniou.value = params.get("miniou");
    if (significant) significant.checked = params.get("significant") === "1";
  }
  function writeHash() {
    var params = new URLSearchParams();
    params.set("sort", controls.sort.value);
    if (controls.label.value) params.set("label", controls.label.value);
    if (controls.cat.value) params.set("cat", controls.cat.value);
    if (controls.miniou.value) params.set("miniou", controls.miniou.value);
    if (significant && significant.checked) params.set("significant", "1");
    try { history.replaceState(null, "", "#" + params.toString()); } catch (e) { /* file:// in some browsers */ }
  }
  function iouOf(u) { return (typeof u.iou === "number") ? u.iou : -Infinity; }
  function num(u, k, missing) { return (typeof u[k] === "number") ? u[k] : missing; }
  function fixed(u, k, digits) { return (typeof u[k] === "number") ? u[k].toFixed(digits) : ""; }
  var comparators = {
    iou: function (a, b) { return iouOf(b) - iouOf(a) || a.unit - b.unit; },
    label: function (a, b) { return a.label.localeCompare(b.label) || iouOf(b) - iouOf(a) || a.unit - b.unit; },
    unit: function (a, b) { return a.unit - b.unit; },
    formula_iou: function (a, b) { return num(b, "formula_iou", -Infinity) - num(a, "formula_iou", -Infinity) || a.unit - b.unit; },
    p_value: function (a, b) { return num(a, "p_value", Infinity) - num(b, "p_value", Infinity) || iouOf(b) - iouOf(a) || a.unit - b.unit; }
  };
  (data.metric_keys || []).forEach(function (k) {
    comparators[k] = function (a, b) { return num(b, k, -Infinity) - num(a, k, -Infinity) || a.unit - b.unit; };
  });
  (data.columns || []).forEach(function (c) {
    comparators[c.id] = c.kind === "number" ?
      (c.ascending ?
        function (a, b) { return num(a, c.id, Infinity) - num(b, c.id, Infinity) || a.unit - b.unit; } :
        function (a, b) { return num(b, c.id, -Infinity) - num(a, c.id, -Infinity) || a.unit - b.unit; }) :
      function (a, b) {
        return String(a[c.id] || "\uffff").localeCompare(String(b[c.id] || "\uffff")) || a.unit - b.unit;
      };
  });
  function labelText(u) {
    var text = u.label;
    (data.columns || []).forEach(function (c) {
      if (c.kind === "text" && typeof u[c.id] === "string") text += "\n" + u[c.id];
    });
    return text.toLowerCase();
  }
  function cell(row, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
  }
  function render() {
    var text = controls.label.value.trim().toLowerCase();
    var cat = controls.cat.value;
    var minIou = parseFloat(controls.miniou.value);
    if (isNaN(minIou)) minIou = -Infinity;
    var compare = comparators[controls.sort.value] || comparators.iou;
    data.layers.forEach(function (layer, li) {
      var shown = layer.units.filter(function (u) {
        return (!text || labelText(u).indexOf(text) >= 0) &&
               (!cat || u.cat === cat) && iouOf(u) >= minIou &&
               (!significant || !significant.checked || u.significant === true);
      }).sort(compare);
      var body = document.createElement("tbody");
      shown.forEach(function (u) {
        var row = document.createElement("tr");
        row.className = "unit-row" + (u.dead ? " dead" : (u.interpretable === false ? " below" : ""));
        row.setAttribute("data-unit", String(u.unit));
        if (u.dead) row.title = "never fires: no pixel above the unit's threshold";
        else if (u.interpretable === false) row.title = "best IoU below the cut-off: not a detector";
        cell(row, String(u.unit), "num");
        cell(row, u.dead ? "(never fires)" : (u.label || "(no concept)"), "label");
        cell(row, u.dead ? "" : u.cat, "cat");
        cell(row, typeof u.iou === "number" ? u.iou.toFixed(4) : "NaN", "num");
        if (data.formulas) {
          cell(row, u.dead ? "" : (u.formula || ""), "formula");
          cell(row, fixed(u, "formula_iou", 4), "num formula-iou");
        }
        if (data.significance) {
          cell(row, fixed(u, "p_value", 4), "num p-value");
          cell(row, fixed(u, "q_value", 4), "num q-value");
          var ci = Array.isArray(u.iou_ci) ? u.iou_ci[0].toFixed(3) + "\u2013" + u.iou_ci[1].toFixed(3) : "";
          cell(row, ci, "num iou-ci");
        }
        (data.metric_keys || []).forEach(function (k) { cell(row, fixed(u, k, 3), "num metric " + k); });
        (data.columns || []).forEach(function (c) {
          if (c.kind === "number") cell(row, fixed(u, c.id, c.digits), "num column " + c.id);
          else cell(row, (u.dead || u[c.id] === null || u[c.id] === undefined) ? "" : String(u[c.id]), "column " + c.id);
        });
        var td = document.createElement("td");
        var img = document.createElement("img");
        img.setAttribute("loading", "lazy");
        img.setAttribute("alt", "top images of unit " + u.unit);
        img.setAttribute("src", u.image);
        td.appendChild(img);
        row.appendChild(td);
        body.appendChild(row);
      });
      var table = document.getElementById("table-" + li);
      table.replaceChild(body, table.tBodies[0]);
      document.getElementById("count-" + li).textContent =
        "showing " + shown.length + " of " + layer.units.length + " units";
    });
    writeHash();
  }
  readHash();
  ["change", "input"].forEach(function (ev) {
    Object.keys(controls).forEach(function (k) { controls[k].addEventListener(ev, render); });
    if (significant) significant.addEventListener(ev, render);
  });
  window.addEventListener("hashchange", function () { readHash(); render(); });
  render();
})();
"""

_RESERVED = ("name", "dir", "units", "svg", "summary", "figures")
# ``dissect(label_metrics=True)``: per-unit metrics against the label, as (key, column heading).
METRIC_COLUMNS = tuple((f"m_{level}_{m}", f"{level} {title}") for level in ("pixel", "image")
                       for m, title in (("iou", "IoU"), ("f1", "F1"), ("auprc", "AUPRC"), ("pearson", "r"),
                                        ("cosine", "cos")))


def _json_for_script(data) -> str:
    """JSON that cannot end or confuse the surrounding ``<script>`` element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _url(*parts: str) -> str:
    path = posixpath.join(*[p for p in parts if p and p != "."])
    return quote(path.replace(os.sep, "/"), safe="/")


def _iou(value):
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _summary_items(layer: Mapping) -> list[tuple[str, object]]:
    items = list(dict(layer.get("summary") or {}).items())
    items += [(k, v) for k, v in layer.items()
              if k not in _RESERVED and isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return items


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _doubled_size(output_dir: str, ldir: str, svg: str) -> str:
    """``width``/``height`` attributes showing a bar graph at twice its drawn size (readable labels)."""
    import re

    try:
        with open(os.path.join(output_dir, ldir, svg), encoding="utf-8") as f:
            head = f.read(4096)
    except OSError:
        return ""
    found = re.search(r'<svg[^>]*width="([\d.]+)"[^>]*height="([\d.]+)"', head)
    if not found:
        return ""
    w, h = (int(round(2 * float(v))) for v in found.groups())
    return f' width="{w}" height="{h}"'


def _header(settings: Mapping | None, skipped_files: Sequence[str], output_dir: str) -> str:
    esc = html.escape
    parts = []
    if settings:
        rows = "".join(f"<dt>{esc(str(k))}</dt><dd>{esc(_format(v))}</dd>" for k, v in settings.items())
        parts.append(f'<dl class="settings">{rows}</dl>')
    colour = "rgb({}, {}, {})".format(*BORDER_COLOR)
    outer = "rgb({}, {}, {})".format(*OUTER_BORDER_COLOR)
    parts.append(
        '<p class="legend">Each unit\'s strip shows its top images; the <span class="swatch" '
        f'style="border-color: {colour}; outline: 1px solid {outer}"></span> yellow-and-black outline '
        "(yellow inside, black outside, so it shows on any colour) surrounds the region where the unit's "
        "activation, upsampled to the image, is above its threshold (the top quantile of all its "
        "activations); the rest of the image is dimmed. Units whose best IoU is not above the cut-off "
        "are greyed out: they are not counted as detectors. A unit that never exceeds its threshold "
        "(it never fires) has no label, nor has a unit whose best IoU is 0 (it matches no concept).</p>")
    links = [f'<a href="{esc(_url(n))}">{esc(n)}</a>' for n in ("summary.svg", "summary.md", "summary.csv")
             if os.path.exists(os.path.join(output_dir, n))]
    if links:
        parts.append(f'<p class="summary-links">Cross-layer summary: {" · ".join(links)}</p>')
    if os.path.exists(os.path.join(output_dir, "summary.svg")):
        parts.append('<p><img class="summary" src="summary.svg" alt="interpretable units and unique '
                     'concepts per layer"></p>')
    if skipped_files:
        items = "".join(f"<li>{esc(str(f))}</li>" for f in skipped_files)
        parts.append(f'<details class="skipped"><summary>{len(skipped_files)} unreadable image'
                     f'{"" if len(skipped_files) == 1 else "s"} left out of every statistic</summary>'
                     f"<ul>{items}</ul></details>")
    return "\n".join(parts)


def _column_value(unit: Mapping, key: str, kind: str):
    """A unit's value of an extra column: ``key`` a dotted path into the unit's entry; None where absent."""
    value = unit
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None or isinstance(value, bool):
        return None if value is None else str(value).lower()
    if kind == "number":
        try:
            return _iou(value)
        except (TypeError, ValueError):
            return None
    return str(value)


def _check_columns(columns: Sequence[Mapping]) -> list[dict]:
    out = []
    for i, c in enumerate(columns):
        if not isinstance(c, Mapping) or not c.get("key") or c.get("kind", "text") not in ("text", "number"):
            raise ValueError(f"column {i} must be {{'key': 'a.b', 'title': ..., 'kind': 'text' or 'number', "
                             f"'digits': N, 'ascending': bool}}, got {c!r}")
        out.append({"id": f"col{i}", "key": str(c["key"]), "title": str(c.get("title", c["key"])),
                    "kind": c.get("kind", "text"), "digits": int(c.get("digits", 3)),
                    "ascending": bool(c.get("ascending", False))})
    return out


def render_run_report(run_name: str, layers: Sequence[Mapping], output_dir: str = ".",
                      settings: Mapping | None = None, skipped_files: Sequence[str] = (), q: float = 0.05,
                      columns: Sequence[Mapping] = ()) -> str:
    """The HTML text of :func:`write_run_report`."""
    esc = html.escape
    columns = _check_columns(columns)
    data = {"run": str(run_name), "layers": []}
    categories = list(CATEGORIES)
    sections = []
    nav = []
    formulas = significance = metrics = False
    heads = []
    for li, layer in enumerate(layers):
        if "name" not in layer or "units" not in layer:
            raise ValueError(f"layer entry {li} needs at least 'name' and 'units' (got keys {sorted(layer)})")
        name = str(layer["name"])
        ldir = str(layer.get("dir", ""))
        units = []
        for u in layer["units"]:
            unit = int(u["unit"])
            entry = dict(unit=unit, label=str(u["label"]), cat=str(u["cat"]), iou=_iou(u["iou"]),
                         image=_url(ldir, str(u.get("image", strip_path(unit)))))
            for flag in ("interpretable", "dead"):
                if flag in u:
                    entry[flag] = bool(u[flag])
            if entry.get("dead") or entry["iou"] == 0:  # never fires, or overlaps no concept: no label
                entry["label"] = ""
            if "formula" in u:
                entry["formula"] = str(u["formula"])
                entry["formula_iou"] = _iou(u.get("formula_iou", float("nan")))
                formulas = True
            if "p_value" in u:
                for k in ("p_value", "q_value"):
                    entry[k] = _iou(u.get(k, float("nan")))
                entry["significant"] = bool(u.get("significant", False))
                if u.get("iou_ci") is not None:
                    entry["iou_ci"] = [_iou(v) for v in u["iou_ci"]]
                    if None in entry["iou_ci"]:
                        del entry["iou_ci"]
                significance = True
            if "metrics" in u:
                scores = u["metrics"] or {}
                for key, _ in METRIC_COLUMNS:
                    level, metric = key.split("_")[1:]
                    value = (scores.get(level) or {}).get(metric)
                    entry[key] = None if value is None else _iou(value)
                metrics = True
            for c in columns:
                entry[c["id"]] = _column_value(u, c["key"], c["kind"])
            units.append(entry)
            if units[-1]["cat"] not in categories:
                categories.append(units[-1]["cat"])
        data["layers"].append(dict(name=name, units=units))
        nav.append(f'<a href="#layer-{li}">{esc(name)}</a>')
        summary = "".join(f'<span><b>{esc(str(k))}</b>: {esc(_format(v))}</span>'
                          for k, v in _summary_items(layer))
        links = []
        if layer.get("svg"):
            svg = _url(ldir, str(layer["svg"]))
            links.append(f'<p><img class="bargraph" src="{esc(svg)}"{_doubled_size(output_dir, ldir, layer["svg"])} '
                         f'alt="concepts of {esc(name)}"></p>')
        for file, caption in layer.get("figures") or ():
            links.append(f'<figure><img class="figure" src="{esc(_url(ldir, str(file)))}" alt="{esc(str(caption))}">'
                         f'<figcaption>{esc(str(caption))}</figcaption></figure>')
        report = posixpath.join(ldir, "report.json") if ldir else "report.json"
        if os.path.exists(os.path.join(output_dir, report)):
            links.append(f'<p><a href="{esc(_url(report))}">report.json</a></p>')
        sections.append(
            f'<section class="layer" id="layer-{li}">\n<h2>{esc(name)}</h2>\n'
            f'<p class="summary">{summary}</p>\n' + "\n".join(links) +
            f'\n<p class="count" id="count-{li}"></p>\n'
            f'<table class="units" id="table-{li}"><thead><tr><th>unit</th><th>label</th>'
            f'<th>category</th><th>IoU</th>{{extra_heads}}<th>top images</th></tr></thead><tbody></tbody></table>\n'
            f'</section>')
    data["formulas"], data["significance"] = formulas, significance
    data["metric_keys"] = [k for k, _ in METRIC_COLUMNS] if metrics else []
    data["columns"] = [{k: c[k] for k in ("id", "kind", "digits", "ascending")} for c in columns]
    if formulas:
        heads.append("<th>formula</th><th>formula IoU</th>")
    if significance:
        heads.append("<th>p-value</th><th>q-value (BH)</th><th>IoU 95% interval</th>")
    if metrics:
        heads.append("".join(f'<th title="label metric against the unit\'s label">{esc(t)}</th>'
                             for _, t in METRIC_COLUMNS))
    heads += [f"<th>{esc(c['title'])}</th>" for c in columns]
    sections = [sec.replace("{extra_heads}", "".join(heads)) for sec in sections]
    sorts = ('<option value="formula_iou">formula IoU</option>' if formulas else "") + (
        '<option value="p_value">p-value</option>' if significance else "") + (
        "".join(f'<option value="{k}">{esc(t)}</option>' for k, t in METRIC_COLUMNS) if metrics else "") + "".join(
        f'<option value="{c["id"]}">{esc(c["title"])}</option>' for c in columns)
    significant_filter = ('<label><input id="filter-significant" type="checkbox"> significant at q = '
                          f'{esc(_format(q))}</label>' if significance else "")
    options = "".join(f'<option value="{esc(c)}">{esc(c)}</option>' for c in categories)
    title = esc(f"Dissection: {run_name}")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{title}</h1>
{_header(settings, skipped_files, output_dir)}
<nav>Layers: {' '.join(nav)}</nav>
<div id="controls">
<label>Sort by <select id="sort"><option value="iou">IoU</option><option value="label">label</option><option value="unit">unit</option>{sorts}</select></label>
<label>Label contains <input id="filter-label" type="search"></label>
<label>Category <select id="filter-cat"><option value="">all</option>{options}</select></label>
<label>Min IoU <input id="filter-iou" type="number" step="0.01" min="0" max="1"></label>
{significant_filter}
</div>
<noscript><p>This page needs JavaScript to list the units; each layer's report.json holds the same data.</p></noscript>
{chr(10).join(sections)}
<script type="application/json" id="report-data">{_json_for_script(data)}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_run_report(output_dir: str, run_name: str, layers: Sequence[Mapping], settings: Mapping | None = None,
                     skipped_files: Sequence[str] = (), q: float = 0.05, columns: Sequence[Mapping] = ()) -> str:
    """Write ``output_dir/index.html`` for a run; returns its path.

    ``layers`` holds one dict per dissected layer: ``name``, ``dir`` (the layer's
    results directory relative to ``output_dir``), ``units`` (dicts with ``unit``,
    ``label``, ``cat``, ``iou`` and optionally ``image``, relative to ``dir``,
    default ``image/unit<u>.jpg``), optionally ``svg`` (the bar graph, relative
    to ``dir``), ``figures`` (``(file relative to dir, caption)`` pairs shown under it) and summary numbers,
    either as a ``summary`` dict or as further
    scalar entries (e.g. ``interpretable=12``). A unit may carry
    ``interpretable`` (False: greyed out) and ``dead`` (True: never fires, no
    label shown), and ``formula``/``formula_iou`` and ``p_value``/``q_value``/
    ``significant``/``iou_ci`` (shown as columns, sortable, with a "significant
    at q" filter, when any unit has them; ``q`` is the FDR they were tested at),
    and ``metrics`` (``{'pixel': {'iou', 'f1', 'auprc', 'pearson', 'cosine'},
    'image': {...}}`` or None: ten sortable columns). ``columns``: more unit columns (a method strategy's,
    ``Strategy.page_options``), each ``{'key': 'a.b', 'title': ..., 'kind': 'text' or 'number', 'digits': 3,
    'ascending': False}``: the value at the dotted ``key`` of each unit's entry (absent: empty), sortable
    (numbers largest first unless ``ascending``), text columns searched by the label filter too.
    ``settings`` (name -> value) are listed in the header, and ``skipped_files`` (unreadable images) below it.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "index.html")
    text = render_run_report(run_name, layers, output_dir, settings=settings, skipped_files=skipped_files, q=q,
                             columns=columns)
    fileio.write_text(path, text)
    return path
