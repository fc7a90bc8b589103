"""Data sources: Places folder order (spec 4.1), image folders with bad files, latents, the loader."""

import os
import random

import numpy as np
import pytest
from PIL import Image

from jaxdissect.data import loader
from jaxdissect.data.folders import DataSourceError, ImageFolder, LatentSource
from jaxdissect.data.places import Places365TFDS, PlacesFolder


def _write_image(path, seed, size=(40, 30)):
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _tiny_transform(image):
    """Independent of the model pipeline: 8x8 nearest resize; input = bytes / 255."""
    d = np.asarray(image.resize((8, 8), Image.NEAREST), np.uint8)
    return d.astype(np.float32) / 255.0, d


@pytest.fixture
def places_root(tmp_path):
    root = tmp_path / "places" / "val"
    names = {"ski_resort": ["b.jpg", "a.JPG", "c.png"], "bedroom": ["z.jpeg", "y.jpg"],
             "hangar-indoor": ["x.PNG", "w.jpg", "notes.txt"], "airfield": ["q.jpg"]}
    seed = 0
    for cls, files in names.items():
        (root / cls).mkdir(parents=True)
        for f in files:
            if f.endswith(".txt"):
                (root / cls / f).write_text("not an image")
            else:
                _write_image(root / cls / f, seed)
                seed += 1
    return root


def test_places_order_is_the_originals_shuffle(places_root):
    expected = []
    for cls in sorted(os.listdir(places_root)):
        for f in sorted(os.listdir(places_root / cls)):
            if f.lower().rsplit(".", 1)[-1] in ("jpg", "jpeg", "png"):
                expected.append((str(places_root / cls / f), cls))
    random.Random(True).shuffle(expected)
    ds = PlacesFolder(str(places_root), transform=_tiny_transform)
    assert ds.files == [p for p, _ in expected]
    assert ds.classes == ["airfield", "bedroom", "hangar-indoor", "ski_resort"]
    assert [ds.classes[c] for c in ds.class_indices] == [c for _, c in expected]
    batch = ds.get_batch([0, 3, 5])
    assert batch["label"].tolist() == [ds.classes.index(expected[i][1]) for i in (0, 3, 5)]
    ref = _tiny_transform(Image.open(expected[3][0]).convert("RGB"))[1]
    np.testing.assert_array_equal(batch["display"][1], ref)
    assert batch["valid"].all()


def test_places_index_file(places_root):
    index = places_root.parent / "val.txt"
    lines = ["val/bedroom/y.jpg", "val/airfield/q.jpg", "val/ski_resort/c.png"]
    index.write_text("\n".join(lines) + "\n")
    ds = PlacesFolder(str(places_root), transform=_tiny_transform, shuffle=False)
    assert ds.files == [str(places_root.parent / line) for line in sorted(lines)]
    assert ds.classes == ["airfield", "bedroom", "ski_resort"]


def test_image_folder_corrupt_file_skip_or_raise(tmp_path):
    for i in range(4):
        _write_image(tmp_path / f"img{i}.jpg", i)
    (tmp_path / "img2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    ds = ImageFolder(str(tmp_path), transform=_tiny_transform, on_error="skip")
    batch = ds.get_batch([0, 1, 2, 3])
    assert batch["valid"].tolist() == [True, True, False, True]
    assert list(ds.bad_files) == [2] and "img2.jpg" in ds.bad_files[2]
    assert not batch["display"][2].any()
    ds = ImageFolder(str(tmp_path), transform=_tiny_transform, on_error="raise")
    ds.get_batch([0, 1])
    with pytest.raises(DataSourceError, match=r"img2\.jpg.*on_bad_image=skip"):
        ds.get_batch([1, 2])


def test_image_folder_bad_folders(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        ImageFolder(str(tmp_path / "missing"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataSourceError, match="no .jpg/.jpeg/.png images"):
        ImageFolder(str(tmp_path / "empty"))
    (tmp_path / "file.jpg").write_text("x")
    with pytest.raises(DataSourceError, match="not a directory"):
        ImageFolder(str(tmp_path / "file.jpg"))
    with pytest.raises(ValueError, match="on_error"):
        ImageFolder(str(tmp_path), on_error="ignore")


def test_image_folder_fingerprint_changes_with_data(tmp_path):
    for i in range(3):
        _write_image(tmp_path / f"{i}.png", i)
    before = ImageFolder(str(tmp_path), transform=_tiny_transform).fingerprint()
    assert before == ImageFolder(str(tmp_path), transform=_tiny_transform).fingerprint()
    _write_image(tmp_path / "3.png", 3)
    assert ImageFolder(str(tmp_path), transform=_tiny_transform).fingerprint() != before


def test_default_transform_is_the_classifier_pipeline(tmp_path):
    pytest.importorskip("jaxdissect.preprocess")
    _write_image(tmp_path / "a.jpg", 0, size=(300, 200))
    batch = ImageFolder(str(tmp_path)).get_batch([0])
    pil = Image.open(tmp_path / "a.jpg").convert("RGB").resize((256, 256), Image.BILINEAR)
    crop = np.asarray(pil, np.uint8)[16:240, 16:240]
    np.testing.assert_array_equal(batch["display"][0], crop)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(batch["image"][0], (crop / 255.0 - mean) / std, atol=1e-5)


def test_latents_are_the_originals():
    pytest.importorskip("jaxdissect.data.latents")
    src = LatentSource(n=20, seed=1)
    ref = np.random.RandomState(1).standard_normal(20 * 512).reshape(20, 512).astype(np.float32)
    np.testing.assert_array_equal(src.get_batch([3, 19, 0])["z"], ref[[3, 19, 0]])
    assert len(src) == 20


def test_loader_order_padding_and_errors():
    class Source:
        def __len__(self):
            return 10

        def get_batch(self, idx):
            if 8 in idx and self.fail:
                raise RuntimeError("boom at 8")
            return {"x": np.asarray(idx, np.float32) * 2}

    src = Source()
    src.fail = False
    got = list(loader.batches(src, 4, start=1))
    assert len(got) == 2
    assert got[0]["index"].tolist() == [4, 5, 6, 7]
    assert got[1]["index"].tolist() == [8, 9, 0, 0]
    assert got[1]["valid"].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(got[1]["x"], [16, 18, 0, 0])
    assert [b["index"][0] for b in loader.batches(src, 3, num_items=7)] == [0, 3, 6]
    src.fail = True
    it = loader.batches(src, 4)
    assert next(it)["index"][0] == 0
    next(it)
    with pytest.raises(RuntimeError, match="boom at 8"):
        next(it)


def test_tfds_places_not_prepared_is_a_clear_error(tmp_path):
    with pytest.raises(DataSourceError, match="places365_small.*not prepared"):
        Places365TFDS(data_dir=str(tmp_path))


def test_batch_of_only_bad_images_keeps_the_image_size(tmp_path):
    _write_image(tmp_path / "a.jpg", 0)
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolder(str(tmp_path), transform=_tiny_transform, on_error="skip")
    batch = ds.get_batch([1])
    assert batch["image"].shape == (1, 8, 8, 3) and not batch["valid"].any()
