"""Dissection statistics of one layer's activations: exact levels, IoU against labels, top images.

:func:`dissect_activations` takes a callable returning a fresh iterator of
``(acts [B, h, w, U], seg [B, K, S, S])`` or ``(acts, seg, image_labels [B, J])``
batches and makes three passes over it (the original's rq, topk and condi99
steps, with exact statistics):

1. per unit, the high-16-bit histogram of the upsampled activations
   (:mod:`~jaxdissect.kernels.quantile`), the top-k images by maximum of
   the raw activation, the exact mean and the maximum;
2. the low-16-bit histograms, giving the exact level
   ``numpy.quantile(upsampled values of u, 1 - quantile)``;
3. integer IoU counts of ``upsampled > level`` against every label.

Each pass is ``init -> update(state, batch) -> state`` run per device
(:mod:`jaxdissect.parallel`) with states merged once, so 1 and 8 devices give
bit-identical results (integer counts, exact sums, totally ordered top-k).
With ``workdir`` every pass checkpoints and resumes
(:mod:`jaxdissect.streaming`).

For research code and for the pipeline that dissects many layers in one
pass over the data, :class:`Plan` holds one layer's static settings and
exposes the per-pass ``init``/``update``/``finish`` functions; they compose
inside one jitted step (one state per layer, no global state). Jitted
single-state versions are :func:`pass1_update`, :func:`pass2_update`,
:func:`pass3_update` (``plan`` is a static argument).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.kernels import category as category_k
from jaxdissect.kernels import codes as codes_k
from jaxdissect.kernels import iou as iou_k
from jaxdissect.kernels import labels as labels_k
from jaxdissect.kernels import quantile as quantile_k
from jaxdissect.kernels import sparse as sparse_k
from jaxdissect.kernels import topk as topk_k
from jaxdissect.kernels import upsample as upsample_k
from jaxdissect.errors import JaxDissectError

_MAX_PIXELS = np.iinfo(np.int32).max


class DissectionError(JaxDissectError, ValueError):
    """Bad input to a dissection (shapes, labels, NaN/Inf activations); the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static settings of one layer's dissection; its methods are the per-pass kernels.

    ``source_hw`` is the raw activation map size ``(h, w)``; ``resolution``
    the segmentation grid ``(S, S)``. ``convolutions`` (tuple of
    ``(kernel, stride, padding, dilation)``) and ``image_size`` select the
    receptive-field geometry instead of ``geometry``. ``label_category``
    (primary category index per label, -1 = none) with ``num_categories``
    adds the 2017 method's category-conditioned active counts
    (``counts["category_active"] [U, C]``, :mod:`~jaxdissect.kernels.category`).
    """

    num_units: int
    num_labels: int
    source_hw: tuple[int, int]
    resolution: tuple[int, int] = (56, 56)
    quantile: float = 0.01
    topk: int = 100
    geometry: str = "original"
    convolutions: tuple | None = None
    image_size: int | None = None
    hist_method: str = "scatter"
    iou_method: str = "auto"
    label_category: tuple | None = None
    num_categories: int = 0
    sparse: bool = True

    @property
    def pixels(self) -> int:
        return self.resolution[0] * self.resolution[1]

    def taps(self):
        return _taps(self.source_hw, self.resolution, self.geometry, self.convolutions, self.image_size)

    def cells(self):
        """Per-axis cells of target pixels sharing their four source corners (:mod:`~jaxdissect.kernels.sparse`)."""
        return _cells(self.source_hw, self.resolution, self.geometry, self.convolutions, self.image_size)

    def upsample(self, acts):
        """``[B, h, w, U]`` (or sparse codes) -> ``[B, S, S, U]`` float32 with this plan's geometry."""
        return upsample_k.apply_taps(codes_k.dense(acts), *self.taps())

    def _rows(self, acts):
        up = self.upsample(acts)
        return up.reshape(-1, self.num_units)

    # Pass 1: high-bit histograms, top-k, mean and max.
    def pass1_init(self, images: int | None = None) -> dict:
        """``images``: an upper bound on the images of the whole stream; with ``sparse`` it lets pass 1
        skip cells that cannot reach the top quantile (None: every value is histogrammed)."""
        if self.sparse:
            target = sparse_k.floor_target(images, self.pixels, 1.0 - self.quantile)
            quantile = sparse_k.pass1_init(self.num_units, target)
        else:
            quantile = quantile_k.high_init(self.num_units)
        return {"quantile": quantile, "topk": topk_k.init(self.num_units, self.topk)}

    def pass1_update(self, state, acts, valid, index, batch_id) -> dict:
        """``acts [B, h, w, U]`` raw (or :class:`~jaxdissect.kernels.codes.SparseCodes`); ``valid``, ``index``
        (global image), ``batch_id`` all ``[B]``."""
        if "floor" in state["quantile"]:
            quantile = sparse_k.pass1_update(state["quantile"], acts, valid, batch_id, *self.cells())
        else:
            rows = self._rows(acts)
            per_pixel = functools.partial(jnp.repeat, repeats=self.pixels)
            quantile = quantile_k.high_update(state["quantile"], rows, per_pixel(valid), per_pixel(batch_id),
                                              method=self.hist_method)
        return {"quantile": quantile, "topk": topk_k.update(state["topk"], acts, valid, index)}

    # Pass 2: low-bit histograms of the two buckets per unit.
    def pass2_init(self, selection: dict) -> dict:
        return quantile_k.low_init(selection, listed=self.sparse)

    def pass2_update(self, state, acts, valid) -> dict:
        if self.sparse:
            return sparse_k.pass2_update(state, acts, valid, *self.cells())
        rows = self._rows(acts)
        return quantile_k.low_update(state, rows, jnp.repeat(valid, self.pixels), method=self.hist_method)

    # Pass 3: IoU counts at the exact levels.
    def pass3_init(self, thresholds) -> dict:
        counts = iou_k.init(self.num_units, self.num_labels)
        if self.label_category is not None:
            counts["category_active"] = category_k.init(self.num_units, self.num_categories)
        return {"thresholds": jnp.asarray(np.asarray(thresholds, np.float32)), "counts": counts}

    def pass3_update(self, state, acts, seg, valid, batch_id, image_labels=None) -> dict:
        counts = dict(state["counts"])
        by_category = counts.pop("category_active", None)
        if self.sparse and by_category is None:
            counts = sparse_k.pass3_update(counts, acts, state["thresholds"], seg, valid, batch_id,
                                           image_labels, self.upsample, *self.cells(), method=self.iou_method)
        else:  # the category-conditioned count of the 2017 method needs the full maps
            up = self.upsample(acts)
            counts = iou_k.update(counts, up, state["thresholds"], seg, valid, batch_id, image_labels,
                                  method=self.iou_method)
            if by_category is not None:
                counts["category_active"] = category_k.update(
                    by_category, up, state["thresholds"], seg, valid, image_labels,
                    np.asarray(self.label_category, np.int32))
        return {"thresholds": state["thresholds"], "counts": counts}

    # Merges of per-device states (leading device axis), on the host.
    def pass1_finish(self, states) -> tuple[dict, dict]:
        """``(selection, activation statistics)``; raises :class:`DissectionError` on NaN/Inf."""
        q = jax.tree.map(np.asarray, states["quantile"])
        bad = q["nonfinite"].astype(np.int64).sum(0)
        if bad.any():
            units = np.flatnonzero(bad)
            u = int(units[0])
            batch = int(q["first_bad_batch"].min(0)[u])
            raise DissectionError(
                f"unit {u} has {int(bad[u])} NaN/Inf upsampled activations, the first in batch {batch} "
                f"({len(units)} units affected: {units[:10].tolist()}{' ...' if len(units) > 10 else ''}); "
                "check the model weights and the input preprocessing of that batch")
        stats = topk_k.merge(jax.tree.map(np.asarray, states["topk"]),
                             self.source_hw[0] * self.source_hw[1])
        return quantile_k.select(q, 1.0 - self.quantile), stats

    def pass2_finish(self, selection, states) -> np.ndarray:
        return quantile_k.finish(selection, jax.tree.map(np.asarray, states))

    def pass3_finish(self, states) -> dict:
        counts = iou_k.merge(jax.tree.map(np.asarray, states["counts"]))
        if counts["bad_labels"]:
            raise DissectionError(
                f"{int(counts['bad_labels'])} images carry labels outside [0, {self.num_labels}) (the first in "
                f"batch {int(counts['first_bad_batch'])}; image-level labels may also be -1 = none); pass the "
                "right num_labels or fix the segmentations")
        return counts


