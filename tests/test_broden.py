"""Broden reader on a small Broden-format folder written here with planted labels.

The expected label maps are the arrays the test planted (encoded as R + 256 G
PNGs), so a wrong decoding, channel layout, split filter or resampling fails.
"""

import os
import shutil

import numpy as np
import pytest

from helpers import BRODEN_CATS as CATS
from helpers import BRODEN_SEG as S
from helpers import write_broden
from jaxdissect.data import broden as B



@pytest.fixture(scope="module")
def broden(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("broden"))
    return root, write_broden(root)


def _expected(planted, n, channels):
    maps = planted[n][1]
    return np.stack([maps.get(ck, np.zeros((S, S), np.int32)) for ck in channels])


def test_reader_layout_and_values(broden):
    root, planted = broden
    src = B.BrodenSource(root, split="val")
    assert len(src) == 3
    assert src.seg_channels == [("color", 0), ("object", 0), ("object", 1), ("part", 0),
                                ("material", 0)]
    assert src.label_slots == [("scene", 0), ("scene", 1), ("texture", 0)]
    assert src.label_names[300] == "big" and src.label_names[9] == "a<b & c"
    assert src.label_names[0] == "-" and src.label_names[10] == ""
    assert src.label_categories[3] == "object" and src.label_categories[301] == "part"
    assert src.label_categories[7] == "scene"
    assert src.categories == CATS
    batch = src.get_batch([0, 1, 2])
    val_rows = [0, 2, 3]
    assert batch["seg"].dtype == np.int32 and batch["seg"].shape == (3, 5, S, S)
    for j, n in enumerate(val_rows):
        np.testing.assert_array_equal(batch["seg"][j], _expected(planted, n, src.seg_channels))
        np.testing.assert_array_equal(batch["display"][j], planted[n][0])
    np.testing.assert_array_equal(batch["image_labels"], [[7, 0, 8], [0, 0, 8], [7, 7, 0]])
    zc = np.stack([planted[n][0] for n in val_rows]).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(batch["image"], zc, rtol=1e-6)
    assert batch["valid"].all()
    assert src.fingerprint()["count"] == 3
    # Nearest resampling to a finer grid repeats each label pixel.
    fine = B.BrodenSource(root, split="train", resolution=2 * S,
                          preprocess=B.imagenet_normalize).get_batch([0])
    exp = _expected(planted, 1, src.seg_channels).repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(fine["seg"][0], exp)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    np.testing.assert_allclose(fine["image"][0], (planted[1][0] / 255.0 - mean) / std, rtol=1e-5)
    # A subset of categories, images resized.
    sub = B.BrodenSource(root, split="val", categories=["object", "scene"], image_size=8)
    assert sub.seg_channels == [("object", 0), ("object", 1)] and sub.label_slots == [("scene", 0),
                                                                                     ("scene", 1)]
    small = sub.get_batch([0])
    assert small["display"].shape == (1, 8, 8, 3) and small["seg"].shape == (1, 2, S, S)
    np.testing.assert_array_equal(small["seg"][0], _expected(planted, 0, sub.seg_channels))
    with pytest.raises(B.BrodenError, match="not in"):
        B.BrodenSource(root, categories=["shape"])


def test_bad_files(broden, tmp_path):
    root, _ = broden
    bad = str(tmp_path / "bad")
    shutil.copytree(root, bad)
    with open(os.path.join(bad, "images", "sub", "im2_object0.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")
    os.remove(os.path.join(bad, "images", "sub", "im3.png"))
    src = B.BrodenSource(bad, split="val")
    with pytest.raises(B.BrodenError, match="im2_object0.png.*damaged"):
        src.get_batch([1])
    with pytest.raises(B.BrodenError, match="im3.png is missing"):
        src.get_batch([2])
    skipping = B.BrodenSource(bad, split="val", on_error="skip")
    batch = skipping.get_batch([0, 1, 2])
    assert batch["valid"].tolist() == [True, False, False]
    assert sorted(skipping.bad_files) == [1, 2]
    assert (batch["seg"][1:] == 0).all()
    os.remove(os.path.join(bad, "label.csv"))
    with pytest.raises(B.BrodenError, match="label.csv is missing"):
        B.BrodenSource(bad)
    with pytest.raises(B.BrodenError, match="does not exist"):
        B.BrodenSource(str(tmp_path / "nowhere"))
    with pytest.raises(B.BrodenError, match="split 'test'"):
        B.BrodenSource(root, split="test")


def test_tfds_round_trip(broden, tmp_path):
    import tensorflow_datasets as tfds

    root, planted = broden
    builder = B.broden_builder(str(tmp_path / "tfds"))
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=root))
    back = B.BrodenTFDSSource(str(tmp_path / "tfds"), split="val")
    direct = B.BrodenSource(root, split="val")
    assert len(back) == 3
    assert back.label_names == direct.label_names
    assert back.label_categories == direct.label_categories
    a, b = back.get_batch([0, 1, 2]), direct.get_batch([0, 1, 2])
    for key in ("image", "display", "seg", "image_labels"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert len(B.BrodenTFDSSource(str(tmp_path / "tfds"), split="train")) == 1
    import sys
    assert "tensorflow" not in sys.modules
