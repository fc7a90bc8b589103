"""Image folders as data sources (the contract is in ``jaxdissect.pipelines.dissect``).

``ImageFolder(root)`` serves every ``.jpg/.jpeg/.png`` file under ``root`` (any
case, sorted walk, so index ``i`` always names the same file) preprocessed for a
classifier (the original's pipeline, spec 1.2: RGB, Pillow bilinear resize to
256x256, centre crop, ImageNet normalisation). ``LatentSource`` serves the
standard z vectors of a generator.

A file that cannot be decoded either stops the run with an error naming it
(``on_error='raise'``, the default) or is served with ``valid=False`` and
remembered in ``bad_files`` (``on_error='skip'``) so the pipeline leaves it out
of every statistic and reports how many were skipped: never a silently wrong
image count.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from typing import Callable, Sequence

import numpy as np

from jaxdissect.data.loader import ThreadedReader
from jaxdissect.errors import JaxDissectError

_IMAGE_RE = re.compile(r"\.(jpe?g|png)$", re.IGNORECASE)
# ImageNet normalisation of the classifiers (spec 1.2), used to recover display bytes.
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


class DataSourceError(JaxDissectError, ValueError):
    """A data folder is missing, empty or holds a file that cannot be read."""


def is_image_file(name: str) -> bool:
    return _IMAGE_RE.search(name) is not None


def list_image_files(root: str) -> list[str]:
    """Absolute image paths under ``root`` in the original's order (spec 4.1).

    ``<root>.txt``, when it exists, is an index: one path per line relative to
    the parent of ``root``, sorted. Otherwise the directory tree is walked with
    directories sorted by path and files sorted by name.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataSourceError(
            f"image folder {root} does not exist or is not a directory; "
            "pass the folder that holds the images (e.g. --data=places:/data/places/val)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataSourceError(f"image folder {root} is not readable; check its permissions")
    index_file = root + ".txt"
    if os.path.isfile(index_file):
        base = os.path.dirname(root)
        with open(index_file) as f:
            files = sorted(os.path.join(base, line.strip()) for line in f if line.strip())
        if not files:
            raise DataSourceError(f"index file {index_file} lists no images; delete it or fill it")
        return files
    walk_errors = []
    files = []
    for dirname, _, names in sorted(os.walk(root, onerror=walk_errors.append)):
        files.extend(os.path.join(dirname, n) for n in sorted(names) if is_image_file(n))
    if not files:
        detail = f" ({walk_errors[0]})" if walk_errors else ""
        raise DataSourceError(
            f"found no .jpg/.jpeg/.png images under {root}{detail}; check the path and permissions")
    return files


def vgg_transform(crop: int = 224) -> Callable:
    """PIL image -> (ImageNet-normalised float32 [crop, crop, 3], uint8 display bytes).

    The model input comes from ``jaxdissect.preprocess.vgg_preprocess`` (spec
    1.2); the display bytes are that input mapped back to 0..255, which recovers
    the cropped pixels exactly (the normalisation is affine and is undone in
    float32 before rounding).
    """
    from jaxdissect.preprocess import vgg_preprocess

    def transform(image):
        x = np.asarray(vgg_preprocess(image, crop=crop), np.float32)
        display = np.clip(np.rint((x * _STD + _MEAN) * 255.0), 0, 255).astype(np.uint8)
        return x, display

    return transform


def transform_for(preprocessing: dict) -> Callable:
    """The input pipeline a model records in its ``model.json`` ``preprocessing`` entry.

    ``{"normalization": <jaxdissect.preprocess convention>, "resize": R, "crop": C}``:
    RGB, Pillow bilinear resize to ``R x R``, centre crop ``C`` (offset
    ``round((R - C) / 2)``), bytes -> the convention. Returns ``PIL image ->
    (float32 [C, C, 3] input, uint8 [C, C, 3] display)``; the classic VGG
    pipeline (imagenet, 256, 224) is exactly :func:`vgg_transform`.
    """
    from jaxdissect.preprocess import OFFSET_SCALE, RESIZE, renormalize

    norm = str(preprocessing.get("normalization", "imagenet"))
    resize, crop = int(preprocessing.get("resize", RESIZE)), int(preprocessing.get("crop", 224))
    if norm not in OFFSET_SCALE:
        raise DataSourceError(f"unknown normalization {norm!r} in the model's preprocessing; one of "
                              f"{sorted(OFFSET_SCALE)}")
    if not 1 <= crop <= resize:
        raise DataSourceError(f"the model's preprocessing crops {crop} pixels from a {resize}-pixel resize; "
                              "the crop must be between 1 and the resize")
    if norm == "imagenet" and resize == RESIZE:
        return vgg_transform(crop)
    from PIL import Image

    off = int(round((resize - crop) / 2))

    def transform(image):
        image = image.convert("RGB")
        if image.size != (resize, resize):
            image = image.resize((resize, resize), Image.BILINEAR)
        display = np.asarray(image, np.uint8)[off:off + crop, off:off + crop]
        if norm == "zc":  # written as the synthetic scenes compute it, to the last bit
            x = display.astype(np.float32) / 127.5 - 1.0
        else:
            x = renormalize(display.astype(np.float32) / 255.0, "pt", norm).astype(np.float32)
        return x, np.ascontiguousarray(display)

    return transform


def open_rgb(path: str):
    """The image file at ``path``, decoded (file closed) and converted to RGB (a PIL image)."""
    from PIL import Image

    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return image.convert("RGB")


class ImageFolder:
    """Every image under a folder, in a fixed order, preprocessed for a classifier.

    Args:
      root: the folder.
      crop: centre-crop size of the classifier pipeline (224 VGG16/ResNet, 227 AlexNet).
      transform: optional ``PIL image -> (float32 [H, W, 3] input, uint8 [H, W, 3]
        display)`` replacing the classifier pipeline.
      on_error: ``'raise'`` (stop, naming the file) or ``'skip'`` (serve it as
        ``valid=False``, count it in ``bad_files``).
      files: an explicit file list (used by subclasses); default: ``list_image_files(root)``.
      num_threads: decoding threads per batch (Pillow releases the GIL while decoding).
    """

    def __init__(self, root: str, *, crop: int = 224, transform: Callable | None = None,
                 on_error: str = "raise", files: Sequence[str] | None = None,
                 name: str | None = None, num_threads: int | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = os.path.abspath(os.path.expanduser(root))
        self.files = list(files) if files is not None else list_image_files(self.root)
        if not self.files:
            raise DataSourceError(f"no images in {self.root}")
        self.crop = crop
        self.on_error = on_error
        self.name = name or os.path.basename(self.root.rstrip(os.sep)) or self.root
        self._transform = transform
        self._reader = ThreadedReader(self._load, f"images in {self.root}", num_threads)
        self._lock = threading.Lock()
        self._shape = None
        self.bad_files: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.files)

    @property
    def transform(self):
        if self._transform is None:
            self._transform = vgg_transform(self.crop)
        return self._transform

    def _load(self, index: int):
        path = self.files[index]
        try:
            return self.transform(open_rgb(path))
        except Exception as e:  # noqa: BLE001 - any decoding failure means the same thing
            if self.on_error == "raise":
                raise DataSourceError(
                    f"cannot read image {path} (index {index}): {type(e).__name__}: {e}. "
                    "Replace or delete the file, or pass --on_bad_image=skip to leave it out "
                    "(skipped files are counted and listed in the report)") from e
            with self._lock:
                self.bad_files[int(index)] = f"{path}: {type(e).__name__}: {e}"
            return None

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        from PIL import Image

        indices, loaded = self._reader.read(indices, len(self))
        shape = next((x.shape for x, _ in (l for l in loaded if l is not None)), None)
        if shape is None:  # every image of the batch was unreadable: the size of earlier ones
            shape = self._shape or self.transform(Image.new("RGB", (256, 256)))[0].shape
        self._shape = shape
        image = np.zeros((len(indices),) + shape, np.float32)
        display = np.zeros((len(indices),) + shape, np.uint8)
        valid = np.zeros(len(indices), bool)
        for j, item in enumerate(loaded):
            if item is None:
                continue
            if item[0].shape != shape:
                raise DataSourceError(
                    f"image {self.files[indices[j]]} preprocesses to shape {item[0].shape}, "
                    f"others in the batch to {shape}; the transform must give one fixed size")
            image[j], display[j], valid[j] = item[0], item[1], True
        return {"image": image, "display": display, "valid": valid, **self._extra(indices)}

    def _extra(self, indices):
        return {}

    def fingerprint(self) -> dict:
        first, last = self.files[0], self.files[-1]
        sizes = [os.path.getsize(p) if os.path.exists(p) else -1 for p in (first, last)]
        listing = hashlib.sha256("\n".join(os.path.relpath(p, self.root) for p in self.files)
                                 .encode()).hexdigest()[:16]
        return {"kind": type(self).__name__, "root": self.root, "count": len(self),
                "first": os.path.relpath(first, self.root), "last": os.path.relpath(last, self.root),
                "sizes": sizes, "listing_sha256": listing, "crop": self.crop}


class LatentSource:
    """The generator inputs of the original: ``n`` z vectors from ``standard_z_sample(n, seed=seed)``."""

    def __init__(self, n: int = 10000, seed: int = 1, depth: int = 512):
        from jaxdissect.data.latents import standard_z_sample

        if n < 1:
            raise ValueError(f"LatentSource needs n >= 1, got {n}")
        self.n, self.seed, self.depth = int(n), int(seed), int(depth)
        self.z = np.asarray(standard_z_sample(self.n, depth=self.depth, seed=self.seed), np.float32)
        self.name = f"z{self.n}"

    def __len__(self) -> int:
        return self.n

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        return {"z": self.z[indices], "valid": np.ones(len(indices), bool)}

    def fingerprint(self) -> dict:
        return {"kind": "LatentSource", "n": self.n, "seed": self.seed, "depth": self.depth}
