"""launch.edit_photo's inputs: stroke specs (boxes, mask PNGs) and photo loading."""

import numpy as np
import pytest
from PIL import Image

from jaxdissect.pipelines import edit_photo as P


def test_box_and_mask_strokes(tmp_path):
    s = P.parse_stroke("red:8,4,20,12", 32, erase=False, strength=4)
    expected = np.zeros((32, 32))
    expected[4:12, 8:20] = 1
    np.testing.assert_array_equal(s.mask, expected)
    assert (s.concept, s.erase, s.strength) == ("red", False, 4)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[2:5, 3:9, 3] = 255  # painted = non-transparent, as GANPaint's canvas
    Image.fromarray(rgba).save(tmp_path / "m.png")
    s = P.parse_stroke(f"tree:{tmp_path / 'm.png'}", 32, erase=True, strength=15)
    np.testing.assert_array_equal(s.mask, rgba[..., 3] / 255.0)
    assert s.erase


@pytest.mark.parametrize("spec,match", [("red", "expected concept:"), ("red:0,0,40,10", "0 <= x0 < x1 <= 32"),
                                        ("red:nofile.png", "neither a box")])
def test_bad_strokes(spec, match):
    with pytest.raises(P.PhotoEditError, match=match):
        P.parse_stroke(spec, 32, erase=False, strength=4)


def test_load_photo_resizes_and_centre_crops(tmp_path):
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # the centre square is white
    Image.fromarray(img).save(tmp_path / "p.png")
    x = P.load_photo(str(tmp_path / "p.png"), 32)
    assert x.shape == (1, 32, 32, 3)
    assert x[:, :, 2:-2].min() > 0.9 and x.max() <= 1.0  # bilinear edges aside
    with pytest.raises(P.PhotoEditError, match="does not exist"):
        P.load_photo(str(tmp_path / "missing.jpg"), 32)


def test_side_by_side_is_large_and_titled():
    """Item 5 of issue 23: the toy's 32-pixel panels are enlarged (whole factor, nearest) and titled."""
    rng = np.random.default_rng(0)
    panels = {t: rng.uniform(-1, 1, (32, 32, 3)).astype(np.float32) for t in ("input", "inversion", "adapted", "edit")}
    out = P.side_by_side(panels)
    scale = P.SIDE_BY_SIDE_PANEL // 32
    band = out.shape[0] - 32 * scale
    step = 32 * scale + 8                                  # a panel and an 8-pixel gap
    assert band > 8 and out.shape[1] == 4 * step - 8
    for i, img in enumerate(panels.values()):
        x = i * step
        np.testing.assert_array_equal(out[band:, x:x + 32 * scale],
                                      np.clip(np.floor((img + 1) * 127.5 + 0.5), 0, 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1))   # nearest enlargement
        title = out[:band, x:x + 32 * scale]
        assert (title < 100).any() and (title == 255).mean() > 0.5       # dark text on white above each panel