@functools.lru_cache(maxsize=64)
def _taps(source_hw, resolution, geometry, convolutions, image_size):
    return upsample_k.make_taps(source_hw, resolution, geometry, convolutions, image_size)


@functools.lru_cache(maxsize=64)
def _cells(source_hw, resolution, geometry, convolutions, image_size):
    th, tw = _taps(source_hw, resolution, geometry, convolutions, image_size)
    return sparse_k.axis_cells(th), sparse_k.axis_cells(tw)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def pass1_update(plan: Plan, state, acts, valid, index, batch_id):
    """Jitted :meth:`Plan.pass1_update` for a single (not per-device) state."""
    return plan.pass1_update(state, acts, valid, index, batch_id)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def pass2_update(plan: Plan, state, acts, valid):
    """Jitted :meth:`Plan.pass2_update` for a single state."""
    return plan.pass2_update(state, acts, valid)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def pass3_update(plan: Plan, state, acts, seg, valid, batch_id, image_labels=None):
    """Jitted :meth:`Plan.pass3_update` for a single state."""
    return plan.pass3_update(state, acts, seg, valid, batch_id, image_labels)


# --------------------------------------------------------------------------
# Result.

_ARRAYS = ("thresholds", "iou", "label", "label_iou", "interpretable", "label_pixels", "active",
           "intersection", "top_values", "top_index", "act_mean", "act_max")


