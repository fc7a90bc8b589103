"""Broden (the 2017 NetDissect dataset) as a data source, plus a TensorFlow-free TFDS builder.

A Broden folder holds

* ``index.csv``: one row per image: ``image`` (path under ``images/``), ``split``,
  ``ih, iw`` (image size), ``sh, sw`` (label size), then one column per
  category (``color, object, part, material, scene, texture``). A cell is a
  ``;``-separated list: label PNG paths (pixel labels) or integers (one label
  for the whole image);
* ``label.csv`` (``number, name, category, frequency, coverage, syns``; label
  numbers are global across categories, 0 = no label), ``category.csv``
  (``name, ...``) and ``c_<category>.csv`` (``code, number, name, frequency,
  coverage``);
* ``images/``: the images and the label PNGs. A label PNG stores the label
  number of each pixel as ``R + 256 * G`` (NetDissect's ``loadseg.py``).

Layout of what we serve (decided here; the original dissect code has no Broden
reader): a category is *pixel* if any of its cells names a PNG, else
*image-level*. Each pixel category gets as many channels as the most PNGs one
image has in it (several PNGs of a category, e.g. object masks from two source
datasets, fill consecutive channels instead of being merged, so overlapping
labels are kept, as NetDissect's ``full_segmentation_data`` stacks them); an
integer in a pixel category fills its channel. Unused channels are 0. So
``seg`` is int32 ``[N, K, S, S]`` with the same channel layout for every image
of the folder, and ``image_labels`` is int32 ``[N, J]`` with one slot per
possible integer label of the image-level categories (0 = none). Values are the
global label numbers of ``label.csv``; ``label_names[n]`` names number ``n``,
``label_categories[n]`` is its primary category (the category where it covers
most pixels, NetDissect's rule).

Label maps are served at the dataset's own label size (``sh x sw``, 112 for
broden1_224) or resampled to ``resolution`` with PyTorch-style nearest
neighbour (source index ``floor(dst * in / out)``), which never invents labels.

TensorFlow stays out: the TFDS builder yields file paths for the ``Image``
feature and zlib-encoded int32 tensors, is prepared with
``download_and_prepare(file_format='array_record')`` and read back with
``as_data_source()``; none of these import TensorFlow.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from jaxdissect.data.folders import DataSourceError
from jaxdissect.data.loader import ThreadedReader

_META = ("image", "split", "ih", "iw", "sh", "sw")
_INT_RE = re.compile(r"^-?\d+$")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

DOWNLOAD_INSTRUCTIONS = """\
Download broden1_224 (the NetDissect dataset, 1.2 GB) from the NetDissect site,
e.g. http://netdissect.csail.mit.edu/data/broden1_224.zip, unzip it, and pass
the folder that holds index.csv (e.g. .../broden1_224) as the manual directory:
  builder.download_and_prepare(file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir='/data/broden1_224'))
"""


FOLDER_HINT = ("Download broden1_224 (1.2 GB, e.g. http://netdissect.csail.mit.edu/data/broden1_224.zip), "
               "unzip it and give the folder that holds index.csv: --data=broden:/data/broden1_224 on the "
               "command line (BrodenSource('/data/broden1_224') in Python)")


class BrodenError(DataSourceError):
    """A Broden folder is incomplete or holds a file that cannot be read."""


def to_zc(display: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [-1, 1] (segmenter / generator convention)."""
    return display.astype(np.float32) / 127.5 - 1.0


