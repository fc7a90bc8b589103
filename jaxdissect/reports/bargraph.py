"""SVG bar graph of the concepts a layer's units detect (spec 2.7 and 3.1 step 6).

One bar per concept, its height the number of units labelled with it, bars
grouped on light background rectangles per category and coloured with the
category's dark colour. Written by hand (no plotting library) so the file
keeps the original's bar geometry and stays small. Category captions sit
above the bars (staggered onto a second row when they would overlap), a top
margin keeps the highest tick inside the picture, the height leaves room for
the longest rotated label, and a ``viewBox`` lets a page scale it up sharply.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

from jaxdissect import fileio

CATEGORIES = ("object", "part", "material", "texture", "color")
# (dark bar colour, light background colour) per category, in CATEGORIES order,
# then extra colours for categories outside that list.
PALETTE = (
    ("#4B4CBF", "#B6B6F2"),
    ("#55B05B", "#B6F2BA"),
    ("#50BDAC", "#A5E5DB"),
    ("#81C679", "#C0FF9B"),
    ("#F0883B", "#F2CFB6"),
    ("#D4CF24", "#F2F1B6"),
    ("#D92E2B", "#F2B6B6"),
    ("#AB6BC6", "#CFAAFF"),
)
BAR_WIDTH = 12
GAP = BAR_WIDTH / 4
LEFT_MARGIN = 32
RIGHT_MARGIN = 8
FILE_HEADER = (
    '<?xml version="1.0" standalone="no"?>\n'
    '<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN"\n'
    '"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n'
)


def _num(x: float) -> str:
    return repr(float(x)) if x != int(x) else str(int(x))


def _text(x: float, y: float, size: float, anchor: str, transform: str, content: str, extra: str = "") -> str:
    style = (f"font-family:sans-serif;font-size:{int(size)}px;text-anchor:{anchor};{extra}"
             f"transform:translate({int(x)}px, {int(y)}px){transform};")
    return f'<text x="0" y="0" style={quoteattr(style)}>{escape(content)}</text>'


def _rect(x: float, y: float, width: float, height: float, fill: str) -> str:
    return (f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(width)}" '
            f'height="{_num(height)}" fill="{fill}" />')


def _palette_index(category: str, position: int) -> int:
    return CATEGORIES.index(category) if category in CATEGORIES else position


def make_svg_bargraph(labels: Sequence[str], heights: Sequence[int],
                      categories: Sequence[tuple[str, int]], barheight: int = 80,
                      file_header: bool = True) -> str:
    """SVG text of a bar graph.

    ``categories`` is a list of ``(category, count)``: the first ``count`` bars
    belong to the first category, and so on (zero counts are skipped). Colours
    follow the category's position in :data:`CATEGORIES`. ``file_header`` adds
    the XML declaration and doctype of a standalone ``.svg`` file.
    """
    labels = [str(label) for label in labels]
    heights = [int(h) for h in heights]
    categories = [(str(c), int(n)) for c, n in categories]
    if len(labels) != len(heights):
        raise ValueError(f"{len(labels)} labels but {len(heights)} heights")
    if sum(n for _, n in categories) != len(heights):
        raise ValueError(
            f"category counts {categories} add up to {sum(n for _, n in categories)}, "
            f"but there are {len(heights)} bars")
    top = max(max(heights, default=1), 1)
    unit = barheight / top
    textsize = BAR_WIDTH + GAP / 2
    textmargin = BAR_WIDTH * 2 / 3
    char = 0.6 * BAR_WIDTH  # average glyph advance of the label font, for the layout estimate

    # Category captions above the bars: left-aligned on their group, on the first row where they fit.
    captions, row_ends = [], []
    x = LEFT_MARGIN
    for cat, count in categories:
        if not count:
            continue
        caption = f"{count} {cat}{'' if count == 1 else 's'}"
        end = x + len(caption) * 0.6 * textsize
        row = next((i for i, e in enumerate(row_ends) if x >= e + GAP), len(row_ends))
        if row == len(row_ends):
            row_ends.append(end)
        else:
            row_ends[row] = end
        captions.append((x, row, caption))
        x += (BAR_WIDTH + GAP) * count
    top_margin = textsize * (max(len(row_ends), 1) + 0.5)
    longest = max((len(label) for label in labels), default=0)
    label_room = textmargin + longest * char * 0.71 + BAR_WIDTH
    width = max(len(heights) * (BAR_WIDTH + GAP) + 2 * LEFT_MARGIN + RIGHT_MARGIN,
                max(row_ends, default=0) + RIGHT_MARGIN,
                LEFT_MARGIN + len(heights) * (BAR_WIDTH + GAP) + longest * char * 0.71 + RIGHT_MARGIN)
    width = int(math.ceil(width))
    base = top_margin + barheight
    height = int(math.ceil(base + max(label_room, barheight / 2)))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" '
             f'width="{_num(width)}" height="{_num(height)}" viewBox="0 0 {_num(width)} {_num(height)}">']
    x = LEFT_MARGIN
    if heights:
        for tick in sorted({1, (top + 1) // 2, top}):
            parts.append(_text(x - GAP, base - tick * unit, textsize, "end", "",
                               str(tick), "dominant-baseline:middle;"))
        parts.append(_text(x - GAP - textsize, base - top * unit / 2, textsize, "middle",
                           " rotate(-90deg)", "units"))
    colours = []
    for position, (cat, count) in enumerate(categories):
        dark, light = PALETTE[_palette_index(cat, position) % len(PALETTE)]
        colours += [dark] * count
        if count:
            parts.append(_rect(x, base - top * unit, (BAR_WIDTH + GAP) * count - GAP, top * unit, light))
            x += (BAR_WIDTH + GAP) * count
    x = LEFT_MARGIN
    for label, h, colour in zip(labels, heights, colours):
        parts.append(_rect(x, base - h * unit, BAR_WIDTH, h * unit, colour))
        x += BAR_WIDTH
        parts.append(_text(x, base + textmargin, BAR_WIDTH, "end", " rotate(-45deg)", label))
        x += GAP
    for cx, row, caption in captions:
        parts.append(_text(cx, textsize * (row + 1), textsize, "start", "", caption))
    parts.append("</svg>")
    return (FILE_HEADER if file_header else "") + "".join(parts)


def unit_fields(unit) -> tuple[str, str, float]:
    """``(label, category, iou)`` of a unit given as a ``report.json``-style dict or a tuple."""
    if isinstance(unit, Mapping):
        return str(unit["label"]), str(unit["cat"]), float(unit["iou"])
    label, cat, iou = unit
    return str(label), str(cat), float(iou)


def concept_counts(unit_labels: Iterable, miniou: float = 0.04) -> list[tuple[str, str, int]]:
    """``(label, category, units)`` of the concepts with IoU > ``miniou``, in bar order.

    Bars are ordered by category (:data:`CATEGORIES` order, other categories after,
    in order of first appearance), then by unit count, descending; ties keep the
    order in which the concepts first appear.
    """
    counts: dict[tuple[str, str], int] = {}
    for unit in unit_labels:
        label, cat, iou = unit_fields(unit)
        if math.isnan(iou) or not iou > miniou:
            continue
        counts[(label, cat)] = counts.get((label, cat), 0) + 1
    order = list(CATEGORIES) + [c for _, c in counts if c not in CATEGORIES]
    rank = {c: i for i, c in enumerate(dict.fromkeys(order))}
    keys = sorted(counts, key=lambda k: (rank[k[1]], -counts[k]))
    return [(label, cat, counts[(label, cat)]) for label, cat in keys]


def concept_bargraph(unit_labels: Iterable, miniou: float = 0.04, barheight: int = 80,
                     file_header: bool = True) -> str:
    """Bar graph of the concepts detected by units with IoU > ``miniou`` (spec 3.1 step 6).

    ``unit_labels`` holds one entry per unit: a dict with ``label``, ``cat`` and
    ``iou`` (as in ``report.json``) or a ``(label, cat, iou)`` tuple. Each
    category caption counts its distinct concepts.
    """
    bars = concept_counts(unit_labels, miniou)
    cats = list(dict.fromkeys(list(CATEGORIES) + [c for _, c, _ in bars]))
    per_cat = {c: sum(1 for _, bc, _ in bars if bc == c) for c in cats}
    return make_svg_bargraph([b[0] for b in bars], [b[2] for b in bars],
                             [(c, per_cat[c]) for c in cats], barheight=barheight,
                             file_header=file_header)


def write_concept_bargraph(path: str, unit_labels: Iterable, miniou: float = 0.04) -> str:
    """Write :func:`concept_bargraph` to ``path`` (e.g. ``concepts_99.svg``); returns the path."""
    fileio.write_text(path, concept_bargraph(unit_labels, miniou))
    return path