@dataclasses.dataclass
class DissectionResult:
    """Everything :func:`dissect_activations` measured for one layer.

    ``thresholds [U]`` exact levels; ``iou [U, L]`` (column 0 = activation
    rate); per unit ``label``, ``label_iou`` and ``interpretable``
    (``label_iou > miniou``); counts ``pixels``, ``label_pixels [L]``,
    ``active [U]``, ``intersection [U, L]``; ``top_values``/``top_index``
    ``[U, k]`` (index -1 = fewer images than k); ``act_mean``/``act_max``
    ``[U]`` of the raw activations; ``images``; ``label_names`` and
    ``categories`` (per label, may be None); ``config`` (the settings);
    ``category_active [U, C]`` (the 2017 method's category-conditioned active
    counts, None otherwise).
    """

    thresholds: np.ndarray
    iou: np.ndarray
    label: np.ndarray
    label_iou: np.ndarray
    interpretable: np.ndarray
    pixels: int
    label_pixels: np.ndarray
    active: np.ndarray
    intersection: np.ndarray
    top_values: np.ndarray
    top_index: np.ndarray
    act_mean: np.ndarray
    act_max: np.ndarray
    images: int
    label_names: list | None = None
    categories: list | None = None
    config: dict = dataclasses.field(default_factory=dict)
    category_active: np.ndarray | None = None

    @property
    def labels(self) -> list[dict]:
        """Per unit ``{unit, label, category, iou, interpretable}`` (names ``'-'`` when unknown)."""
        names = labels_k.describe(self.label, self.label_names, self.categories)
        return [{"unit": u, "label": n, "category": c, "iou": float(self.label_iou[u]),
                 "interpretable": bool(self.interpretable[u])} for u, (n, c) in enumerate(names)]

    def relabel(self, miniou: float | None = None, row0_competes: bool | None = None) -> "DissectionResult":
        """The same statistics labelled with another ``miniou`` or row-0 rule (no pass over the data)."""
        miniou = self.config.get("miniou", 0.04) if miniou is None else float(miniou)
        row0 = self.config.get("row0_competes", False) if row0_competes is None else bool(row0_competes)
        if self.config.get("method") == "netdissect2017":
            # The 2017 rule: the best label of the best category, a detector when its score reaches miniou.
            from jaxdissect import netdissect2017

            if row0:
                raise ValueError("row0_competes does not apply to a netdissect2017 result (label 0 is never "
                                 "scored); drop row0_competes")
            scores = netdissect2017.scores_of(self)
            label, label_iou = scores.label, scores.score
            interpretable = (label_iou >= miniou) & (label > 0)
        else:
            label, label_iou, interpretable = labels_k.best_labels(np.asarray(self.iou), miniou=miniou,
                                                                   row0_competes=row0)
        return dataclasses.replace(self, label=label.astype(np.int64), label_iou=label_iou.astype(np.float64),
                                   interpretable=interpretable.astype(bool),
                                   config={**self.config, "miniou": miniou, "row0_competes": row0})

    def save(self, directory: str) -> None:
        """Write ``result.npz`` (arrays) and ``result.json`` (names, counts, settings) to ``directory``."""
        from jaxdissect import fileio

        os.makedirs(directory, exist_ok=True)
        extra = {} if self.category_active is None else {"category_active": np.asarray(self.category_active)}
        fileio.savez(os.path.join(directory, "result.npz"), **{k: np.asarray(getattr(self, k)) for k in _ARRAYS},
                     **extra)
        meta = {"format": "jaxdissect-dissection-result", "pixels": int(self.pixels), "images": int(self.images),
                "label_names": self.label_names, "categories": self.categories, "config": self.config}
        fileio.write_json(os.path.join(directory, "result.json"), meta)

    @classmethod
    def load(cls, directory: str) -> "DissectionResult":
        """Read a result written by :meth:`save`."""
        paths = [os.path.join(directory, n) for n in ("result.npz", "result.json")]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"no dissection result in {directory}: missing {', '.join(missing)}")
        with open(paths[1]) as f:
            meta = json.load(f)
        if meta.get("format") != "jaxdissect-dissection-result":
            raise ValueError(f"{paths[1]} is not a jaxdissect dissection result")
        with np.load(paths[0], allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAYS}
            if "category_active" in z.files:
                arrays["category_active"] = z["category_active"]
        return cls(**arrays, pixels=meta["pixels"], images=meta["images"], label_names=meta["label_names"],
                   categories=meta["categories"], config=meta["config"])


