"""The planted toy generator's dissection (:mod:`jaxdissect.models.toy_generator`), for tests and demos."""

from __future__ import annotations

from typing import Sequence

from jaxdissect.models.toy_generator import EDIT_LAYER, ToyScenes, toy_generator
from jaxdissect.pipelines.dissect import dissect


def dissect_toy(output_dir: str, layers: str | Sequence[str] = EDIT_LAYER, num_images: int = 200, *,
                quantile: float = 0.01, progress: bool = False, basis: str | None = None,
                cache_dir: str | None = None):
    """Dissect the toy generator's ``layers`` against its colour labels into ``output_dir``.

    The directory has ``launch.dissect``'s layout (``<layer>/report.json``,
    ``<layer>/arrays.npz`` with ``thresholds`` and ``iou``, ``index.html``;
    label names in ``work/results/<layer>/result.json``). Returns
    ``{layer: DissectionResult}``. Resumes/reuses an existing run. ``basis``:
    dissect the layers in these bases (``DissectConfig.basis``; learned ones
    kept in ``cache_dir``).
    """
    module, variables = toy_generator()
    return dissect(module, variables, layers, ToyScenes(num_images), "dataset", quantile=quantile,
                   output_dir=output_dir, batch_size=50, thumbsize=32, progress=progress,
                   name=f"toy_generator toy{num_images} colour", basis=basis, cache_dir=cache_dir)
