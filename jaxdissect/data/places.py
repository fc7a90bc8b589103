"""Places365 as a data source: the original's validation folder, or TFDS ``places365_small``.

``PlacesFolder(root)`` reproduces ``ParallelImageFolders([root],
classification=True, shuffle=True)`` of the original (spec 4.1): the file list
(``<root>.txt`` index or sorted walk), classes = sorted parent-folder names
(alphabetical = Places365 class order), then the list of ``(path, class)``
pairs shuffled once with ``random.Random(True)``. Index ``i`` therefore means
the same image as in the original everywhere (top-k indices, "first N images").
Images are preprocessed as in spec 1.2 (``jaxdissect.preprocess.vgg_preprocess``).

``Places365TFDS`` reads a ``places365_small`` the user has already prepared
with tensorflow-datasets (``tfds.data_source``, random access, no TensorFlow).
"""

from __future__ import annotations

import os
import random
from typing import Callable, Sequence

import numpy as np

from jaxdissect.data.folders import DataSourceError, ImageFolder, list_image_files, vgg_transform


def places_file_list(root: str, shuffle: bool = True) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(path, class_index), ...], classes)`` in the original's order (spec 4.1)."""
    root = os.path.abspath(os.path.expanduser(root))
    files = list_image_files(root)
    seen = {}
    for path in files:
        key = os.path.splitext(os.path.relpath(path, root))[0]
        if key in seen:
            raise DataSourceError(
                f"{seen[key]} and {path} have the same name apart from the extension; the "
                "original loader rejects this layout too. Keep one of them")
        seen[key] = path
    parents = [os.path.basename(os.path.dirname(os.path.relpath(p, root))) for p in files]
    classes = sorted(set(parents))
    class_index = {c: i for i, c in enumerate(classes)}
    items = [(p, class_index[c]) for p, c in zip(files, parents)]
    if shuffle:
        random.Random(True).shuffle(items)
    return items, classes


class PlacesFolder(ImageFolder):
    """A Places365 split in its folder layout (``<root>/<class>/<file>.jpg``), shuffled as the original.

    Args:
      root: e.g. ``datasets/places/val``.
      crop: 224 (VGG16, ResNet152) or 227 (AlexNet).
      shuffle: the original's one-time ``random.Random(True)`` shuffle (keep it on
        to compare indices with the original's results).
      on_error, transform, num_threads: as in ``ImageFolder``.
    """

    def __init__(self, root: str, *, crop: int = 224, shuffle: bool = True,
                 transform: Callable | None = None, on_error: str = "raise",
                 name: str = "places", num_threads: int | None = None):
        items, self.classes = places_file_list(root, shuffle=shuffle)
        self.shuffle = shuffle
        self.class_indices = np.array([c for _, c in items], np.int32)
        super().__init__(root, crop=crop, transform=transform, on_error=on_error,
                         files=[p for p, _ in items], name=name, num_threads=num_threads)

    def _extra(self, indices):
        return {"label": self.class_indices[np.asarray(indices, np.int64)]}

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "shuffle": self.shuffle, "classes": len(self.classes)}


class Places365TFDS:
    """``places365_small`` prepared by tensorflow-datasets, read without TensorFlow.

    Prepare it once (needs the TFDS download or manual files), e.g.
    ``tfds.builder('places365_small', data_dir=DIR).download_and_prepare(
    file_format='array_record')``. Images (256x256) go through the same
    classifier pipeline as the folders (resize to 256, centre crop, ImageNet
    normalisation). The order is TFDS's record order, not the original's shuffle.
    """

    def __init__(self, split: str = "validation", data_dir: str | None = None, *,
                 crop: int = 224, transform: Callable | None = None):
        import tensorflow_datasets as tfds

        try:
            self._source = tfds.data_source("places365_small", split=split, data_dir=data_dir,
                                            download=False)
        except Exception as e:  # noqa: BLE001 - every failure here means "not prepared"
            raise DataSourceError(
                f"tensorflow-datasets places365_small (split {split!r}, data_dir "
                f"{data_dir or '~/tensorflow_datasets'}) is not prepared or not readable "
                f"without TensorFlow ({type(e).__name__}: {e}). Prepare it with "
                "tfds.builder('places365_small', data_dir=...).download_and_prepare("
                "file_format='array_record'), or use --data=places:<folder>") from e
        self.split, self.data_dir, self.crop = split, data_dir, crop
        self.transform = transform or vgg_transform(crop)
        self.name = "places365_small"

    def __len__(self) -> int:
        return len(self._source)

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        from PIL import Image

        images, displays, labels = [], [], []
        for i in indices:
            record = self._source[int(i)]
            x, d = self.transform(Image.fromarray(np.asarray(record["image"], np.uint8)).convert("RGB"))
            images.append(x)
            displays.append(d)
            labels.append(int(record["label"]))
        return {"image": np.stack(images), "display": np.stack(displays),
                "label": np.array(labels, np.int32), "valid": np.ones(len(images), bool)}

    def fingerprint(self) -> dict:
        return {"kind": "Places365TFDS", "split": self.split, "data_dir": self.data_dir,
                "count": len(self), "crop": self.crop}
