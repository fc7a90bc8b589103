"""Report artefacts: thumbnails and strips, bar graph, report.json, index.html, summary.

References are independent of the code under test: PyTorch's ``grid_sample``
and ``interpolate`` for the thumbnail geometry, a planted activation whose
mask is known in closed form, XML/JSON parsers, and headless Chromium (when
installed) for the page's rendering and scripts.
"""

import csv
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxdissect.reports import bargraph, html, report_json, strips, summary

import screenshot as shot

YELLOW = np.array([255, 255, 0], np.uint8)
BLACK = np.array([0, 0, 0], np.uint8)
SVG = "{http://www.w3.org/2000/svg}"
NASTY = "<script>alert(1)</script>"
AMP = 'a&b "q"'


def _image(h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


# -- strips ------------------------------------------------------------------

def _torch_upsample(act, size):
    """The original's default upsampling: grid_sample, bilinear, zero padding, align_corners=True."""
    torch = pytest.importorskip("torch")
    h, w = act.shape

    def coords(ss):
        u = (np.arange(size) + 0.5) * ss / size - 0.5  # source index of each target pixel
        return u * 2 / (ss - 1) - 1

    gy, gx = np.meshgrid(coords(h), coords(w), indexing="ij")
    grid = torch.tensor(np.stack([gx, gy], -1)[None], dtype=torch.float64)
    out = torch.nn.functional.grid_sample(torch.tensor(act[None, None], dtype=torch.float64), grid,
                                          mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy()


@pytest.mark.parametrize("shape,size", [((14, 14), 56), ((4, 6), 64), ((7, 5), 100)])
def test_upsample_matches_grid_sample(shape, size):
    act = np.random.default_rng(1).normal(size=shape)
    np.testing.assert_allclose(strips.upsample(act, size), _torch_upsample(act, size), atol=1e-12)


def test_upsample_border_attenuation_from_spec():
    m = strips.interpolation_matrix(14, 56)
    assert m[0, 0] == pytest.approx(0.625) and m[1, 0] == pytest.approx(0.875)
    assert strips.interpolation_matrix(4, 64)[0, 0] == pytest.approx(0.53125)


def test_nearest_resize_matches_torch():
    torch = pytest.importorskip("torch")
    img = _image(37, 53)
    ref = torch.nn.functional.interpolate(torch.tensor(img).permute(2, 0, 1)[None].float(), size=(100, 100))
    np.testing.assert_array_equal(strips.nearest_resize(img, 100), ref[0].permute(1, 2, 0).numpy())


def _outside_ring(mask):
    padded = np.pad(mask, 1)
    near = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            near |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return near & ~mask


def test_masked_thumbnail_planted_square():
    # A 10x10 map, 1 on rows/cols 2..7, is an outer product of two indicators; upsampled
    # by 10 each becomes a trapezoid p(t) = clip(min(u - 1, 8 - u), 0, 1), u = (t + 0.5) / 10 - 0.5.
    act = np.zeros((10, 10))
    act[2:8, 2:8] = 1.0
    img = _image(50, 50)
    out = strips.masked_thumbnail(img, act, 0.5, thumb=100)
    assert out.shape == (100, 100, 3) and out.dtype == np.uint8
    u = (np.arange(100) + 0.5) / 10 - 0.5
    p = np.clip(np.minimum(u - 1, 8 - u), 0, 1)
    mask = np.outer(p, p) > 0.5
    # Straight edges at pixels 20 and 79, corners cut where p(y) * p(x) <= 0.5.
    assert mask[20, 50] and mask[79, 50] and not mask[19, 50] and not mask[80, 50]
    assert not mask[20, 20] and mask[50, 50] and mask.sum() < 60 * 60
    small = img.repeat(2, 0).repeat(2, 1)  # nearest 50 -> 100
    ring = _outside_ring(mask)
    outer = _outside_ring(mask | ring)   # a black ring outside the yellow one: visible on yellow objects too
    np.testing.assert_array_equal(out[mask], small[mask])
    assert (out[ring] == YELLOW).all() and (out[outer] == BLACK).all()
    assert ring[19, 50] and ring[80, 50] and not ring[18, 50] and outer[18, 50] and not outer[17, 50]
    rest = ~mask & ~ring & ~outer
    np.testing.assert_array_equal(out[rest], (small[rest] // 2).astype(np.uint8))


def test_masked_thumbnail_against_torch_reference():
    act = np.random.default_rng(2).gamma(1.0, size=(7, 7))
    level = float(np.quantile(act, 0.8))
    img = _image(56, 56, seed=3)
    out = strips.masked_thumbnail(img, act, level, thumb=100)
    mask = _torch_upsample(act, 100) > level
    border = _outside_ring(mask)
    outer = _outside_ring(mask | border)
    small = img[(np.arange(100) * 56) // 100][:, (np.arange(100) * 56) // 100]
    assert border.any() and mask.any()
    np.testing.assert_array_equal(out[mask], small[mask])
    assert (out[border] == YELLOW).all() and (out[outer] == BLACK).all()
    rest = ~mask & ~border & ~outer
    np.testing.assert_array_equal(out[rest], small[rest] // 2)


def test_outline_contrasts_with_a_yellow_object():
    """Item 5 of issue 23: on a yellow object the yellow ring vanishes, the black ring outside it does not."""
    act = np.zeros((10, 10))
    act[3:7, 3:7] = 1.0
    out = strips.masked_thumbnail(np.full((50, 50, 3), YELLOW, np.uint8), act, 0.5, thumb=100)
    mask = strips.upsample(act, 100) > 0.5
    ring = _outside_ring(mask)
    outer = _outside_ring(mask | ring)
    assert outer.sum() > ring.sum() > 0 and (out[outer] == BLACK).all() and (out[mask] == YELLOW).all()


def test_masked_thumbnail_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        strips.masked_thumbnail(_image(), np.full((4, 4), np.nan), 0.0)
    with pytest.raises(ValueError, match="uint8"):
        strips.masked_thumbnail(_image().astype(np.float32), np.zeros((4, 4)), 0.0)


def test_unit_strip_and_save(tmp_path):
    thumbs = [np.full((100, 100, 3), 10 * i, np.uint8) for i in range(5)]
    strip = strips.unit_strip(thumbs)
    assert strip.shape == (100, 520, 3)
    for i in range(5):
        assert (strip[:, i * 105:i * 105 + 100] == 10 * i).all()
        if i < 4:
            assert (strip[:, i * 105 + 100:i * 105 + 105] == 255).all()
    paths = strips.save_strips(str(tmp_path), {3: strip, 7: strip[:, :100]})
    assert sorted(os.listdir(tmp_path / "image")) == ["unit3.jpg", "unit7.jpg"]
    back = np.asarray(Image.open(paths[0]))
    assert back.shape == (100, 520, 3)
    assert np.abs(back.astype(int) - strip).mean() < 3


# -- bar graph -----------------------------------------------------------------

UNITS = [
    dict(unit=0, label="door", cat="object", iou=0.10),
    dict(unit=1, label=NASTY, cat="object", iou=0.20),
    dict(unit=2, label="door", cat="object", iou=0.05),
    dict(unit=3, label="red", cat="color", iou=0.30),
    dict(unit=4, label=AMP, cat="part", iou=float("nan")),
    dict(unit=5, label="wood", cat="material", iou=0.04),     # not above the threshold
    dict(unit=6, label="sky", cat="object", iou=0.06),
    dict(unit=7, label="leg", cat="part", iou=0.07),
    dict(unit=8, label=AMP, cat="part", iou=0.08),
    dict(unit=9, label="sky", cat="object", iou=0.5),
    dict(unit=10, label="-", cat="-", iou=0.01),
]


def _bars(svg_text):
    root = ET.fromstring(svg_text.split("\n", 3)[3] if svg_text.startswith("<?xml") else svg_text)
    rects = root.findall(f"{SVG}rect")
    texts = [t.text for t in root.findall(f"{SVG}text")]
    return root, rects, texts


def test_concept_bargraph_order_counts_and_escaping():
    svg = bargraph.concept_bargraph(UNITS, miniou=0.04)
    assert svg.startswith('<?xml version="1.0"')
    root, rects, texts = _bars(svg)
    # Bars: objects (door 2, sky 2 (tie: door appeared first), <script> 1), parts (leg 1, a&b 1: NaN unit 4 skipped), color (red 1).
    labels = ["door", "sky", NASTY, "leg", AMP, "red"]
    heights = [2, 2, 1, 1, 1, 1]
    backgrounds, bars = rects[:3], rects[3:]
    assert len(bars) == len(labels)
    assert [t for t in texts if t in labels] == labels
    top = max(float(b.get("height")) for b in bars)
    assert top == pytest.approx(80)
    assert [round(float(b.get("height")) / top * 2) for b in bars] == heights
    assert [b.get("fill") for b in bars] == ["#4B4CBF"] * 3 + ["#55B05B"] * 2 + ["#F0883B"]
    assert [b.get("fill") for b in backgrounds] == ["#B6B6F2", "#B6F2BA", "#F2CFB6"]
    assert "3 objects" in texts and "2 parts" in texts and "1 color" in texts
    assert int(root.get("width")) >= 6 * 15 + 72 and int(root.get("height")) >= 160
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"   # scalable in a page
    assert NASTY not in svg and "&lt;script&gt;" in svg
    xs = [float(b.get("x")) for b in bars]
    assert xs == [32 + 15 * i for i in range(6)]


def test_bargraph_empty_and_tuples():
    svg = bargraph.concept_bargraph([("x", "object", 0.01)], miniou=0.04)
    _, rects, _ = _bars(svg)
    assert rects == []
    svg = bargraph.make_svg_bargraph(["a", "b"], [3, 1], [("object", 1), ("color", 1)], file_header=False)
    _, rects, texts = _bars(svg)
    assert [r.get("fill") for r in rects[2:]] == ["#4B4CBF", "#F0883B"]
    assert texts[:3] == ["1", "2", "3"]  # unit scale ticks at 1, (max+1)//2, max
    with pytest.raises(ValueError, match="add up"):
        bargraph.make_svg_bargraph(["a"], [1], [("object", 2)])


def test_write_concept_bargraph(tmp_path):
    path = bargraph.write_concept_bargraph(str(tmp_path / "concepts_99.svg"), UNITS, 0.04)
    ET.parse(path)


# -- report.json -----------------------------------------------------------------

def test_report_json_format(tmp_path):
    path = str(tmp_path / "report.json")
    report_json.write_report_json(path, "vgg16 places netpqc", [dict(u, iou=np.float32(u["iou"])) for u in UNITS])
    text = open(path).read()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["header"] == {"name": "vgg16 places netpqc", "image": "concepts_99.svg"}
    assert text.startswith('{\n "header": {\n  "name"')  # indent 1
    assert len(data["units"]) == len(UNITS)
    for got, want in zip(data["units"], UNITS):
        assert list(got) == ["image", "unit", "iou", "label", "cat"]
        assert got["image"] == f"image/unit{want['unit']}.jpg"
        assert (got["label"], got["cat"], got["unit"]) == (want["label"], want["cat"], want["unit"])
        if math.isnan(want["iou"]):
            assert got["iou"] == "NaN"
        else:
            assert got["iou"] == pytest.approx(want["iou"], rel=1e-6)
    back = report_json.read_report_json(path)
    assert math.isnan(back["units"][4]["iou"])
    with pytest.raises(ValueError, match="lacks"):
        report_json.write_report_json(path, "x", [dict(unit=0, label="a")])


# -- index.html ------------------------------------------------------------------

def _layers(root):
    """Two layers on disk: strips with yellow borders, bar graphs and report.json."""
    layers = []
    for name, units in (("conv4", UNITS), (AMP + " <b>", UNITS[:4])):
        d = "layer_" + str(len(layers))
        os.makedirs(root / d, exist_ok=True)
        act = np.zeros((8, 8))
        act[2:6, 2:6] = 1
        thumb = strips.masked_thumbnail(np.full((64, 64, 3), 200, np.uint8), act, 0.5, 100)
        strips.save_strips(str(root / d), {u["unit"]: strips.unit_strip([thumb] * 3) for u in units})
        bargraph.write_concept_bargraph(str(root / d / "concepts_99.svg"), units, 0.04)
        report_json.write_report_json(str(root / d / "report.json"), name, units)
        layers.append(dict(name=name, dir=d, units=units, svg="concepts_99.svg",
                           summary={"units": len(units), "interpretable": 3}))
    return layers


def _embedded(page):
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m, "no embedded data block"
    return m.group(1)


def test_html_escapes_and_embeds_data(tmp_path):
    layers = _layers(tmp_path)
    path = html.write_run_report(str(tmp_path), f"run {NASTY}", layers)
    page = open(path, encoding="utf-8").read()
    assert NASTY not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the title
    assert "a&amp;b &quot;q&quot; &lt;b&gt;" in page       # the second layer's name
    assert AMP not in page
    block = _embedded(page)
    assert "</" not in block and "<" not in block
    data = json.loads(block)
    assert data["run"] == f"run {NASTY}"
    assert [l["name"] for l in data["layers"]] == ["conv4", AMP + " <b>"]
    got = data["layers"][0]["units"]
    assert [u["label"] for u in got] == [u["label"] for u in UNITS]
    assert got[4]["iou"] is None
    assert got[1]["image"] == "layer_0/image/unit1.jpg"
    assert 'src="layer_1/concepts_99.svg"' in page
    assert page.count('<table class="units"') == 2
    # No network: no absolute URLs to other hosts.
    assert not re.search(r'(src|href)="(https?:)?//', page)


needs_chromium = pytest.mark.skipif(shot.browser() is None, reason="chromium not installed")


@pytest.fixture(scope="module")
def run_page(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return html.write_run_report(str(root), f"run {NASTY}", _layers(root))


@needs_chromium
def test_html_scripts_render_sort_and_filter(run_page):
    base = Path(run_page).as_uri()
    dom = shot.dump_dom(base)
    tables = dom.split('<table class="units"')[1:]
    rows = [re.findall(r'<tr class="unit-row" data-unit="(\d+)"', t) for t in tables]
    assert len(rows[0]) == len(UNITS) and len(rows[1]) == 4
    # Default sort: IoU descending, NaN last.
    by_iou = sorted((u for u in UNITS if not math.isnan(u["iou"])), key=lambda u: -u["iou"])
    assert [int(r) for r in rows[0]] == [u["unit"] for u in by_iou] + [4]
    assert "<script>alert" not in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    dom = shot.dump_dom(base + "#sort=unit&label=DOOR&cat=object&miniou=0.06")
    rows = [re.findall(r'data-unit="(\d+)"', t) for t in dom.split('<table class="units"')[1:]]
    assert rows == [["0"], ["0"]]
    assert "showing 1 of 11 units" in dom and "showing 1 of 4 units" in dom
    dom = shot.dump_dom(base + "#sort=label&cat=part")
    rows = re.findall(r'data-unit="(\d+)"', dom.split('<table class="units"')[1])
    assert rows == ["8", "4", "7"]  # 'a&b "q"' (IoU 0.08 before NaN) < 'leg'


@needs_chromium
def test_html_screenshot_shows_table_and_strips(run_page, tmp_path):
    png = shot.screenshot(run_page, str(tmp_path / "page.png"))
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == (1600, 1200)
    assert img.std() > 10, "blank screenshot"
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    # Strips: 3 thumbnails each, a bright square (200) with a yellow border on a dimmed (100) field;
    # JPEG blurs the 1-pixel border, so look for yellowish pixels and both grey levels.
    yellowish = (r > 150) & (r - b > 60) & (g - b > 60)
    assert yellowish.sum() > 2000, "no yellow-bordered unit strips visible"
    assert (np.abs(img - 100).sum(-1) < 15).sum() > 50000, "no dimmed thumbnail regions visible"
    assert (np.abs(img - 200).sum(-1) < 15).sum() > 20000, "no highlighted thumbnail regions visible"
    bars = (np.abs(img - [0x4B, 0x4C, 0xBF]).sum(-1) < 30)
    assert bars.sum() > 100, "bar graph not visible"


# -- summary -------------------------------------------------------------------------

def test_layer_summary_and_files(tmp_path):
    rows = summary.layer_summary([("conv3", UNITS[:4]), ("conv4", UNITS), (AMP + " <x>$", [])], 0.04)
    assert [r["layer"] for r in rows] == ["conv3", "conv4", AMP + " <x>$"]
    r3, r4, empty = rows
    assert (r3["units"], r3["interpretable"], r3["unique_concepts"]) == (4, 4, 3)
    assert r3["unique_by_category"]["object"] == 2 and r3["interpretable_by_category"]["object"] == 3
    # conv4: door x2, <script>, sky x2 (objects: 3 concepts, 5 units); a&b, leg (parts: 2, 2); red (1, 1).
    assert (r4["units"], r4["interpretable"], r4["unique_concepts"]) == (11, 8, 6)
    assert r4["interpretable_by_category"] == {"object": 5, "part": 2, "material": 0, "texture": 0, "color": 1}
    assert r4["unique_by_category"] == {"object": 3, "part": 2, "material": 0, "texture": 0, "color": 1}
    assert (empty["units"], empty["interpretable"]) == (0, 0)
    paths = summary.write_summary(str(tmp_path), rows, title=NASTY)
    assert json.load(open(paths["json"]))["layers"][1]["unique_concepts"] == 6
    table = list(csv.DictReader(open(paths["csv"])))
    assert [t["layer"] for t in table] == [r["layer"] for r in rows]
    assert table[1]["interpretable_object"] == "5" and table[1]["unique_part"] == "2"
    md = open(paths["md"]).read().splitlines()
    assert len(md) == 2 + len(rows) and md[3].startswith("| conv4 | 11 | 8 | 6 |")
    root = ET.parse(paths["svg"]).getroot()
    assert root.tag == f"{SVG}svg"


def test_a_unit_with_iou_0_shows_no_concept(tmp_path):
    """Item 5 of issue 23: IoU 0 means the unit overlaps no concept, so the page names none."""
    units = [dict(unit=0, label="door", cat="object", iou=0.0), dict(unit=1, label="sky", cat="object", iou=0.2)]
    page = html.render_run_report("r", [dict(name="conv4", units=units)], str(tmp_path))
    got = json.loads(_embedded(page))["layers"][0]["units"]
    assert [u["label"] for u in got] == ["", "sky"]
    assert '"(no concept)"' in page    # what the table shows in its label cell