# --------------------------------------------------------------------------
# Driver.


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise DissectionError(f"resolution must be an int or a pair, got {size}")
    return size


class _Batches:
    """Validates user batches and turns them into padded host tuples for the per-device steps."""

    def __init__(self, batches: Callable[[], Iterable], resolution, num_labels, multiple):
        self.batches = batches
        self.resolution = resolution  # None: the first segmentation's
        self.num_labels = num_labels
        self.multiple = multiple
        self.signature = None
        self.size = multiple
        self.items = None  # items in one full pass, counted on the first
        self.passes = 0
        self._pending = None  # the probed iterator and its first batch, reused by the first pass

    def first(self):
        """Shapes of the first batch; later batches are padded to its size (one compilation per pass).

        The probed batch is not lost: the first pass continues that iterator.
        """
        iterator = iter(self.batches())
        try:
            batch = next(iterator)
        except StopIteration:
            raise DissectionError("batches() yielded no batch; nothing to dissect") from None
        acts, seg, image_labels = self._unpack(batch, 0)
        self._pending = (iterator, batch)
        self.size = -(-acts.shape[0] // self.multiple) * self.multiple
        return acts.shape[1:], seg.shape[1], None if image_labels is None else image_labels.shape[1]

    def _iterate(self, start: int):
        pending, self._pending = self._pending, None
        if pending is not None and start == 0:
            return itertools.chain([pending[1]], pending[0])
        return iter(self.batches())

    def _counted(self, items: int, start: int) -> None:
        """Every full pass must see the items of the first; a reused one-shot iterator would not."""
        self.passes += 1
        if self.items is None:
            self.items = items
        elif items != self.items:
            raise DissectionError(
                f"pass {self.passes} over batches() saw {items} items, the first pass {self.items}: "
                "batches must be a callable that returns a FRESH iterator over the same data on every call "
                "(e.g. a generator function, or lambda: iter(list_of_batches)), not one generator object")

    def _unpack(self, batch, index):
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise DissectionError(f"batch {index} must be (acts, seg) or (acts, seg, image_labels), got "
                                  f"{type(batch).__name__}")
        acts = batch[0]
        if isinstance(acts, codes_k.SparseCodes):
            acts = codes_k.SparseCodes(np.asarray(acts.indices), np.asarray(acts.values), int(acts.num_units))
            problem = codes_k.check(acts)
            if problem:
                raise DissectionError(f"batch {index}: sparse codes: {problem}")
        else:
            acts = np.asarray(acts)
        seg = np.asarray(batch[1])
        image_labels = np.asarray(batch[2]) if len(batch) == 3 and batch[2] is not None else None
        if acts.ndim != 4:
            raise DissectionError(f"batch {index}: activations must be NHWC [B, h, w, U], got shape {acts.shape}")
        if seg.ndim == 3:  # [B, S, S]: one label channel
            seg = seg[:, None]
        if self.resolution is None and seg.ndim == 4:
            self.resolution = tuple(int(s) for s in seg.shape[2:])
        if seg.ndim != 4 or seg.shape[0] != acts.shape[0] or tuple(seg.shape[2:]) != self.resolution:
            raise DissectionError(
                f"batch {index}: segmentation shape {seg.shape} must be [B, K, {self.resolution[0]}, "
                f"{self.resolution[1]}] (or [B, S, S]) with B = {acts.shape[0]} (activations {acts.shape}); "
                "every batch's segmentation must have the first one's size")
        if not np.issubdtype(seg.dtype, np.integer):
            raise DissectionError(f"batch {index}: segmentations must be integer labels, got {seg.dtype}")
        if image_labels is not None and (image_labels.ndim != 2 or image_labels.shape[0] != acts.shape[0]):
            raise DissectionError(f"batch {index}: image labels must be [B, J] with B = {acts.shape[0]}, "
                                  f"got shape {image_labels.shape}")
        if isinstance(acts, codes_k.SparseCodes):
            units = np.unique(acts.indices[~np.isfinite(acts.values)])
        else:
            units = np.flatnonzero(~np.isfinite(acts).all(axis=(0, 1, 2)))
        if units.size:
            raise DissectionError(
                f"batch {index}: unit {int(units[0])} has NaN/Inf activations ({len(units)} units affected: "
                f"{units[:10].tolist()}{' ...' if len(units) > 10 else ''}); check the model weights and the "
                "input preprocessing of that batch")
        for what, lab, low in (("segmentation", seg, 0), ("image label", image_labels, -1)):
            if lab is not None and lab.size and (lab.min() < low or lab.max() >= self.num_labels):
                bad = lab[(lab < low) | (lab >= self.num_labels)]
                raise DissectionError(
                    f"batch {index}: {what} values {sorted(set(bad.tolist()))[:10]} lie outside "
                    f"[{low}, {self.num_labels}); pass the right num_labels or fix the label data")
        signature = (acts.shape[1:], seg.shape[1], None if image_labels is None else image_labels.shape[1])
        if self.signature is None:
            self.signature = signature
        elif signature != self.signature:
            raise DissectionError(
                f"batch {index} has activations {acts.shape}, {seg.shape[1]} label channels and "
                f"{signature[2]} image labels, but earlier batches had [B, {', '.join(map(str, self.signature[0]))}], "
                f"{self.signature[1]} channels and {self.signature[2]} image labels; every batch must come from "
                "the same layer and segmenter")
        return acts, seg, image_labels

    def __call__(self, start: int = 0, with_labels: bool = False):
        """Host batches from batch ``start`` on: ``(acts, valid, index, batch_id[, seg, image_labels])``."""
        offset = 0
        first_device = 0  # images on device 0, the fullest (it takes the first rows of every batch)
        for i, batch in enumerate(self._iterate(start)):
            acts, seg, image_labels = self._unpack(batch, i) if i >= start else (batch[0], None, None)
            b = len(acts)
            padded = max(self.size, -(-b // self.multiple) * self.multiple)
            first_device += min(b, padded // self.multiple)
            if first_device * self.resolution[0] * self.resolution[1] > _MAX_PIXELS:
                raise DissectionError(
                    f"batch {i}: more than {_MAX_PIXELS} pixels per device at resolution {self.resolution}; "
                    "the int32 counters would overflow. Dissect fewer images, lower the resolution or use "
                    "more devices")
            if i >= start:
                pad = [(0, padded - b)]

                def fill(x):
                    return np.pad(x, pad + [(0, 0)] * (x.ndim - 1))

                valid = np.arange(padded) < b
                index = np.arange(offset, offset + padded, dtype=np.int32)
                batch_id = np.full(padded, i, np.int32)
                out = (codes_k.pad(acts, padded) if isinstance(acts, codes_k.SparseCodes) else
                       fill(acts.astype(np.float32)), valid, index, batch_id)
                if with_labels:
                    out += (fill(seg.astype(np.int32)),)
                    if image_labels is not None:
                        out += (fill(image_labels.astype(np.int32)),)
                yield out
            offset += b
        self._counted(offset, start)


class _ArraySource:
    """The pass driver's source for user batches (``jaxdissect.driver``): one view, no activation cache."""

    VIEW = "acts"
    label_keys = ("seg",)

    def __init__(self, batches: _Batches, mesh, num_batches, images):
        self.batches, self.mesh = batches, mesh
        self.num_batches, self.images, self.batch_size = num_batches, images, batches.size

    def cache_bytes(self) -> int:
        return 0

    def reader(self, keys):
        return lambda start: self.batches(start, with_labels="seg" in keys)

    def produce(self, batch, labels, keys=()):
        from jaxdissect import parallel

        acts, valid, index, batch_id, *rest = parallel.shard_batch(self.mesh, tuple(batch))
        out = {"acts": {self.VIEW: acts}, "valid": valid, "index": index, "batch_id": batch_id}
        out.update(zip(("seg", "image_labels"), rest))
        return out

    def error(self, pass_name, view, e):
        return None


def dissect_activations(batches: Callable[[], Iterable], num_labels: int, quantile: float = 0.01,
                        resolution=None, *, label_names: Sequence[str] | None = None,
                        categories: Sequence[str] | None = None, topk: int = 100, miniou: float = 0.04,
                        geometry: str = "original", convolutions=None, image_size: int | None = None,
                        row0_competes: bool = False, workdir: str | None = None, mesh=None,
                        num_batches: int | None = None, checkpoint_every: int = 50,
                        iou_method: str = "auto", hist_method: str = "scatter",
                        progress: bool = True, sparse: bool = True) -> DissectionResult:
    """Dissect one layer from streamed activations and segmentations (three passes; see the module doc).

    ``batches()`` must return a FRESH iterator over the same data each time,
    yielding ``(acts [B, h, w, U], seg [B, K, S, S])`` or
    ``(acts, seg, image_labels [B, J])``; a ``[B, S, S]`` segmentation is
    one label channel (K = 1). ``acts`` may be
    :class:`~jaxdissect.kernels.codes.SparseCodes` (e.g. an SAE's TopK
    codes, :meth:`jaxdissect.bases.sae.TopKSAE.codes`): the same
    results as their dense map, without touching every unit of every cell. Labels lie in ``[0, num_labels)`` (0 = none;
    image-level -1 = none). Every pass must see the same items (a pass that
    sees another count is an error). ``resolution`` (S, S) is the
    segmentation's, inferred from the first batch when not given. ``quantile`` is the top fraction
    (level = ``1 - quantile`` quantile of the upsampled activations).
    ``geometry`` is ``'original'`` (zero-padded borders) or ``'clamped'``;
    ``convolutions``/``image_size`` select the receptive-field mapping.
    ``label_names``/``categories`` (one per label) name the result;
    ``row0_competes`` reproduces the original's label-0 quirk. ``mesh``
    (default: all devices) splits each batch over devices; ``workdir`` makes
    every pass resumable and then needs ``num_batches``; ``progress=False``
    hides the progress bars (rate, ETA) of the passes. It runs in one
    process (any number of local devices); multi-host jobs build the passes
    from :class:`Plan` and :mod:`jaxdissect.parallel` directly.
    """
    from jaxdissect import parallel
    from jaxdissect.driver import Driver, IoUScoring, LabelTables

    if jax.process_count() > 1:
        raise DissectionError("dissect_activations runs in a single process; for a multi-host job build the "
                              "three passes from statistics.Plan with jaxdissect.parallel (see its docstring)")

    resolution = None if resolution is None else _pair(resolution)
    if not 0.0 < quantile < 1.0:
        raise DissectionError(f"quantile must lie in (0, 1), got {quantile}")
    if num_labels < 1:
        raise DissectionError(f"num_labels must be at least 1 (label 0 = none), got {num_labels}")
    for what, names in (("label_names", label_names), ("categories", categories)):
        if names is not None and len(names) != num_labels:
            raise DissectionError(f"{what} has {len(names)} entries but num_labels is {num_labels}")
    if workdir is not None and num_batches is None:
        raise DissectionError("a resumable dissection (workdir=...) needs num_batches=<number of batches>")
    mesh = parallel.make_mesh() if mesh is None else mesh
    devices = mesh.size
    source = _Batches(batches, resolution, num_labels, devices)
    (h, w, units), _, has_image_labels = source.first()
    resolution = source.resolution
    plan = Plan(num_units=int(units), num_labels=int(num_labels), source_hw=(int(h), int(w)),
                resolution=resolution, quantile=float(quantile), topk=int(topk), geometry=geometry,
                convolutions=None if convolutions is None else tuple(tuple(int(v) for v in c) for c in convolutions),
                image_size=None if image_size is None else int(image_size), hist_method=hist_method,
                iou_method=iou_method, sparse=bool(sparse))
    if convolutions is None:
        upsample_k.axis_taps(1, 1, geometry)  # validates the geometry name up front
    config = dataclasses.asdict(plan)
    images = None if num_batches is None else num_batches * source.size
    view = _ArraySource.VIEW
    tables = LabelTables(None if label_names is None else [str(n) for n in label_names],
                         None if categories is None else [str(c) for c in categories], [])
    driver = Driver(_ArraySource(source, mesh, num_batches, images), {view: plan}, tables, mesh=mesh,
                    workdir=workdir, identity=config, checkpoint_every=checkpoint_every, progress=progress,
                    check_finite=True)
    results, _ = driver.run(IoUScoring(float(miniou), bool(row0_competes)), config={view: json.loads(json.dumps({
        **config, "miniou": float(miniou), "row0_competes": bool(row0_competes),
        "has_image_labels": has_image_labels is not None, "devices": devices}))})
    return results[view]
