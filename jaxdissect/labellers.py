"""Labellers: where a dissection's labels come from, one strategy per source of labels.

A labeller knows its label tables (names, category per label, categories), the
comparison resolution ``(S, S)`` and its label channels, which data keys it
reads, and gives each batch's ``(seg [B, K, S, S], image_labels [B, J] or
None)`` on the devices:

* :class:`DatasetLabels` (``segmentation='dataset'``): the data source's own
  ``seg`` / ``image_labels`` (Broden, synthetic scenes, labelled folders);
* :class:`SegmenterLabels` (``(segmenter, variables)``): a segmenter run on the
  display images (a classifier's input pixels, a generator's output), with the
  on-disk segmentation cache (:mod:`jaxdissect.segmentation.cache`) in front of it;
* :class:`NoLabels` (``segmentation=None``): no concept labels at all (every
  pixel carries label 0), for methods that label units otherwise (e.g.
  open-vocabulary scoring).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import parallel
from jaxdissect.segmentation import cache as segcache
from jaxdissect.config import DissectError
from jaxdissect.driver import LabelTables, array_digest


class Labeller:
    """Interface (see the module docstring)."""

    name = "labels"
    keys: tuple = ()          # data keys the labels need (host)
    tables: LabelTables
    resolution: tuple
    channels: int

    def identity(self):
        """JSON-able: what determines the labels (part of the run's resume identity)."""
        raise NotImplementedError

    def open(self, log: Callable[[str], None]) -> None:
        """Get ready before the passes (e.g. open an on-disk cache)."""

    def labels(self, batch, output):
        """``(seg, image_labels or None)`` of one batch on the mesh (``output``: a generator's images)."""
        raise NotImplementedError

    def finish(self, log: Callable[[str], None]) -> None:
        """Write what is pending and log what was done."""


def _check_tables(tables: LabelTables) -> LabelTables:
    if len(tables.label_categories) != len(tables.label_names):
        raise DissectError(f"{len(tables.label_names)} label names but {len(tables.label_categories)} "
                           "label categories; give one category per label")
    return tables


class DatasetLabels(Labeller):
    """The data source's ``seg`` and ``image_labels``."""

    name = "dataset"
    keys = ("seg", "image_labels")

    def __init__(self, data, probe, image_size, mesh):
        if "seg" not in probe and "image_labels" not in probe:
            raise DissectError(f"{data.name} provides no segmentation ('seg' or 'image_labels'); "
                               "pass a segmenter (jaxdissect.load_segmenter) instead of 'dataset'")
        h, w = image_size
        self.resolution = tuple(int(s) for s in probe["seg"].shape[-2:]) if "seg" in probe else (h // 4, w // 4)
        self.channels = (int(probe["seg"].shape[1]) if "seg" in probe else 1) + (
            int(np.asarray(probe["image_labels"]).shape[1]) if "image_labels" in probe else 0)
        self.tables = _check_tables(LabelTables([str(n) for n in data.label_names],
                                                [str(c) for c in data.label_categories],
                                                [str(c) for c in data.categories]))

    def identity(self):
        return "dataset"

    def labels(self, batch, output):
        seg = batch.get("seg")
        if seg is None:
            seg = jnp.zeros((batch["valid"].shape[0], 1) + self.resolution, jnp.int32)
        elif tuple(seg.shape[-2:]) != self.resolution:
            raise DissectError(f"the data source's segmentation is {tuple(seg.shape[-2:])} in one batch, "
                               f"{self.resolution} in the first; it must have one resolution")
        return seg, batch.get("image_labels")


class NoLabels(Labeller):
    """No concept labels: one channel of label 0 at ``H / 4`` (units are labelled by another strategy)."""

    name = "none"

    def __init__(self, image_size):
        h, w = image_size
        self.resolution, self.channels = (h // 4, w // 4), 1
        self.tables = LabelTables(["-"], ["-"], [])

    def identity(self):
        return None

    def labels(self, batch, output):
        return jnp.zeros((batch["valid"].shape[0], 1) + self.resolution, jnp.int32), None


class SegmenterLabels(Labeller):
    """A ``(segmenter, variables)`` pair run on each batch, behind the on-disk segmentation cache.

    With a cache, a batch whose valid items are all cached is read from it
    and the segmenter does not run; otherwise the segmenter's labels of the
    valid items are stored (unreadable items never are). The entry is keyed
    by the data's fingerprint, the segmenter's digest, the image and
    label-map sizes, a digest of item 0's display image and, for a
    generator, the generator's variables.
    """

    def __init__(self, segmentation, data, probe, image_size, batch_size, mesh, *, generator: bool,
                 model_digest=None, cache_root: str | None = None, cache_mb: float | None = None):
        from jaxdissect.segmentation import segment

        self.segmenter, self.variables = segmentation
        self.data, self.probe, self.mesh, self.generator = data, probe, mesh, generator
        self.model_digest = model_digest
        self.keys = () if generator else ("display",)
        h, w = image_size
        self.image_size = (h, w)
        tables = []

        def shapes(v, x):  # traced only: the label tables and the output shape, nothing is segmented
            labels, names, cats = segment(self.segmenter, v, x, downsample=4)
            tables.append((names, cats))
            return labels

        # Traced at the shape and placement of the run's batches, so the segmenter's jit reuses
        # this trace instead of tracing the network again (about 1 s for the UPP segmenter).
        batch = jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32, sharding=parallel.batch_sharding(mesh))
        labels = jax.eval_shape(shapes, self.variables, batch)
        names, cats = tables[0]
        self.resolution = tuple(int(s) for s in labels.shape[-2:])
        self.channels = int(labels.shape[1])
        if self.resolution != (h // 4, w // 4):
            raise DissectError(
                f"the segmenter returns {self.resolution[0]}x{self.resolution[1]} label maps for {h}x{w} images; "
                f"the dissection compares at {h // 4}x{w // 4} (downsample 4). Use a segmenter that honours "
                "downsample=4 for this image size")
        self.tables = _check_tables(_label_tables(self.segmenter, names, cats))
        self.name = getattr(self.segmenter, "setting", "segmenter")
        self.cache_root, self.cache_mb = cache_root, cache_mb
        self.cache, self.opened = None, False
        self.segmented = self.from_cache = 0   # images sent to the segmenter / read from its cache

    def identity(self):
        # One digest of the segmenter (variables, labels, static settings): the run's identity and the cache key.
        return segcache.segmenter_digest((self.segmenter, self.variables))

    def open(self, log: Callable[[str], None]):
        """The on-disk segmentation cache entry of this run (opened on first use), or None."""
        if not self.opened:
            self.opened = True
            if self.cache_root:
                key = {"data": self.data.fingerprint(), "segmenter": self.identity(), "downsample": 4,
                       "image_size": list(self.image_size), "resolution": list(self.resolution),
                       "channels": self.channels}
                if self.generator:  # what gets segmented is the generator's output
                    key["generator"] = self.model_digest
                else:  # what gets segmented is the display image: catches another resize or crop of the data
                    key["input"] = array_digest(np.asarray(self.probe.get("display", ()))[:1])
                self.cache = segcache.open_cache(self.cache_root, key, self.tables._asdict(), self.channels,
                                                 self.resolution, max_mb=self.cache_mb, log=log)
        return self.cache

    def labels(self, batch, output):
        cache = self.cache
        valid = np.asarray(batch["valid"], bool) if jax.process_count() == 1 else None
        if cache is not None:
            index = np.asarray(batch["index"])[valid]
            hit = cache.lookup(index)
            if hit is not None:
                labels = np.zeros((len(valid),) + hit.shape[1:], np.int32)
                labels[valid] = hit
                self.from_cache += len(index)
                return parallel.shard_batch(self.mesh, labels), None
        if self.generator:
            zc = output  # unclamped, as the original segments it
        else:
            zc = jnp.asarray(batch["display"], jnp.float32) / 127.5 - 1.0
        try:
            fn = _segmenter_fn(self.segmenter)
        except TypeError:  # an unhashable segmenter: compile for this call only
            fn = _segmenter_fn.__wrapped__(self.segmenter)
        labels = fn(self.variables, zc)
        if tuple(labels.shape[-2:]) != self.resolution:
            raise DissectError(f"the segmenter returned {tuple(labels.shape[-2:])} label maps, expected "
                               f"{self.resolution}")
        self.segmented += int(valid.sum()) if valid is not None else int(labels.shape[0])
        if cache is not None:
            cache.store(index, labels if valid.all() else labels[np.flatnonzero(valid)])
        return labels, None

    def finish(self, log):
        cache = self.cache
        if cache is not None:
            cache.flush()
        if not (self.segmented or self.from_cache):
            return
        log(f"segmenter: {self.segmented} images segmented, {self.from_cache} read from the segmentation cache"
            + (f" ({cache.written} written to {cache.directory})" if cache else ""))


def make_labeller(segmentation, data, probe, image_size, batch_size, mesh, *, generator, model_digest=None,
                  cache_root=None, cache_mb=None) -> Labeller:
    """The labeller of a ``segmentation`` argument: ``'dataset'``, ``(segmenter, variables)`` or None."""
    if segmentation is None:
        return NoLabels(image_size)
    if isinstance(segmentation, str):
        if segmentation != "dataset":
            raise DissectError(f"segmentation must be (segmenter, variables), 'dataset' or None, got {segmentation!r}")
        return DatasetLabels(data, probe, image_size, mesh)
    return SegmenterLabels(segmentation, data, probe, image_size, batch_size, mesh, generator=generator,
                           model_digest=model_digest, cache_root=cache_root, cache_mb=cache_mb)


def _label_tables(segmenter, names, cats) -> LabelTables:
    """Label tables from what ``segment`` returns."""
    names = [str(n) for n in names]
    per_label = [str(c) for c in cats]
    if len(per_label) != len(names):
        raise DissectError(f"the segmenter gives {len(names)} label names but {len(per_label)} categories")
    categories = getattr(segmenter, "categories", None) or list(dict.fromkeys(per_label))
    return LabelTables(names, per_label, [str(c) for c in categories])


@functools.lru_cache(maxsize=8)
def _segmenter_fn(segmenter):
    """Jitted ``(variables, images in [-1, 1]) -> labels [N, K, H/4, W/4]``.

    Under ``jit`` ``segment`` skips its host-side range check, so a generator
    output that overshoots [-1, 1] a little is segmented as it is (as the
    original does) instead of stopping the run.
    """
    from jaxdissect.segmentation import segment

    return jax.jit(lambda variables, images: segment(segmenter, variables, images, downsample=4)[0])
