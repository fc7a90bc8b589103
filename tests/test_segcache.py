"""The on-disk segmentation cache: the segmenter runs once per image per dataset, results never change.

A counting segmenter (host-side count of the images handed to the jitted
segmenter) over a dissection of N planted scenes; the labels on disk are
compared with a NumPy reference segmentation of the same images.
"""

import errno
import functools
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SIZE, Planted, PlantedScenes

import jaxdissect.labellers as labellers
import jaxdissect.pipelines.dissect as pipeline
import jaxdissect.segmentation
from jaxdissect.segmentation import cache as segcache
from jaxdissect.pipelines.dissect import dissect

N, BATCH = 24, 8
NAMES = ["-", "a", "b", "c", "top-left", "top-right", "bottom-left", "bottom-right"]
CATS = ["-", "object", "object", "material", "part", "part", "part", "part"]


class ToySegmenter:
    """Channel 0: the strongest of the first three colour channels (label 1..3) where one is lit; channel 1: quadrant."""

    label_names = tuple(NAMES)
    categories = ("object", "material", "part")


def _toy_segment(segmenter, variables, images, downsample=4):
    images = jnp.asarray(images)
    n, h, w, _ = images.shape
    centre = images[:, downsample // 2::downsample, downsample // 2::downsample, :3]
    lit = centre.max(-1) > -0.9
    colour = jnp.where(lit, jnp.argmax(centre, -1) + 1, 0)
    s, t = h // downsample, w // downsample
    quad = 4 + (jnp.arange(s)[:, None] >= s // 2) * 2 + (jnp.arange(t)[None, :] >= t // 2)
    quad = jnp.broadcast_to(quad, (n, s, t))
    return jnp.stack([colour, quad], 1).astype(jnp.int32) + variables.get("shift", 0), NAMES, CATS


def _reference_labels(data, indices):
    """NumPy segmentation of the display images (independent of the pipeline and of the cache)."""
    display = data.get_batch(indices)["display"].astype(np.float32) / 127.5 - 1.0
    centre = display[:, 2::4, 2::4, :3]
    colour = np.where(centre.max(-1) > -0.9, centre.argmax(-1) + 1, 0)
    s = SIZE // 4
    quad = 4 + (np.arange(s)[:, None] >= s // 2) * 2 + (np.arange(s)[None, :] >= s // 2)
    return np.stack([colour, np.broadcast_to(quad, colour.shape)], 1)


class Tiny(nn.Module):
    """Another model of the same input: 3x3 convs, ReLU, 4x4 pooling; layers ``det`` and ``mix`` shaped as Planted's."""

    @nn.compact
    def __call__(self, x):
        det = Block(name="det")(x)
        mix = Block(name="mix")(det)
        return nn.Dense(3)(mix.mean((1, 2)))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Conv(5, (3, 3))(x))
        return nn.avg_pool(y, (4, 4), strides=(4, 4)) if y.shape[1] == SIZE else y


def _variables(module, seed):
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 5)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def models():
    return {"planted": (Planted(), _variables(Planted(), 0), ["det", "mix"]),
            "tiny": (Tiny(), _variables(Tiny(), 1), ["det", "mix"])}


@pytest.fixture
def counter(monkeypatch):
    """Images handed to the segmenter, counted on the host; ``fail_after``: raise after that many batches."""
    monkeypatch.setattr(jaxdissect.segmentation, "segment", _toy_segment)
    state = {"images": 0, "batches": 0, "fail_after": None}

    @functools.cache
    def jitted(seg):
        return jax.jit(lambda v, x: _toy_segment(seg, v, x)[0])

    def segmenter_fn(seg):
        def run(variables, images):
            if state["fail_after"] is not None and state["batches"] >= state["fail_after"]:
                raise RuntimeError("killed")
            state["images"] += int(images.shape[0])
            state["batches"] += 1
            return jitted(seg)(variables, images)
        return run

    monkeypatch.setattr(labellers, "_segmenter_fn", segmenter_fn)
    return state


SEG = (ToySegmenter(), {})
KEYS = ("thresholds", "iou", "label", "intersection", "active", "label_pixels", "top_index", "act_mean")


def _run(models, name, data, cache, **kw):
    module, variables, layers = models[name]
    return dissect(module, variables, layers, data, SEG, quantile=0.2, topk=5, batch_size=BATCH,
                   segmentation_cache=None if cache is None else str(cache), **kw)


def _same(a, b):
    assert set(a) == set(b)
    for n in a:
        for k in KEYS:
            assert np.asarray(getattr(a[n], k)).tobytes() == np.asarray(getattr(b[n], k)).tobytes(), (n, k)


def _entries(root):
    base = os.path.join(root, "segmentation")
    return [os.path.join(base, d) for d in sorted(os.listdir(base))] if os.path.isdir(base) else []


def _chunks(entry):
    """``{(start, stop): array}`` of the complete chunk files of an entry."""
    out = {}
    for name in os.listdir(entry):
        if name.startswith("labels-") and name.endswith(".npy"):
            start, stop = (int(v) for v in name[len("labels-"):-len(".npy")].split("-"))
            out[(start, stop)] = np.load(os.path.join(entry, name))
    return out


@pytest.fixture(scope="module")
def uncached(models):
    """Both models dissected without any cache (the segmenter's own path)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(jaxdissect.segmentation, "segment", _toy_segment)
    try:
        return {name: _run(models, name, PlantedScenes(N), None) for name in models}
    finally:
        mp.undo()


@pytest.mark.parametrize("budget", [1024, 0])
def test_second_dissection_of_another_model_segments_nothing(models, uncached, counter, tmp_path, caplog, budget):
    """N images segmented the first time, 0 for another model on the same data; results unchanged.

    ``budget`` is the activation cache: 1024 segments in pass 1 (kept for pass 3),
    0 recomputes and segments in pass 3.
    """
    with caplog.at_level(logging.INFO):
        first = _run(models, "planted", PlantedScenes(N), tmp_path, activation_cache_mb=budget)
    assert counter["images"] == N
    assert f"segmenter: {N} images segmented, 0 read from the segmentation cache" in caplog.text
    assert f"segmentation cache: {tmp_path}" in caplog.text
    _same(first, uncached["planted"])
    (entry,) = _entries(tmp_path)
    chunks = _chunks(entry)
    covered = sorted(i for start, stop in chunks for i in range(start, stop))
    assert covered == list(range(N))
    for (start, stop), labels in chunks.items():
        assert labels.dtype == np.uint8 and labels.shape == (stop - start, 2, SIZE // 4, SIZE // 4)
        np.testing.assert_array_equal(labels, _reference_labels(PlantedScenes(N), list(range(start, stop))))
    with open(os.path.join(entry, "entry.json")) as f:
        stored = json.load(f)
    assert stored["key"]["format"] == segcache.FORMAT and stored["tables"]["label_names"] == NAMES
    assert stored["key"]["data"] == PlantedScenes(N).fingerprint()

    caplog.clear()
    counter["images"] = 0
    with caplog.at_level(logging.INFO):
        second = _run(models, "tiny", PlantedScenes(N), tmp_path, activation_cache_mb=budget)
    assert counter["images"] == 0
    assert f"segmenter: 0 images segmented, {N} read from the segmentation cache" in caplog.text
    _same(second, uncached["tiny"])


def test_kill_midway_leaves_no_partial_chunk_and_rerun_is_identical(models, uncached, counter, tmp_path, caplog):
    counter["fail_after"] = 2
    with pytest.raises(RuntimeError, match="killed"):
        _run(models, "planted", PlantedScenes(N), tmp_path)
    (entry,) = _entries(tmp_path)
    chunks = _chunks(entry)
    covered = sorted(i for start, stop in chunks for i in range(start, stop))
    assert covered == list(range(2 * BATCH))  # the two finished batches, nothing of the third
    for (start, stop), labels in chunks.items():
        np.testing.assert_array_equal(labels, _reference_labels(PlantedScenes(N), list(range(start, stop))))
    # What a writer killed mid-file leaves: a temporary file (never listed) and, worse, a truncated chunk.
    with open(os.path.join(entry, "labels-0-16.npy"), "rb") as f:
        good = f.read()
    with open(os.path.join(entry, ".labels-16-24.npy.999-dead.tmp"), "wb") as f:
        f.write(good[:300])
    with open(os.path.join(entry, "labels-16-24.npy"), "wb") as f:
        f.write(good[:300])
    counter.update(fail_after=None, images=0)
    with caplog.at_level(logging.INFO):
        again = _run(models, "planted", PlantedScenes(N), tmp_path)
    assert counter["images"] == BATCH  # only the batch that was not finished
    assert os.path.exists(os.path.join(entry, ".labels-16-24.npy.999-dead.tmp"))  # young: maybe a live writer's
    old = os.path.getmtime(os.path.join(entry, "entry.json")) - 7200
    os.utime(os.path.join(entry, ".labels-16-24.npy.999-dead.tmp"), (old, old))
    with open(os.path.join(entry, "entry.json")) as f:
        meta = json.load(f)
    segcache.open_cache(str(tmp_path), meta["key"], meta["tables"], 2, (8, 8), log=print)
    assert not os.path.exists(os.path.join(entry, ".labels-16-24.npy.999-dead.tmp"))  # an old one is removed
    assert "labels-16-24.npy is unreadable" in caplog.text and "not used" in caplog.text
    _same(again, uncached["planted"])
    np.testing.assert_array_equal(np.load(os.path.join(entry, "labels-16-24.npy")),
                                  _reference_labels(PlantedScenes(N), list(range(16, 24))))


def test_entry_of_another_format_or_segmenter_is_not_used(models, uncached, counter, tmp_path, caplog):
    _run(models, "planted", PlantedScenes(N), tmp_path)
    (entry,) = _entries(tmp_path)
    # Another segmenter (other variables) on the same data: a new entry, the old one named in the log.
    counter["images"] = 0
    with caplog.at_level(logging.INFO):
        other = dissect(*models["planted"][:2], models["planted"][2], PlantedScenes(N), (ToySegmenter(), {"shift": 0}),
                        quantile=0.2, topk=5, batch_size=BATCH, segmentation_cache=str(tmp_path))
    assert counter["images"] == N
    assert f"entry {entry} holds labels of the same data from another segmenter" in caplog.text
    _same(other, uncached["planted"])
    assert len(_entries(tmp_path)) == 2
    # Another version of the data (same source, other fingerprint): its entry is named, not used.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _run(models, "planted", PlantedScenes(N + 8), tmp_path)
    assert f"entry {entry} holds labels of another version of this data (n changed): not used" in caplog.text
    # An entry of another format version next to this run's: named in the log, not used.
    old = os.path.join(os.path.dirname(entry), "0123456789abcdef")
    os.makedirs(old)
    with open(os.path.join(entry, "entry.json")) as f:
        meta = json.load(f)
    meta["key"]["format"] = 0
    with open(os.path.join(old, "entry.json"), "w") as f:
        json.dump(meta, f)
    caplog.clear()
    counter["images"] = 0
    with caplog.at_level(logging.INFO):
        _run(models, "planted", PlantedScenes(N), tmp_path)
    assert counter["images"] == 0
    assert f"entry {old} was written by format 0, this is format {segcache.FORMAT}: not used" in caplog.text
    # This run's own entry rewritten by another format: not used, the log says so, results unchanged.
    with open(os.path.join(entry, "entry.json"), "w") as f:
        json.dump(meta, f)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = _run(models, "planted", PlantedScenes(N), tmp_path)
    assert counter["images"] == N
    assert f"entry {entry} was written by format 0, this is format {segcache.FORMAT}: not used" in caplog.text
    _same(again, uncached["planted"])


def _faulty_save(error):
    def save(f, data):
        f.write(b"\x93NUMPY partial")
        raise error
    return save


@pytest.mark.parametrize("fault", ["enospc", "permission", "not_a_directory", "chmod"])
def test_write_faults_fall_back_to_computing(models, uncached, counter, tmp_path, caplog, monkeypatch, fault):
    root = tmp_path / "cache"
    if fault == "enospc":
        monkeypatch.setattr(segcache, "_save", _faulty_save(OSError(errno.ENOSPC, "No space left on device")))
    elif fault == "permission":
        monkeypatch.setattr(segcache, "_save", _faulty_save(PermissionError(errno.EACCES, "Permission denied")))
    elif fault == "not_a_directory":
        root.write_text("a file where the cache directory should be")
    else:
        if os.geteuid() == 0:
            pytest.skip("running as root: chmod does not stop writing (the 'permission' case simulates it)")
        root.mkdir(mode=0o500)
    with caplog.at_level(logging.INFO):
        results = _run(models, "planted", PlantedScenes(N), root)
    assert counter["images"] == N
    _same(results, uncached["planted"])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "segmentation cache" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    if fault in ("enospc", "permission"):
        assert ("No space left" if fault == "enospc" else "Permission denied") in warnings[0].getMessage()
        (entry,) = _entries(root)
        assert os.listdir(entry) == ["entry.json"]  # no chunk, no temporary file left


def test_size_budget_stops_writing(models, uncached, counter, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        results = _run(models, "planted", PlantedScenes(N), tmp_path, segmentation_cache_mb=0.0001)
    assert "the size budget of 0 MiB is reached" in caplog.text
    _same(results, uncached["planted"])
    (entry,) = _entries(tmp_path)
    assert not _chunks(entry)


class HoleyScenes(PlantedScenes):
    """PlantedScenes whose item ``hole`` cannot be read (valid False, zero pixels) when ``hole`` is set."""

    def __init__(self, n, hole=None):
        super().__init__(n)
        self.hole = hole

    def get_batch(self, indices):
        batch = super().get_batch(indices)
        bad = np.asarray(indices) == self.hole
        batch["valid"] = ~bad
        for k in ("image", "display", "seg"):
            batch[k][bad] = 0
        return batch


def test_unreadable_items_are_not_stored(models, counter, tmp_path):
    _run(models, "planted", HoleyScenes(N, hole=3), tmp_path)
    assert counter["images"] == N
    (entry,) = _entries(tmp_path)
    chunks = _chunks(entry)
    covered = sorted(i for start, stop in chunks for i in range(start, stop))
    assert covered == [i for i in range(N) if i != 3]
    # The item reads again (same fingerprint): only its batch is segmented, and it is stored.
    counter["images"] = 0
    _run(models, "planted", HoleyScenes(N), tmp_path)
    assert counter["images"] == BATCH
    cache = segcache.SegmentationCache(entry, {}, {"label_names": NAMES}, 2, (8, 8), max_bytes=None, used_bytes=0,
                                       writable=False, log=print)
    np.testing.assert_array_equal(cache.lookup(np.arange(N)), _reference_labels(PlantedScenes(N), list(range(N))))


def test_cache_lookup_store_and_chunks(tmp_path):
    """The entry API on its own: buffered runs, chunk boundaries, overlaps, uint16 tables, tables checked."""
    names = [f"l{i}" for i in range(300)]
    tables = {"label_names": names, "label_categories": ["c"] * 300, "categories": ["c"]}
    key = {"data": {"kind": "x"}, "segmenter": "s"}
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 300, (40, 3, 4, 4))
    cache = segcache.open_cache(str(tmp_path), key, tables, 3, (4, 4), log=lambda m: None)
    assert cache.lookup([0]) is None
    cache.store(np.arange(0, 10), labels[0:10])
    cache.store(np.arange(10, 12), labels[10:12])
    np.testing.assert_array_equal(cache.lookup([11, 0]), labels[[11, 0]])  # before any file is written
    cache.store(np.array([20, 21, 25]), labels[[20, 21, 25]])  # a gap: two runs
    cache.flush()
    names_on_disk = sorted(n for n in os.listdir(cache.directory) if n.endswith(".npy"))
    assert names_on_disk == ["labels-0-12.npy", "labels-20-22.npy", "labels-25-26.npy"]
    assert np.load(os.path.join(cache.directory, "labels-0-12.npy")).dtype == np.uint16
    again = segcache.open_cache(str(tmp_path), key, tables, 3, (4, 4), log=lambda m: None)
    np.testing.assert_array_equal(again.lookup([25, 0, 21, 5]), labels[[25, 0, 21, 5]])
    assert again.lookup([0, 12]) is None
    again.store(np.arange(5, 15), labels[5:15])  # overlaps a chunk
    again.flush()
    np.testing.assert_array_equal(again.lookup(np.arange(15)), labels[:15])
    with pytest.raises(ValueError, match="3 indices for 2"):
        again.store([1, 2, 3], labels[:2])
    # Other label tables under the same key: not used (and nothing written to the entry).
    other = dict(tables, label_names=names[:-1] + ["renamed"])
    assert segcache.open_cache(str(tmp_path), key, other, 3, (4, 4), log=lambda m: None) is None
    assert segcache.label_dtype(256) == np.uint8 and segcache.label_dtype(257) == np.uint16


@pytest.mark.slow
def test_launcher_uses_the_per_user_cache(counter, tmp_path, monkeypatch, caplog):
    """``launch.dissect``: a second run (other layers) on the same data reads the labels; 0 MiB turns it off."""
    from helpers import numpy_init

    from jaxdissect.checkpoint import save_model
    from jaxdissect.models.small_cnn import SmallCNN
    from launch import common
    from launch import dissect as launcher

    module = SmallCNN(widths=(4, 4, 4, 4))
    model = str(tmp_path / "model")
    save_model(model, module, numpy_init(module, (1, 64, 64, 3)), metadata={"model": "tiny"})
    monkeypatch.setattr(launcher, "make_segmentation", lambda spec, **kw: (SEG, "toy"))
    base = dict(model=model, data="synthetic:8", segmenter="toy", layers="conv4", batch_size=4, topk=3, thumbsize=16,
                cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO):
        launcher.run(dict(base, output_dir=str(tmp_path / "a")))
        assert counter["images"] == 8
        launcher.run(dict(base, output_dir=str(tmp_path / "b"), thumbsize=12))
    assert counter["images"] == 8
    assert f"segmentation cache: {tmp_path / 'cache' / 'segmentation'}" in caplog.text
    assert "segmenter: 0 images segmented, 8 read from the segmentation cache" in caplog.text
    assert common.segmentation_cache(dict(base, segmentation_cache_mb=0)) == (None, None)
    assert common.segmentation_cache(base) == (str(tmp_path / "cache"), common.SEGMENTATION_CACHE_MB)
    with pytest.raises(launcher.LaunchError, match="segmentation_cache_mb=-1"):
        launcher.validate(dict(base, segmentation_cache_mb=-1))
    assert "segmentation_cache_mb" in launcher.ENVIRONMENT
    assert "segmentation_cache_mb" not in launcher.dissect_config(base).identity()


def test_compare_passes_the_cache_to_dissect(models, monkeypatch):
    from jaxdissect.pipelines.compare import Member, compare

    seen = {}

    class Stop(Exception):
        pass

    def fake(*args, **kw):
        seen.update(kw, config=args[5])
        raise Stop

    monkeypatch.setattr(pipeline, "Dissection", fake)
    module, variables, _ = models["planted"]
    with pytest.raises(Stop):
        compare([Member("a", module, variables, ["det"])], PlantedScenes(8), SEG, segmentation_cache="/somewhere",
                segmentation_cache_mb=5)
    assert seen["segmentation_cache"] == "/somewhere" and seen["config"].segmentation_cache_mb == 5


class Generator(nn.Module):
    """z -> 32x32 image, red cells where z > 1, green where z < -1; layers ``det``, ``mix`` shaped as Planted's."""

    @nn.compact
    def __call__(self, z):
        cells = z[:, :64].reshape(-1, 8, 8)
        det = Cells(name="det")(cells)
        Cells(name="mix")(det[..., 0] - det[..., 1])
        red = jnp.where(cells > 1, 1.0, -1.0)
        green = jnp.where(cells < -1, 1.0, -1.0)
        rgb = jnp.stack([red, green, -jnp.ones_like(red)], -1)
        return rgb.repeat(4, 1).repeat(4, 2)


class Cells(nn.Module):
    @nn.compact
    def __call__(self, c):
        return jnp.stack([nn.relu(c - 1), nn.relu(-c - 1), nn.relu(c), nn.relu(-c), nn.relu(c - 0.5)], -1)


def test_generator_outputs_are_cached_per_generator(counter, tmp_path):
    """A generator's outputs are what gets segmented: the entry is keyed on its variables too."""
    from jaxdissect.data.folders import LatentSource

    kw = dict(quantile=0.2, topk=5, batch_size=BATCH, segmentation_cache=str(tmp_path))
    first = dissect(Generator(), {}, ["det", "mix"], LatentSource(16), SEG, **kw)
    assert counter["images"] == 16
    again = dissect(Generator(), {}, ["det", "mix"], LatentSource(16), SEG, **kw)
    assert counter["images"] == 16
    _same(first, again)
    assert first["det"].label_iou[:2] == pytest.approx([1.0, 1.0])  # red and green cells found
    (entry,) = _entries(tmp_path)
    with open(os.path.join(entry, "entry.json")) as f:
        assert "generator" in json.load(f)["key"]
    # Other generator variables: maybe other outputs, so another entry (segmented again).
    dissect(Generator(), {"params": {"unused": np.ones(1, np.float32)}}, ["det", "mix"], LatentSource(16), SEG, **kw)
    assert counter["images"] == 32 and len(_entries(tmp_path)) == 2
