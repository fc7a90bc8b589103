"""The report page as a reader sees it: dead and sub-threshold units marked, settings, legend, links, skipped files."""

import re
import time
import xml.etree.ElementTree as ET

import pytest

import screenshot as shot
from jaxdissect.reports import bargraph, html, summary

UNITS = [
    {"unit": 0, "label": "disc", "cat": "object", "iou": 0.31, "interpretable": True, "dead": False},
    {"unit": 1, "label": "disc", "cat": "object", "iou": 0.0, "interpretable": False, "dead": True},
    {"unit": 2, "label": "stripes", "cat": "texture", "iou": 0.02, "interpretable": False, "dead": False},
]


def _page(tmp_path):
    summary.write_summary(str(tmp_path), summary.layer_summary([("conv3", UNITS)], 0.04), title="t")
    settings = {"model": "demo", "quantile": 0.01, "IoU cut-off": 0.04, "images read": 11, "segmenter": "<seg>"}
    return html.write_run_report(str(tmp_path), "demo on synthetic", [{"name": "conv3", "dir": "conv3",
                                                                      "units": UNITS, "svg": "concepts_99.svg"}],
                                 settings=settings, skipped_files=["/data/bad <1>.jpg: OSError: truncated"])


def test_page_header_legend_links_and_skipped_files(tmp_path):
    text = open(_page(tmp_path), encoding="utf-8").read()
    for key in ("model", "quantile", "IoU cut-off", "images read", "segmenter"):
        assert f"<dt>{key}</dt>" in text
    assert "&lt;seg&gt;" in text and "<seg>" not in text
    assert "yellow-and-black outline" in text and "greyed out" in text and "never fires" in text
    assert 'href="summary.svg"' in text and '<img class="summary" src="summary.svg"' in text
    assert "1 unreadable image left out" in text and "/data/bad &lt;1&gt;.jpg: OSError: truncated" in text


@pytest.mark.skipif(shot.browser() is None, reason="chromium not installed")
def test_dead_and_subthreshold_units_marked_in_chromium(tmp_path):
    dom = shot.dump_dom(_page(tmp_path))
    rows = dict(re.findall(r'<tr class="([^"]*)" data-unit="(\d)"', dom)[i][::-1] for i in range(3))
    assert rows == {"0": "unit-row", "1": "unit-row dead", "2": "unit-row below"}
    dead = re.search(r'data-unit="1"[^>]*>(.*?)</tr>', dom).group(1)
    assert '<td class="label">(never fires)</td><td class="cat"></td>' in dead   # no "disc object"
    assert "tr.below td, table.units tr.dead td { color: #9a9a9a; }" in dom


def test_summary_svg_is_byte_reproducible(tmp_path):
    rows = summary.layer_summary([("conv3", UNITS), ("conv4", UNITS)], 0.04)
    a = summary.write_summary(str(tmp_path / "a"), rows, title="demo")["svg"]
    time.sleep(1.1)
    b = summary.write_summary(str(tmp_path / "b"), rows, title="demo")["svg"]
    assert open(a, "rb").read() == open(b, "rb").read()


def test_bargraph_captions_do_not_overlap_and_top_tick_is_inside():
    units = [("disc", "object", 0.5)] * 9 + [("x", "part", 0.5), ("stripes", "texture", 0.5),
                                             ("red", "color", 0.5), ("green", "color", 0.5)]
    svg = bargraph.concept_bargraph(units, miniou=0.04)
    root = ET.fromstring(svg.split("\n", 3)[3])
    texts = []
    for t in root.iter("{http://www.w3.org/2000/svg}text"):
        x, y = map(float, re.search(r"translate\(([-\d.]+)px, ([-\d.]+)px\)", t.get("style")).groups())
        texts.append((t.text, x, y, t.get("style")))
    ticks = [(x, y) for text, x, y, style in texts if text.isdigit()]
    assert min(y for _, y in ticks) >= 8                         # the highest tick is not clipped
    captions = [(text, x, y) for text, x, y, _ in texts if re.match(r"\d+ \w+s?$", text)]
    assert {c[0] for c in captions} == {"1 object", "1 part", "1 texture", "2 colors"}
    size = 15 * 0.6
    for i, (a, ax, ay) in enumerate(captions):
        for b, bx, by in captions[i + 1:]:
            if ay == by:   # on one row they must not overlap
                assert ax + len(a) * size <= bx or bx + len(b) * size <= ax, (a, b)
    assert int(root.get("width")) >= max(x + len(t) * size for t, x, _ in captions)