def imagenet_normalize(display: np.ndarray) -> np.ndarray:
    """uint8 RGB -> ImageNet-normalised float32 (the classifiers' input convention, spec 1.2)."""
    return (display.astype(np.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD


def _read_csv(path: str, required: Sequence[str]) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        raise BrodenError(
            f"{path} is missing: this is not a complete Broden folder. {FOLDER_HINT}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BrodenError(f"cannot read {path}: {e}") from e
    missing = [c for c in required if c not in fields]
    if missing:
        raise BrodenError(f"{path} lacks columns {missing} (has {fields}); is it a Broden csv?")
    return rows


def _cells(value: str | None) -> list[int | str]:
    return [int(v) if _INT_RE.match(v) else v for v in (value or "").split(";") if v]


def decode_label_png(path: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Label numbers ``R + 256 * G`` of a Broden label PNG, int32 ``[h, w]``."""
    from PIL import Image

    if not os.path.isfile(path):
        raise BrodenError(f"label image {path} is missing; the Broden folder is incomplete "
                          "(unzip it again)")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "P"):
                raise BrodenError(f"label image {path} has mode {im.mode}; Broden label PNGs are "
                                  "RGB with the label number in R + 256 * G")
            rgb = np.asarray(im.convert("RGB"))
    except BrodenError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure means a damaged file
        raise BrodenError(f"cannot decode label image {path} ({type(e).__name__}: {e}); "
                          "the file is damaged: restore it from the Broden zip") from e
    labels = rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)
    if shape is not None and labels.shape != tuple(shape):
        raise BrodenError(f"label image {path} is {labels.shape[1]}x{labels.shape[0]}; index.csv "
                          f"says {shape[1]}x{shape[0]}")
    return labels


def nearest_resize(seg: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``[..., h, w]`` like PyTorch's ``mode='nearest'``."""
    h, w = seg.shape[-2:]
    if (h, w) == tuple(size):
        return seg
    rows = (np.arange(size[0]) * h) // size[0]
    cols = (np.arange(size[1]) * w) // size[1]
    return seg[..., rows[:, None], cols[None, :]]


class BrodenIndex:
    """The parsed csv files of a Broden folder: rows, channel layout, label names and categories."""

    def __init__(self, root: str, categories: Sequence[str] | None = None):
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(self.root):
            raise BrodenError(f"Broden folder {self.root} does not exist. {FOLDER_HINT}")
        index_rows = _read_csv(os.path.join(self.root, "index.csv"), _META)
        if not index_rows:
            raise BrodenError(f"{self.root}/index.csv lists no images")
        cat_rows = _read_csv(os.path.join(self.root, "category.csv"), ("name",))
        label_rows = _read_csv(os.path.join(self.root, "label.csv"), ("number", "name"))
        columns = [c for c in index_rows[0] if c not in _META]
        known = [r["name"] for r in cat_rows]
        self.categories = [c for c in known if c in columns]
        if categories is not None:
            unknown = [c for c in categories if c not in self.categories]
            if unknown:
                raise BrodenError(f"categories {unknown} are not in {self.root} "
                                  f"(it has {self.categories})")
            self.categories = [c for c in self.categories if c in categories]
        self.rows = []
        for n, r in enumerate(index_rows):
            try:
                row = {k: r[k] for k in ("image", "split")}
                row.update({k: int(r[k]) for k in ("ih", "iw", "sh", "sw")})
            except (TypeError, ValueError) as e:
                raise BrodenError(f"{self.root}/index.csv row {n + 2} has a bad size field: {e}") from e
            row.update({c: _cells(r.get(c)) for c in self.categories})
            self.rows.append(row)
        self.pixel_categories = [c for c in self.categories
                                 if any(isinstance(v, str) for r in self.rows for v in r[c])]
        self.image_categories = [c for c in self.categories if c not in self.pixel_categories]
        depth = {c: max(len(r[c]) for r in self.rows) for c in self.categories}
        # Channel layout: (category, layer) per seg channel / per image-label slot.
        self.seg_channels = [(c, k) for c in self.pixel_categories for k in range(max(depth[c], 1))]
        self.label_slots = [(c, k) for c in self.image_categories for k in range(depth[c])]

        numbers = {}
        for r in label_rows:
            try:
                numbers[int(r["number"])] = r["name"]
            except ValueError as e:
                raise BrodenError(f"{self.root}/label.csv has a bad label number: {e}") from e
        size = max(numbers, default=0) + 1
        self.label_names = [numbers.get(i, "") for i in range(size)]
        if not self.label_names[0]:
            self.label_names[0] = "-"
        coverage = np.zeros((len(self.categories), size))
        for ci, cat in enumerate(self.categories):
            for r in _read_csv(os.path.join(self.root, f"c_{cat}.csv"), ("number", "coverage")):
                try:
                    num, cov = int(r["number"]), float(r["coverage"])
                except ValueError as e:
                    raise BrodenError(f"{self.root}/c_{cat}.csv has a bad row {r}: {e}") from e
                if 0 < num < size:
                    coverage[ci, num] = cov
        # Primary category: most coverage; ties go to the later category, as NetDissect's max().
        best = (len(self.categories) - 1) - np.argmax(coverage[::-1], axis=0)
        self.label_categories = [self.categories[b] if b >= 0 and coverage[b, i] > 0 else
                                 (self.categories[0] if i == 0 else "") for i, b in enumerate(best)]

    def fingerprint(self) -> dict:
        path = os.path.join(self.root, "index.csv")
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        return {"root": self.root, "index_sha256": digest, "categories": self.categories,
                "seg_channels": len(self.seg_channels), "label_slots": len(self.label_slots)}

    def labels_of(self, row: dict, resolution: tuple[int, int] | None = None):
        """``(seg int32 [K, S, S], image_labels int32 [J])`` of one index row."""
        shape = (row["sh"], row["sw"])
        seg = np.zeros((len(self.seg_channels),) + shape, np.int32)
        for ch, (cat, k) in enumerate(self.seg_channels):
            if k < len(row[cat]):
                cell = row[cat][k]
                if isinstance(cell, int):
                    seg[ch] = cell
                else:
                    seg[ch] = decode_label_png(os.path.join(self.root, "images", cell), shape)
        image_labels = np.array([row[c][k] if k < len(row[c]) else 0 for c, k in self.label_slots],
                                np.int32)
        if resolution is not None:
            seg = nearest_resize(seg, resolution)
        return seg, image_labels


def _read_image(path: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    if not os.path.isfile(path):
        raise BrodenError(f"image {path} is missing; the Broden folder is incomplete (unzip it again)")
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, np.uint8)
    except Exception as e:  # noqa: BLE001
        raise BrodenError(f"cannot decode image {path} ({type(e).__name__}: {e}); the file is "
                          "damaged: restore it from the Broden zip") from e


def _size2(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


class BrodenSource:
    """Broden images with their label maps, following the data-source contract of ``jaxdissect.data``.

    Args:
      root: the Broden folder (holding ``index.csv``).
      split: ``'train'``, ``'val'`` or ``None`` (every row).
      resolution: label-map size ``S`` (int or ``(h, w)``); default the dataset's own.
      preprocess: uint8 ``[B, H, W, 3]`` -> float32 model input (default :func:`to_zc`;
        :func:`imagenet_normalize` for the classifiers).
      image_size: resize images (Pillow bilinear) to this size; default the stored size.
      categories: restrict to these categories (default all of ``category.csv``).
      on_error: ``'raise'`` (stop, naming the file) or ``'skip'`` (serve the item as
        ``valid=False`` with zero labels and record it in ``bad_files``).
      num_threads: decoding threads per batch (Pillow releases the GIL while decoding).
    """

    def __init__(self, root: str, split: str | None = "val", *, resolution=None,
                 preprocess: Callable[[np.ndarray], np.ndarray] = to_zc, image_size=None,
                 categories: Sequence[str] | None = None, on_error: str = "raise",
                 num_threads: int | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.index = BrodenIndex(root, categories)
        self.root = self.index.root
        self.split = split
        self.rows = [r for r in self.index.rows if split is None or r["split"] == split]
        if not self.rows:
            splits = sorted({r["split"] for r in self.index.rows})
            raise BrodenError(f"{self.root}/index.csv has no rows of split {split!r} (it has {splits})")
        self.resolution = _size2(resolution)
        self.image_size = _size2(image_size)
        self.preprocess = preprocess
        self.on_error = on_error
        self.bad_files: dict[int, str] = {}
        self._reader = ThreadedReader(self._load, "Broden images", num_threads)
        self.name = f"broden:{os.path.basename(self.root)}:{split or 'all'}"
        self.label_names = list(self.index.label_names)
        self.label_categories = list(self.index.label_categories)
        self.categories = list(self.index.categories)
        self.seg_channels = list(self.index.seg_channels)
        self.label_slots = list(self.index.label_slots)

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, i: int):
        row = self.rows[i]
        path = os.path.join(self.root, "images", row["image"])
        size = self.image_size or (row["ih"], row["iw"])
        try:
            image = _read_image(path, size)
            seg, image_labels = self.index.labels_of(row, self.resolution)
        except BrodenError as e:
            if self.on_error == "raise":
                raise BrodenError(f"{e} (item {i} of split {self.split!r}; pass --on_bad_image=skip "
                                  "(on_error='skip' in the API) to leave it out and count it)") from e
            self.bad_files[i] = str(e)
            return None
        return image, seg, image_labels

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        indices, loaded = self._reader.read(indices, len(self))
        good = [x for x in loaded if x is not None]
        first = self.rows[indices[0]] if indices else None
        img_shape = good[0][0].shape if good else (self.image_size or (first["ih"], first["iw"])) + (3,)
        seg_shape = good[0][1].shape if good else (
            (len(self.seg_channels),) + (self.resolution or (first["sh"], first["sw"])))
        display = np.zeros((len(indices),) + tuple(img_shape), np.uint8)
        seg = np.zeros((len(indices),) + tuple(seg_shape), np.int32)
        image_labels = np.zeros((len(indices), len(self.label_slots)), np.int32)
        valid = np.zeros(len(indices), bool)
        for j, item in enumerate(loaded):
            if item is None:
                continue
            if item[0].shape != img_shape or item[1].shape != seg_shape:
                raise BrodenError(
                    f"item {indices[j]} ({self.rows[indices[j]]['image']}) has image {item[0].shape} "
                    f"and labels {item[1].shape}, others in the batch {img_shape} and {seg_shape}; "
                    "pass image_size= and resolution= to serve one size")
            display[j], seg[j], image_labels[j], valid[j] = item[0], item[1], item[2], True
        image = np.asarray(self.preprocess(display), np.float32)
        return {"image": image, "display": display, "seg": seg, "image_labels": image_labels,
                "valid": valid}

    def fingerprint(self) -> dict:
        first, last = self.rows[0]["image"], self.rows[-1]["image"]
        return {"kind": "BrodenSource", **self.index.fingerprint(), "split": self.split,
                "count": len(self), "first": first, "last": last,
                "resolution": self.resolution, "image_size": self.image_size}


# --------------------------------------------------------------------------- TFDS


@functools.lru_cache(maxsize=None)
def _tfds_builder_class():
    """The builder class, defined on first use (tfds registers a name once per process)."""
    import tensorflow_datasets as tfds

    class Broden(tfds.core.GeneratorBasedBuilder):
        __doc__ = ("Broden (NetDissect 2017) images, label maps [K, sh, sw] and image-level "
                   "labels; reads a local manual_dir.\n\n" + DOWNLOAD_INSTRUCTIONS)

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Label maps as global Broden label numbers, R + 256 G."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = DOWNLOAD_INSTRUCTIONS
        # No checksums or config files live next to this code; without this, tfds looks them up
        # through importlib_resources, which tensorflow-datasets does not install.
        code_path = None

        def _info(self):
            features = tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "seg": tfds.features.Tensor(shape=(None, None, None), dtype=np.int32,
                                            encoding="zlib"),
                "image_labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "file": tfds.features.Text(),
            })
            return tfds.core.DatasetInfo(
                builder=self, description="Broden: the NetDissect concept dataset.",
                features=features, metadata=tfds.core.MetadataDict(), disable_shuffling=True,
                homepage="http://netdissect.csail.mit.edu/")

        def _split_generators(self, dl_manager):
            index = BrodenIndex(os.fspath(dl_manager.manual_dir))
            self.info.metadata.update({
                "label_names": index.label_names, "label_categories": index.label_categories,
                "categories": index.categories,
                "seg_channels": [list(c) for c in index.seg_channels],
                "label_slots": [list(c) for c in index.label_slots],
                "source": index.fingerprint()})
            splits = sorted({r["split"] for r in index.rows})
            return {s: self._generate_examples(index, s) for s in splits}

        def _generate_examples(self, index, split):
            for n, row in enumerate(index.rows):
                if row["split"] != split:
                    continue
                path = os.path.join(index.root, "images", row["image"])
                _read_image(path, None)  # decode once: a damaged file stops here, named
                seg, image_labels = index.labels_of(row)
                yield n, {"image": path, "seg": seg, "image_labels": image_labels,
                          "file": row["image"]}

    return Broden


def broden_builder(data_dir: str):
    """The TFDS builder class ``Broden`` instantiated on ``data_dir`` (where prepared data lives).

    Prepare once: ``broden_builder(d).download_and_prepare(file_format='array_record',
    download_config=tfds.download.DownloadConfig(manual_dir=BRODEN_FOLDER))``.
    """
    return _tfds_builder_class()(data_dir=data_dir)


class BrodenTFDSSource:
    """A prepared TFDS Broden split, read through ``as_data_source()`` (no TensorFlow), same contract."""

    def __init__(self, data_dir: str, split: str = "val", *,
                 preprocess: Callable[[np.ndarray], np.ndarray] = to_zc, resolution=None):
        builder = broden_builder(data_dir)
        try:
            sources = builder.as_data_source()
        except Exception as e:  # noqa: BLE001 - tfds raises several types for unprepared data
            raise BrodenError(f"no prepared Broden data in {data_dir} ({type(e).__name__}: {e}); "
                              "prepare it first with broden_builder(...).download_and_prepare") from e
        if split not in sources:
            raise BrodenError(f"prepared Broden data in {data_dir} has splits {sorted(sources)}, "
                              f"not {split!r}")
        self._data = sources[split]
        meta = builder.info.metadata
        self.label_names = list(meta["label_names"])
        self.label_categories = list(meta["label_categories"])
        self.categories = list(meta["categories"])
        self._source = dict(meta["source"])
        self.preprocess = preprocess
        self.resolution = _size2(resolution)
        self.split = split
        self.data_dir = os.path.abspath(data_dir)
        self.name = f"broden-tfds:{split}"

    def __len__(self) -> int:
        return len(self._data)

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        items = [self._data[int(i)] for i in indices]
        display = np.stack([x["image"] for x in items]).astype(np.uint8)
        seg = np.stack([x["seg"] for x in items]).astype(np.int32)
        if self.resolution is not None:
            seg = nearest_resize(seg, self.resolution)
        return {"image": np.asarray(self.preprocess(display), np.float32), "display": display,
                "seg": seg, "image_labels": np.stack([x["image_labels"] for x in items]),
                "valid": np.ones(len(items), bool)}

    def fingerprint(self) -> dict:
        return {"kind": "BrodenTFDSSource", "data_dir": self.data_dir, "split": self.split,
                "count": len(self), "source": self._source, "resolution": self.resolution}
