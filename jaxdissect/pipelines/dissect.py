"""Dissect any number of layers of a model in three streaming passes over the data.

``dissect(module, variables, layers, data, segmentation)`` labels every unit of
every requested layer with the concept its top-quantile region matches best
(spec 3.1). All layers share the same passes; the model captures every layer
at once, and the segmenter runs once per image:

1. per unit: high-bit histogram of the upsampled activations (exact quantile,
   first half), top-k images by the raw per-image maximum, mean and max;
2. low-bit histogram inside the buckets that hold the quantile -> exact
   thresholds ``T_u`` (the ``1 - quantile`` quantile, 0.99 by default);
3. IoU counts of ``upsampled act > T_u`` against the segmentation;
4. (``label_metrics=True``) IoU, F1, AUPRC, correlation and cosine of every
   unit against its label, at pixel and image level
   (:mod:`jaxdissect.explain.unit_metrics`).

Activations are upsampled to the segmentation's resolution (``H / 4``: 56 for
224-pixel classifiers, 64 for 256-pixel generators) with the original's
geometry (``jaxdissect.kernels.upsample``). ``segmentation`` is a
``(segmenter, variables)`` pair from ``jaxdissect.load_segmenter`` (run on the
images in [-1, 1]: a classifier's input pixels, a generator's output) or
``'dataset'``, the labels the data source provides (``seg`` / ``image_labels``).

Generators: the model output (RGB in [-1, 1]) is what gets segmented and what
the thumbnails show, rendered as ``(x + 1) / 2``. The original rendered the
thumbnails of its GAN dissections as ``x`` clamped to [0, 1] (spec 2.6 quirk);
we use the corrected rendering, which its notebooks use too.

With ``activation_cache_mb`` (default 1024), pass 1 keeps every layer's
activations and the labels in host memory when they fit, and passes 2 and 3
read them from there: the model, the decoding and the segmenter then run once
per image (the log says whether the cache is used).

With ``segmentation_cache`` (a directory; the launchers use the per-user
cache), the segmenter's label maps are kept on disk and shared by every later
dissection of the same data: dissecting another model or other layers reads
them and does not run the segmenter (``jaxdissect.segmentation.cache``). The entry is
keyed by the data's fingerprint, the segmenter's digest (class, variables,
labels, settings), the image and label-map sizes, a digest of item 0's
display image (another resize or crop of the same files is another entry)
and, for a generator, the generator's variables (its outputs are what gets
segmented). The log counts the images segmented and read from the cache.

Passes go through ``jaxdissect.streaming.run_stream`` under
``output_dir/work``: a killed run resumes from its last checkpoint, and
finished passes and per-layer outputs are never recomputed. Outputs per layer
in ``output_dir/<layer>/``: ``report.json`` (spec 3.1), ``arrays.npz``,
``image/unit<u>.jpg`` strips (top 5 images, region above ``T_u`` highlighted),
``concepts_99.svg``; for the run: ``index.html`` and ``summary.*``.

Data sources (``jaxdissect.data.places``, ``.folders``, ``.broden``,
``.synthetic``, or your own) have ``__len__``, ``name``, ``fingerprint()``
(JSON-able, changes when the data does) and ``get_batch(indices)`` returning
``'image'`` (float32 ``[B, H, W, 3]`` model input) or ``'z'`` (``[B, 512]``),
``'display'`` (uint8 RGB of what the model sees; not for ``z``), optionally
``'seg'`` (int32 ``[B, K, S, S]``, 0 = no label) and ``'image_labels'``
(``[B, J]``) with ``label_names``, ``label_categories`` and ``categories``
attributes, and ``'valid'`` (bool ``[B]``: False for an item that could not be
read, which is then left out of every statistic and counted in the report).
Index ``i`` must always mean the same item.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxdissect import parallel, streaming
from jaxdissect.segmentation import cache as segcache
from jaxdissect.data import loader
from jaxdissect.kernels import upsample as upsample_k
from jaxdissect.errors import JaxDissectError


class DissectError(JaxDissectError, ValueError):
    """Inputs that cannot be dissected together (unknown layer, resolutions that do not match, ...)."""


WORK = "work"
STRIP_IMAGES = 5


# --------------------------------------------------------------------------
# Inputs


def _model_input(batch: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray]:
    if "z" in batch:
        return "z", batch["z"]
    if "image" in batch:
        return "image", batch["image"]
    raise DissectError(f"data source batches need an 'image' or 'z' array; got keys {sorted(batch)}")


def _resolve_layers(module, variables, x, layers: Sequence[str]):
    from jaxdissect.layers import layer_shapes

    shapes = layer_shapes(module, variables, x)
    valid = [n for n, s in shapes.items() if isinstance(s, jax.ShapeDtypeStruct) and len(s.shape) == 4]
    unknown = [n for n in layers if n not in shapes]
    if unknown:
        import difflib

        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, valid, n=3, cutoff=0.5)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise DissectError(f"unknown layer {', '.join(hints)}; {type(module).__name__} has these "
                           f"dissectable layers: {', '.join(valid)}")
    flat = [n for n in layers if n not in valid]
    if flat:
        raise DissectError(f"layer(s) {', '.join(flat)} do not output a [N, H, W, units] feature map "
                           f"(shapes {[getattr(shapes[n], 'shape', shapes[n]) for n in flat]}); "
                           f"dissectable layers: {', '.join(valid)}")
    return {n: shapes[n].shape for n in layers}


# --------------------------------------------------------------------------
# Thumbnails and outputs


def _to_bytes_zc(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8, as ``(x + 1) / 2`` (the corrected generator rendering)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(repr(value))


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# The pipeline


class _Run:
    """Settings, shapes and per-layer plans shared by the passes of one dissection."""

    def __init__(self, module, variables, layers, data, segmentation, *, quantile, miniou, topk,
                 thumbsize, batch_size, output_dir, num_images, mesh, geometry, progress, name,
                 checkpoint_every, resolution, row0_competes=False, settings=None, method="pnas", views=None,
                 activation_cache_mb=1024, receptive_field=None, explain=None, label_metrics=False,
                 segmentation_cache=None, segmentation_cache_mb=None):
        from jaxdissect.netdissect2017 import METHODS, label_category_index
        from jaxdissect.statistics import Plan

        if method not in METHODS:
            raise DissectError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        if quantile is None:
            quantile = 0.005 if method == "netdissect2017" else 0.01

        self.module, self.variables, self.data = module, variables, data
        self.segmentation = segmentation
        self.quantile, self.miniou, self.topk, self.thumbsize = quantile, miniou, topk, thumbsize
        self.geometry, self.progress, self.checkpoint_every = geometry, progress, checkpoint_every
        self.row0_competes, self.settings = bool(row0_competes), dict(settings or {})
        if not 0 < quantile < 1:
            raise DissectError(f"quantile must be in (0, 1), got {quantile}")
        self.receptive_field = parse_geometry(geometry, receptive_field)
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.devices = self.mesh.size
        total = len(data)
        if num_images is not None and num_images > total:
            raise DissectError(f"num_images={num_images} but {data.name} has only {total} items")
        self.num_images = int(num_images or total)
        if self.num_images < 1:
            raise DissectError(f"nothing to dissect: {data.name} is empty")
        probe = self.probe = data.get_batch([0])
        self.input_key, x0 = _model_input(probe)
        self.generator = self.input_key == "z"
        self.layers = list(layers)
        if len(set(self.layers)) != len(self.layers):
            raise DissectError(f"layers listed twice: {self.layers}")
        if views is not None:
            if self.layers:
                raise DissectError(f"give layers or views, not both (layers {self.layers}); list every layer as "
                                   "a view: views={name: (layer, None)}")
            self.views = {str(v): (str(layer), None if m is None else np.asarray(m, np.float32))
                          for v, (layer, m) in dict(views).items()}
            self.layers = list(self.views)
        else:
            self.views = {n: (n, None) for n in self.layers}
        if not self.layers:
            raise DissectError("no layers to dissect")
        self.captured = list(dict.fromkeys(layer for layer, _ in self.views.values()))
        layer_shapes = _resolve_layers(module, variables, x0[:1], self.captured)
        self.shapes = {v: layer_shapes[layer] for v, (layer, _) in self.views.items()}
        for v, (layer, m) in self.views.items():
            c = int(self.shapes[v][-1])
            if m is not None and m.shape != (c, c):
                raise DissectError(f"{v}: a {'x'.join(map(str, m.shape))} rotation cannot act on layer {layer} "
                                   f"with {c} channels; build it for {c} channels "
                                   f"(jaxdissect.rotation.random_rotation_powers({c}, ...))")
        out = jax.eval_shape(lambda v, x: module.apply(v, x), variables, x0[:1])
        if self.generator:
            if not (isinstance(out, jax.ShapeDtypeStruct) and len(out.shape) == 4 and out.shape[-1] == 3):
                raise DissectError(f"a z data source needs a generator that outputs NHWC RGB images; "
                                   f"{type(module).__name__} outputs {out}")
            image_size = out.shape[1:3]
        else:
            image_size = x0.shape[1:3]
        self.image_size = tuple(int(s) for s in image_size)
        bs = batch_size or (10 if self.generator else 16)
        self.batch_size = -(-bs // self.devices) * self.devices
        self._setup_segmentation(probe, resolution)
        self.activation_cache_mb = activation_cache_mb
        self.cache = None
        self.segmentation_cache, self.segmentation_cache_mb = segmentation_cache, segmentation_cache_mb
        self.segcache, self.segcache_opened = None, False
        self.segmented = self.segmented_from_cache = 0  # images sent to the segmenter / read from its cache
        self.num_batches = -(-self.num_images // self.batch_size)
        self.output_dir = output_dir
        self.name = name or f"{type(module).__name__} {data.name} {self.seg_name}"
        by_category = {}
        if method == "netdissect2017":
            index = label_category_index(self.label_categories, self.categories)
            if not (index >= 0).any():
                raise DissectError(f"method netdissect2017 needs labels with categories; none of the "
                                   f"{len(self.label_names)} labels of {data.name} has one of {self.categories}")
            by_category = dict(label_category=tuple(int(c) for c in index), num_categories=len(self.categories))
        self.plans = {
            n: Plan(num_units=int(self.shapes[n][-1]), num_labels=len(self.label_names),
                    source_hw=tuple(int(v) for v in self.shapes[n][1:3]), resolution=self.resolution,
                    quantile=float(quantile), topk=int(topk), geometry=geometry, **self.receptive_field,
                    **by_category)
            for n in self.layers}
        self.config = {
            "model": {"class": f"{type(module).__module__}.{type(module).__name__}",
                      "variables": segcache.variables_digest(variables)},
            # One digest of the segmenter (variables, labels, static settings): the run's identity and the cache key.
            "data": data.fingerprint(), "segmentation": segcache.segmenter_digest(segmentation),
            "layers": self.layers, "quantile": quantile, "topk": topk, "geometry": geometry,
            "resolution": list(self.resolution), "num_images": self.num_images,
            "batch_size": self.batch_size, "devices": self.devices,
        }
        if self.receptive_field:
            self.config["receptive_field"] = _json_receptive_field(self.receptive_field)
        if method != "pnas":
            self.config["method"] = method
        self.explain = dict(explain) if explain else None
        self.collector = None
        self.explained = {}
        if self.explain:
            if jax.process_count() > 1:
                raise DissectError("formulas and significance run in one process; drop them for a multi-host run")
            self.config["explain"] = self.explain
        self.label_metrics = bool(label_metrics)
        self.metrics = {}
        if self.label_metrics:
            from jaxdissect.explain.unit_metrics import AUPRC_BINS

            if jax.process_count() > 1:
                raise DissectError("label metrics run in one process; drop label_metrics for a multi-host run")
            self.config["label_metrics"] = {"auprc_bins": AUPRC_BINS}
        if views is not None:
            self.config["views"] = {v: [layer, None if m is None else _hash_array(m)]
                                    for v, (layer, m) in self.views.items()}

    # -- segmentation ------------------------------------------------------
    def _setup_segmentation(self, probe, resolution):
        h, w = self.image_size
        if isinstance(self.segmentation, str):
            if self.segmentation != "dataset":
                raise DissectError(f"segmentation must be (segmenter, variables) or 'dataset', "
                                   f"got {self.segmentation!r}")
            if "seg" not in probe and "image_labels" not in probe:
                raise DissectError(f"{self.data.name} provides no segmentation ('seg' or 'image_labels'); "
                                   "pass a segmenter (jaxdissect.load_segmenter) instead of 'dataset'")
            seg_res = tuple(int(s) for s in probe["seg"].shape[-2:]) if "seg" in probe else (h // 4, w // 4)
            self.seg_channels = (int(probe["seg"].shape[1]) if "seg" in probe else 1) + (
                int(np.asarray(probe["image_labels"]).shape[1]) if "image_labels" in probe else 0)
            self.label_names = [str(n) for n in self.data.label_names]
            self.label_categories = [str(c) for c in self.data.label_categories]
            self.categories = [str(c) for c in self.data.categories]
            self.seg_name = "dataset"
        else:
            from jaxdissect.segmentation import segment

            seg, seg_vars = self.segmentation
            tables = []

            def shapes(v, x):  # traced only: the label tables and the output shape, nothing is segmented
                labels, names, cats = segment(seg, v, x, downsample=4)
                tables.append((names, cats))
                return labels

            # Traced at the shape and placement of the run's batches, so the segmenter's jit reuses
            # this trace instead of tracing the network again (about 1 s for the UPP segmenter).
            batch = jax.ShapeDtypeStruct((self.batch_size, h, w, 3), jnp.float32,
                                         sharding=parallel.batch_sharding(self.mesh))
            labels = jax.eval_shape(shapes, seg_vars, batch)
            names, cats = tables[0]
            seg_res = tuple(int(s) for s in labels.shape[-2:])
            self.seg_channels = int(labels.shape[1])
            if seg_res != (h // 4, w // 4):
                raise DissectError(
                    f"the segmenter returns {seg_res[0]}x{seg_res[1]} label maps for {h}x{w} images; the "
                    f"dissection compares at {h // 4}x{w // 4} (downsample 4). Use a segmenter that "
                    "honours downsample=4 for this image size")
            self.label_names, self.label_categories, self.categories = _label_tables(seg, names, cats)
            self.seg_name = getattr(seg, "setting", "segmenter")
        if resolution is not None and tuple(resolution) != seg_res:
            raise DissectError(
                f"resolution {tuple(resolution)} requested but the segmentation is {seg_res[0]}x"
                f"{seg_res[1]}; activations are compared at the segmentation's resolution, so drop "
                "resolution= or use a segmentation of that size")
        if len(self.label_categories) != len(self.label_names):
            raise DissectError(f"{len(self.label_names)} label names but {len(self.label_categories)} "
                               "label categories; give one category per label")
        self.resolution = seg_res

    def open_segmentation_cache(self):
        """The on-disk segmentation cache entry of this run (opened on first use), or None."""
        if not self.segcache_opened:
            self.segcache_opened = True
            if self.segmentation_cache and not isinstance(self.segmentation, str):
                key = {"data": self.config["data"], "segmenter": self.config["segmentation"],
                       "downsample": 4, "image_size": list(self.image_size), "resolution": list(self.resolution),
                       "channels": self.seg_channels}
                if self.generator:  # what gets segmented is the generator's output
                    key["generator"] = self.config["model"]
                else:  # what gets segmented is the display image: catches another resize or crop of the data
                    key["input"] = _hash_array(np.asarray(self.probe.get("display", ()))[:1])
                tables = {"label_names": self.label_names, "label_categories": self.label_categories,
                          "categories": self.categories}
                self.segcache = segcache.open_cache(self.segmentation_cache, key, tables, self.seg_channels,
                                                    self.resolution, max_mb=self.segmentation_cache_mb,
                                                    log=lambda m: _say(self, m))
        return self.segcache

    def finish_segmentation(self):
        """Write what the segmentation cache still holds and log how many images were segmented."""
        cache = self.segcache
        if cache is not None:
            cache.flush()
        if isinstance(self.segmentation, str) or not (self.segmented or self.segmented_from_cache):
            return
        _say(self, f"segmenter: {self.segmented} images segmented, {self.segmented_from_cache} read from the "
                   "segmentation cache" + (f" ({cache.written} written to {cache.directory})" if cache else ""))

    def segment_batch(self, batch, output):
        """``(seg [B, K, S, S], image_labels [B, J] or None)`` for one batch (on the mesh).

        With a segmentation cache, a batch whose valid items are all cached is
        read from it and the segmenter does not run; otherwise the segmenter's
        labels of the valid items are stored (unreadable items never are).
        """
        if isinstance(self.segmentation, str):
            seg = batch.get("seg")
            if seg is None:
                b = batch["valid"].shape[0]
                seg = jnp.zeros((b, 1) + self.resolution, jnp.int32)
            elif tuple(seg.shape[-2:]) != self.resolution:
                raise DissectError(f"the data source's segmentation is {tuple(seg.shape[-2:])} in one batch, "
                                   f"{self.resolution} in the first; it must have one resolution")
            return seg, batch.get("image_labels")
        seg, seg_vars = self.segmentation
        cache = self.open_segmentation_cache()
        valid = np.asarray(batch["valid"], bool) if jax.process_count() == 1 else None
        if cache is not None:
            index = np.asarray(batch["index"])[valid]
            hit = cache.lookup(index)
            if hit is not None:
                labels = np.zeros((len(valid),) + hit.shape[1:], np.int32)
                labels[valid] = hit
                self.segmented_from_cache += len(index)
                return parallel.shard_batch(self.mesh, labels), None
        if self.generator:
            zc = output  # unclamped, as the original segments it
        else:
            zc = jnp.asarray(batch["display"], jnp.float32) / 127.5 - 1.0
        try:
            fn = _segmenter_fn(seg)
        except TypeError:  # an unhashable segmenter: compile for this call only
            fn = _segmenter_fn.__wrapped__(seg)
        labels = fn(seg_vars, zc)
        if tuple(labels.shape[-2:]) != self.resolution:
            raise DissectError(f"the segmenter returned {tuple(labels.shape[-2:])} label maps, expected "
                               f"{self.resolution}")
        self.segmented += int(valid.sum()) if valid is not None else int(labels.shape[0])
        if cache is not None:
            cache.store(index, labels if valid.all() else labels[np.flatnonzero(valid)])
        return labels, None

    # -- batches -----------------------------------------------------------
    def batches(self, keys):
        """``start -> iterator`` over this process's share of global batches ``start, start + 1, ...``.

        Each batch holds ``keys`` of the source plus ``valid`` and ``index``,
        padded to a fixed size; decoding runs in a background thread.
        """
        procs, pid = jax.process_count(), jax.process_index()
        if self.batch_size % procs:
            raise DissectError(f"batch size {self.batch_size} does not divide over {procs} processes")
        local = self.batch_size // procs
        template = {k: np.asarray(v)[:0] for k, v in self.probe.items() if k in keys}

        def make(start):
            def generate():
                for b in range(start, self.num_batches):
                    lo = b * self.batch_size + pid * local
                    real = np.arange(lo, min(lo + local, self.num_images))
                    if real.size:
                        full = self.data.get_batch(real)
                        batch = {k: np.asarray(v) for k, v in full.items() if k in keys}
                        valid = np.asarray(full.get("valid", np.ones(real.size, bool)), bool)
                    else:
                        batch, valid = dict(template), np.zeros(0, bool)
                    batch["valid"] = valid
                    batch["index"] = real.astype(np.int32)
                    yield loader.pad_batch(batch, local)

            return loader.prefetch(generate(), 2)

        return make

    # -- compute -----------------------------------------------------------
    def forward_fn(self):
        """Jitted ``(variables, x) -> (output, {view: float32 activation})``: one pass, every layer.

        A view is a captured layer, rotated over its channels when it has a matrix.
        """
        spec = tuple((v, layer, m is not None) for v, (layer, m) in self.views.items())
        try:
            f = _forward(self.module, tuple(self.captured), spec)
        except TypeError:  # an unhashable module: compile for this run only
            f = _forward.__wrapped__(self.module, tuple(self.captured), spec)
        if getattr(self, "_matrices", None) is None:
            self._matrices = jax.device_put(
                {v: m for v, (_, m) in self.views.items() if m is not None},
                jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        matrices = self._matrices
        return lambda variables, x: f(variables, x, matrices)

    def replicated_variables(self):
        if getattr(self, "_params", None) is None:
            self._params = jax.device_put(self.variables, jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec()))
        return self._params

    # -- activation cache --------------------------------------------------
    def cache_bytes(self) -> int:
        """Host bytes to keep every layer's activations and the labels of all images between passes."""
        per_image = sum(int(np.prod(self.shapes[n][1:])) * 4 for n in self.layers)
        per_image += self.seg_channels * self.resolution[0] * self.resolution[1] * 4
        return per_image * self.num_batches * self.batch_size

    def plan_cache(self) -> bool:
        """Decide (and log) whether pass 1 keeps what passes 2 and 3 need, within the budget."""
        self.open_segmentation_cache()  # before the passes: its log lines come before the progress bars
        need = self.cache_bytes()
        budget = int(self.activation_cache_mb or 0) * 2**20
        fits = 0 < need <= budget and jax.process_count() == 1
        _say(self, f"activation cache: {need / 2**20:.0f} MiB for {self.num_images} images "
                   + (f"within the budget of {budget / 2**20:.0f} MiB: the model, decoding and segmentation run "
                      "once per image" if fits else
                      f"over the budget of {budget / 2**20:.0f} MiB (activation_cache_mb): passes 2 and 3 read "
                      "and run the model again"))
        return fits

    def run_pass(self, wd, name, init, keys, extra_config=None, host=None):
        """One resumable pass of the per-device update of pass ``name`` over every layer.

        Pass 1 fills ``self.cache`` (activations, labels, valid, index per
        batch) when it runs from the first batch and the cache fits; later
        passes then read the cache instead of the data and the model.
        ``host = (host_init, fold)``: the update also returns per-batch
        outputs, folded on the host by ``fold(host_state, outputs, batch)``
        into a NumPy state checkpointed with the device state.
        """
        forward, params = self.forward_fn(), self.replicated_variables()
        step_update = _update(name, tuple(self.plans.items()), self.mesh)
        fill = name == "pass1" and self.cache is not None
        use_cache = name != "pass1" and self.cache is not None and len(self.cache) == self.num_batches
        need_seg = name in ("pass3", "metrics") or fill
        need_output = self.generator and need_seg and not isinstance(self.segmentation, str)
        if fill:
            keys = self.label_keys()

        def step(state, batch):
            batch = parallel.shard_batch(self.mesh, batch)
            if use_cache:
                acts = batch.pop("acts")
            else:
                out, acts = forward(params, batch[self.input_key])
            extra = {"batch_id": batch["index"] // self.batch_size}
            if use_cache:
                extra.update({k: v for k, v in batch.items() if k in ("seg", "image_labels")})
            elif need_seg:
                seg, image_labels = self.segment_batch(batch, out if need_output else None)
                extra["seg"] = seg
                if image_labels is not None:
                    extra["image_labels"] = image_labels
            if name == "pass3" and self.collector is not None:
                self.collect(batch, acts, extra)
            if fill:
                self.cache.append({"acts": {n: np.asarray(a) for n, a in acts.items()},
                                   "valid": np.asarray(batch["valid"]), "index": np.asarray(batch["index"]),
                                   **{k: np.asarray(v) for k, v in extra.items() if k in ("seg", "image_labels")}})
            b = {"valid": batch["valid"], "index": batch["index"], **extra}
            if host is None:
                return step_update(state, acts, b)
            device, outputs = step_update(state["device"], acts, b)
            return {"device": device, "host": host[1](state["host"], outputs, b)}

        if use_cache:
            batches = lambda start: iter(self.cache[start:])  # noqa: E731
        else:
            batches = self.batches(keys)
        config = {**self.config, "pass": name, **(extra_config or {})}
        state = parallel.stack_init(self.mesh, init)
        if host is not None:
            state = {"device": state, "host": host[0]}
        if name != "pass1":
            _say(self, f"{name}: " + ("reading the activation cache" if use_cache else "reading the data"))
        state = streaming.run_stream(
            step, state, batches, num_batches=self.num_batches,
            workdir=os.path.join(wd.directory, name), config=config,
            checkpoint_every=self.checkpoint_every, desc=f"dissect {name}",
            progress=None if self.progress else False)
        if fill and len(self.cache) != self.num_batches:
            # Pass 1 resumed from a checkpoint: the cache misses its first batches, so recompute.
            _say(self, "pass 1 resumed from a checkpoint: passes 2 and 3 run the model again")
            self.cache = None
        return state

    def collect(self, batch, acts, extra):
        """Write this batch's unit masks (upsampled act > threshold) and concept masks to the pass's work dir."""
        valid = np.asarray(batch["valid"], bool)
        number = int(np.asarray(batch["index"])[0]) // self.batch_size
        masks = {n: np.asarray(_unit_mask_fn(p)(acts[n], self._thresholds[n])) for n, p in self.plans.items()}
        self.collector.add(number, masks, extra["seg"], extra.get("image_labels"), valid)

    def explain_layers(self, results_dir):
        """Formulas and significance per layer from the collected masks; saved as ``explain-<layer>.json``."""
        from jaxdissect.explain.pipeline import explain_layer

        for n in self.layers:
            _say(self, f"{n}: " + ", ".join(
                ([f"formulas of length {self.explain['formulas']}" + (" (exact)" if self.explain["exact"] else "")]
                 if self.explain["formulas"] else []) +
                ([f"significance ({self.explain['permutations']} permutations)"]
                 if self.explain["permutations"] else [])))
            units, concepts, num_images = self.collector.masks(n)
            self.explained[n] = explain_layer(
                units, concepts, self.label_names, num_images, length=self.explain["formulas"],
                exact=self.explain["exact"], permutations=self.explain["permutations"], q=self.explain["q"])
        self.collector = None

    def label_keys(self):
        """Data keys pass 3 needs: the model input and what gets segmented (or the dataset's labels)."""
        if isinstance(self.segmentation, str):
            return self.model_keys() + ("seg", "image_labels")
        return self.model_keys() + (() if self.generator else ("display",))

    def model_keys(self):
        return (self.input_key,)

    def pass1(self, wd):
        """Quantile high-bit histograms, top-k, mean and max: ``{layer: (selection, stats)}``."""
        from jaxdissect.statistics import DissectionError

        plans = self.plans
        state = self.run_pass(wd, "pass1", {n: p.pass1_init(self.num_images) for n, p in plans.items()}, self.model_keys())
        state = parallel.to_host(state)
        out = {}
        for n, p in plans.items():
            try:
                out[n] = p.pass1_finish(state[n])
            except DissectionError as e:
                raise DissectError(f"layer {n}: {e} (batches of {self.batch_size} images)") from e
        return out

    def pass2(self, wd, selections):
        """Exact thresholds ``{layer: [U]}``."""
        plans = self.plans
        init = {n: p.pass2_init(selections[n]) for n, p in plans.items()}
        state = parallel.to_host(self.run_pass(wd, "pass2", init, self.model_keys()))
        return {n: p.pass2_finish(selections[n], state[n]) for n, p in plans.items()}

    def pass3(self, wd, thresholds):
        """IoU counts ``{layer: counts}`` at the exact thresholds."""
        from jaxdissect.statistics import DissectionError

        plans = self.plans
        keys = self.label_keys()
        init = {n: p.pass3_init(thresholds[n]) for n, p in plans.items()}
        if self.explain:
            # One mask file per batch, written inside the step (before its checkpoint): pass 3 resumes.
            from jaxdissect.explain.pipeline import MaskCollector

            self.collector = MaskCollector(os.path.join(wd.directory, "pass3", "masks"), self.layers,
                                           len(self.label_names), self.num_batches)
            self._thresholds = {n: jnp.asarray(t, jnp.float32) for n, t in thresholds.items()}
        state = self.run_pass(wd, "pass3", init, keys,
                              extra_config={"thresholds": {n: _hash_array(t) for n, t in thresholds.items()}})
        state = parallel.to_host(state)
        try:
            return {n: p.pass3_finish(state[n]) for n, p in plans.items()}
        except DissectionError as e:
            raise DissectError(f"{self.data.name}: {e}") from e

    def metrics_pass(self, wd, results):
        """Label metrics of every unit against its label (``jaxdissect.explain.unit_metrics``): one more
        resumable pass (from the activation cache when pass 1 filled it); sets ``self.metrics``."""
        from jaxdissect.explain import unit_metrics

        init = {n: unit_metrics.init(r.thresholds, r.label, r.act_mean, r.act_max) for n, r in results.items()}
        host_init = {n: unit_metrics.HostSums.init(self.num_images, len(r.thresholds)) for n, r in results.items()}

        def fold(state, outputs, b):
            outputs = jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]), outputs)
            index, valid = np.asarray(b["index"]), np.asarray(b["valid"])
            return {n: unit_metrics.HostSums.add(state[n], outputs[n], index, valid) for n in state}

        state = self.run_pass(wd, "metrics", init, self.label_keys(), host=(host_init, fold), extra_config={
            "labels": {n: _hash_array(np.asarray(r.label, np.int32)) for n, r in results.items()},
            "thresholds": {n: _hash_array(np.asarray(r.thresholds, np.float32)) for n, r in results.items()}})
        device = parallel.to_host(state["device"])
        for n in self.layers:
            self.metrics[n] = unit_metrics.unit_entries(unit_metrics.finish(device[n], state["host"][n]))

    def result(self, name, selection_stats, thresholds, counts):
        from jaxdissect.kernels import iou as iou_k
        from jaxdissect.kernels import labels as labels_k
        from jaxdissect.statistics import DissectionResult

        _, stats = selection_stats
        config = {}
        if self.method == "netdissect2017":
            from jaxdissect import netdissect2017

            scores = netdissect2017.score(counts["intersection"], counts["category_active"],
                                          counts["label_pixels"], self.plans[name].label_category)
            iou, label, label_iou = scores.iou, scores.label, scores.score
            interpretable = (label_iou >= self.miniou) & (label > 0)  # the 2017 report's rule
            config = {"method": self.method, "category_names": self.categories}
        else:
            iou = iou_k.iou(counts["intersection"], counts["active"], counts["label_pixels"])
            label, label_iou, interpretable = (np.asarray(x) for x in labels_k.best_labels(
                iou, miniou=self.miniou, row0_competes=self.row0_competes))
        if self.views[name][1] is not None:
            config["rotated_layer"] = self.views[name][0]
        return DissectionResult(
            thresholds=np.asarray(thresholds, np.float32), iou=iou, label=label.astype(np.int64),
            label_iou=label_iou.astype(np.float64), interpretable=interpretable.astype(bool),
            pixels=int(counts["pixels"]), label_pixels=counts["label_pixels"], active=counts["active"],
            intersection=counts["intersection"], top_values=stats["top_values"], top_index=stats["top_index"],
            act_mean=stats["mean"], act_max=stats["max"], images=int(stats["images"]),
            label_names=self.label_names, categories=self.label_categories,
            config={"layer": name, "quantile": self.quantile, "miniou": self.miniou, "topk": self.topk,
                    "row0_competes": self.row0_competes,
                    "geometry": self.geometry, "resolution": list(self.resolution),
                    **({"receptive_field": _json_receptive_field(self.receptive_field)}
                       if self.receptive_field else {}),
                    "num_images": self.num_images, **config},
            category_active=counts.get("category_active"))

    # -- thumbnails --------------------------------------------------------
    def strips(self, results: Mapping[str, Any]) -> dict[str, dict[int, np.ndarray]]:
        """Per layer ``{unit: strip}``: each unit's top images, its region above threshold highlighted.

        Only the images in some unit's top ``STRIP_IMAGES`` are read again; their
        activations are recomputed (every layer in one forward pass per batch).
        """
        from jaxdissect.reports import strips as strip_lib

        wanted: dict[int, list] = {}
        for name, r in results.items():
            for u, row in enumerate(np.asarray(r.top_index)[:, :STRIP_IMAGES]):
                for rank, image in enumerate(row):
                    if image >= 0:
                        wanted.setdefault(int(image), []).append((name, u, rank))
        thumbs: dict[tuple, np.ndarray] = {}
        forward = self.forward_fn()
        order = sorted(wanted)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = self.data.get_batch(chunk)
            x = loader.pad_batch({"x": np.asarray(batch[self.input_key])}, self.batch_size)["x"]
            out, acts = forward(self.replicated_variables(), parallel.shard_batch(self.mesh, x))
            display = _to_bytes_zc(out) if self.generator else np.asarray(batch["display"])
            # The receptive-field grid highlights the region the IoU counted, not the default bilinear one.
            masks = ({n: np.asarray(_unit_mask_fn(self.plans[n])(a, jnp.asarray(results[n].thresholds, jnp.float32)))
                      for n, a in acts.items() if n in results} if self.geometry == "receptive_field" else {})
            acts = {n: np.asarray(a) for n, a in acts.items()}
            for j, image in enumerate(chunk):
                for name, u, rank in wanted[image]:
                    thumbs[(name, u, rank)] = strip_lib.masked_thumbnail(
                        display[j], acts[name][j, :, :, u], float(results[name].thresholds[u]), self.thumbsize,
                        mask=masks[name][j, :, :, u] if name in masks else None)
        out_strips = {}
        for name, r in results.items():
            per_unit = {}
            for u in range(len(r.thresholds)):
                images = [thumbs[(name, u, k)] for k in range(STRIP_IMAGES) if (name, u, k) in thumbs]
                if images:
                    per_unit[u] = strip_lib.unit_strip(images)
            out_strips[name] = per_unit
        return out_strips

    # -- outputs -----------------------------------------------------------
    def report_units(self, name, result):
        """``report.json`` units, with the formulas and p-values of the layer when they were asked for."""
        from jaxdissect.reports import report_json

        units = report_json.report_units(result)
        for u, extra in zip(units, self.explained.get(name, ())):
            u.update(extra)
        for u, entry in zip(units, self.metrics.get(name, ())):
            u["metrics"] = entry
        return units

    def layer_dir(self, name):
        return os.path.join(self.output_dir, name.replace("/", "_"))

    def header_name(self, skipped):
        return self.name + (f" ({skipped} unreadable images skipped)" if skipped else "")

    def write_layer(self, name, result, strips, skipped):
        from jaxdissect.reports import bargraph, report_json, strips as strip_lib

        d = self.layer_dir(name)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, "arrays.tmp.npz")
        np.savez(tmp, **layer_arrays(result))
        os.replace(tmp, os.path.join(d, "arrays.npz"))
        strip_lib.save_strips(d, strips)
        units = self.report_units(name, result)
        bargraph.write_concept_bargraph(os.path.join(d, "concepts_99.svg"), units, self.miniou)
        report_json.write_report_json(os.path.join(d, "report.json"), self.header_name(skipped), units)
        if self.method == "netdissect2017":
            from jaxdissect import netdissect2017

            netdissect2017.write_layer_files(d, name, result, self.miniou)

    def write_run(self, results, skipped):
        from jaxdissect.reports import html, summary

        units = {n: self.report_units(n, results[n]) for n in self.layers}
        rows = summary.layer_summary([(n, units[n]) for n in self.layers], self.miniou)
        if self.explain and self.explain["permutations"]:
            for n, row in zip(self.layers, rows):
                row["significant"] = sum(bool(u.get("significant")) for u in units[n])
        if self.label_metrics:
            from jaxdissect.explain import unit_metrics

            for n, row in zip(self.layers, rows):
                row.update(unit_metrics.medians(self.metrics[n]))
        summary.write_summary(self.output_dir, rows, title=self.header_name(skipped))
        layers = []
        for n, row in zip(self.layers, rows):
            r = results[n]
            shown = [dict(u, interpretable=bool(r.interpretable[i]), dead=bool(np.asarray(r.active)[i] == 0))
                     for i, u in enumerate(units[n])]
            layer_summary = {"units": row["units"], "interpretable": row["interpretable"],
                             "never fire": sum(u["dead"] for u in shown),
                             "unique concepts": row["unique_concepts"],
                             "images": self.num_images - skipped, "skipped images": skipped}
            if self.explain and self.explain["permutations"]:
                layer_summary[f"significant at q = {self.explain['q']:g}"] = sum(
                    bool(u.get("significant")) for u in shown)
            if self.method == "netdissect2017":
                from jaxdissect import netdissect2017

                layer_summary.update(netdissect2017.summary_numbers(r, self.miniou))
            if self.label_metrics:
                layer_summary["median label metrics"] = "; ".join(
                    f"{lvl}: " + ", ".join(f"{m} {row[f'median_{lvl}_{m}']:.3f}" for m in unit_metrics.METRIC_NAMES)
                    for lvl in ("pixel", "image"))
            layers.append({"name": n, "dir": os.path.basename(self.layer_dir(n)), "units": shown,
                           "svg": "concepts_99.svg", "summary": layer_summary})
        settings = {"model": type(self.module).__name__, "data": f"{self.data.name} ({self.num_images} items)",
                    "segmenter": self.seg_name}
        settings.update(self.settings)
        settings.update({"images read": self.num_images - skipped,
                         "quantile": f"{self.quantile:g} (threshold: each unit's top {self.quantile:.2%} of "
                                     "activations)",
                         "IoU cut-off": f"{self.miniou:g} (a unit is a detector when its best IoU exceeds it)",
                         "geometry": self.geometry})
        if self.method != "pnas":
            settings["method"] = self.method
        if self.explain:
            if self.explain["formulas"]:
                settings["formulas"] = (f"up to {self.explain['formulas']} concepts, "
                                        + ("exact (branch and bound)" if self.explain["exact"] else "beam search"))
            if self.explain["permutations"]:
                settings["significance"] = (f"image-permutation p-values ({self.explain['permutations']} "
                                            f"permutations), Benjamini-Hochberg q over every tested pair")
        if self.label_metrics:
            settings["label metrics"] = unit_metrics.describe()
            settings["label metric checks"] = unit_metrics.SANITY
        skipped_files = sorted(str(v) for v in getattr(self.data, "bad_files", {}).values())
        return html.write_run_report(self.output_dir, self.header_name(skipped), layers, settings=settings,
                                     skipped_files=skipped_files,
                                     **({"q": self.explain["q"]} if self.explain else {}))


@functools.lru_cache(maxsize=16)
def _forward(module, layers: tuple[str, ...], views: tuple):
    """Jitted forward pass capturing ``layers`` (cached, so repeated dissections compile once).

    ``views`` is ``((name, layer, rotated), ...)``; a rotated view is
    ``a' = R a`` over the channels with ``R = matrices[name]``, right after capture.
    """
    from jaxdissect.layers import capture
    from jaxdissect.rotation import rotate_activations

    @jax.jit
    def forward(variables, x, matrices):
        out, acts = capture(module, variables, x, layers)
        acts = {n: jnp.asarray(a, jnp.float32) for n, a in acts.items()}
        return out, {v: rotate_activations(acts[layer], matrices[v]) if rotated else acts[layer]
                     for v, layer, rotated in views}

    return forward


@functools.lru_cache(maxsize=8)
def _segmenter_fn(segmenter):
    """Jitted ``(variables, images in [-1, 1]) -> labels [N, K, H/4, W/4]``.

    Under ``jit`` ``segment`` skips its host-side range check, so a generator
    output that overshoots [-1, 1] a little is segmented as it is (as the
    original does) instead of stopping the run.
    """
    from jaxdissect.segmentation import segment

    return jax.jit(lambda variables, images: segment(segmenter, variables, images, downsample=4)[0])


@functools.lru_cache(maxsize=32)
def _unit_mask_fn(plan):
    """Jitted ``(acts [B, h, w, U], thresholds [U]) -> bool [B, S, S, U]``: the masks pass 3 counts."""
    return jax.jit(lambda acts, t: plan.upsample(acts) > t)


@functools.lru_cache(maxsize=32)
def _update(name: str, plans: tuple, mesh):
    """The per-device step of pass ``name`` for every ``(layer, Plan)`` in ``plans`` (cached)."""
    plans = dict(plans)

    def update(state, acts, b):
        if name == "pass1":
            return {n: p.pass1_update(state[n], acts[n], b["valid"], b["index"], b["batch_id"])
                    for n, p in plans.items()}
        if name == "pass2":
            return {n: p.pass2_update(state[n], acts[n], b["valid"]) for n, p in plans.items()}
        if name == "metrics":
            from jaxdissect.explain import unit_metrics

            out = {n: unit_metrics.update(state[n], p.upsample(acts[n]), acts[n], b["seg"], b["valid"],
                                          b.get("image_labels")) for n, p in plans.items()}
            return {n: o[0] for n, o in out.items()}, {n: o[1] for n, o in out.items()}
        return {n: p.pass3_update(state[n], acts[n], b["seg"], b["valid"], b["batch_id"], b.get("image_labels"))
                for n, p in plans.items()}

    return parallel.per_device(update, mesh)


def layer_arrays(result) -> dict[str, np.ndarray]:
    """The arrays of ``arrays.npz``: thresholds, IoU, labels, top-k, counts, activation mean/max."""
    names = ("thresholds", "iou", "label", "label_iou", "interpretable", "top_values", "top_index",
             "label_pixels", "active", "intersection", "act_mean", "act_max")
    out = {k: np.asarray(getattr(result, k)) for k in names}
    out["pixels"] = np.asarray(result.pixels)
    out["images"] = np.asarray(result.images)
    return out


def _hash_array(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()[:16]


GEOMETRIES = ("original", "clamped", "receptive_field")


def parse_geometry(geometry, receptive_field) -> dict:
    """``Plan`` keywords (``convolutions``, ``image_size``) of the geometry; empty unless receptive_field."""
    if geometry not in GEOMETRIES:
        raise DissectError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    if geometry != "receptive_field":
        if receptive_field is not None:
            raise DissectError(f"receptive_field is given but geometry is {geometry!r}; pass "
                               "geometry='receptive_field' to use it")
        return {}
    if not isinstance(receptive_field, Mapping) or "convolutions" not in receptive_field:
        raise DissectError("geometry='receptive_field' needs receptive_field={'convolutions': [(kernel, stride, "
                           "padding, dilation), ...], 'image_size': N} (a converted AlexNet's model.json "
                           "records it as metadata['upsample'])")
    try:
        convs = tuple(tuple(int(v) for v in c) for c in receptive_field["convolutions"])
        size = receptive_field.get("image_size")
        size = None if size is None else int(size)
    except (TypeError, ValueError) as e:
        raise DissectError(f"receptive_field: convolutions must be (kernel, stride, padding, dilation) integer "
                           f"tuples and image_size an integer ({e})") from None
    if not convs or any(len(c) != 4 or c[0] < 1 or c[1] < 1 or c[2] < 0 or c[3] < 1 for c in convs):
        raise DissectError(f"receptive_field: convolutions must be a non-empty list of (kernel >= 1, stride >= 1, "
                           f"padding >= 0, dilation >= 1), got {receptive_field['convolutions']!r}")
    if size is not None and upsample_k.conv_output_size(size, convs) < 1:
        raise DissectError(f"receptive_field: image_size {size} is too small for the convolutions")
    extra = set(receptive_field) - {"convolutions", "image_size"}
    if extra:
        raise DissectError(f"receptive_field: unknown keys {sorted(extra)}; use convolutions and image_size")
    return {"convolutions": convs, "image_size": size}


def _json_receptive_field(rf: dict) -> dict:
    return {"convolutions": [list(c) for c in rf["convolutions"]], "image_size": rf["image_size"]}


def _label_tables(segmenter, names, cats):
    """(label names, category per label, category list) from what ``segment`` returns."""
    names = [str(n) for n in names]
    per_label = [str(c) for c in cats]
    if len(per_label) != len(names):
        raise DissectError(f"the segmenter gives {len(names)} label names but {len(per_label)} categories")
    categories = getattr(segmenter, "categories", None) or list(dict.fromkeys(per_label))
    return names, per_label, [str(c) for c in categories]


def dissect(module, variables, layers: str | Sequence[str], data, segmentation="dataset", *,
            quantile: float | None = None, miniou: float = 0.04, topk: int = 100, thumbsize: int = 100,
            batch_size: int | None = None, output_dir: str | None = None, num_images: int | None = None,
            mesh=None, geometry: str = "original", progress: bool = True, name: str | None = None,
            checkpoint_every: int = 50, resolution: tuple[int, int] | None = None,
            row0_competes: bool = False, settings: Mapping[str, Any] | None = None, method: str = "pnas",
            views: Mapping[str, tuple] | None = None, activation_cache_mb: int = 1024,
            receptive_field: Mapping[str, Any] | None = None, formulas: int = 0,
            exact_formulas: bool = False, permutations: int = 0, q: float = 0.05,
            label_metrics: bool = False, segmentation_cache: str | None = None,
            segmentation_cache_mb: float | None = None) -> dict:
    """Dissect ``layers`` of ``module`` over ``data``; returns ``{layer: DissectionResult}``.

    Args:
      module, variables: a Flax Linen model and its variables (``jaxdissect.load_model``).
      layers: layer names ('.'-joined module paths, see ``jaxdissect.layer_names``).
      data: a data source (``PlacesFolder``, ``ImageFolder``, ``LatentSource``,
        ``BrodenSource``, ``SyntheticScenes`` or your own, see ``jaxdissect.data``).
      segmentation: ``(segmenter, variables)`` from ``jaxdissect.load_segmenter``, or
        ``'dataset'`` for the labels the data source provides.
      quantile: top fraction of each unit's upsampled activations that counts as
        "on" (0.01: threshold = the exact 0.99 quantile). Default: 0.01, or
        0.005 for ``method='netdissect2017'``.
      miniou: a unit is interpretable when its best IoU exceeds this (2017
        method: reaches it, as the 2017 report counted).
      topk: images tracked per unit (by raw per-image maximum); 5 are shown.
      thumbsize: thumbnail size in the unit strips.
      batch_size: images per step (rounded up to a multiple of the device count).
      output_dir: where reports and the resumable work directory (``work/``) go;
        None keeps nothing on disk (temporary work directory, no reports).
      num_images: dissect only the first ``num_images`` items.
      mesh: a ``jaxdissect.parallel.make_mesh`` mesh (default: all devices).
      geometry: activation upsampling, ``'original'`` (zero-padded borders, spec
        2.2), ``'clamped'``, or ``'receptive_field'`` (see ``jaxdissect.kernels.upsample``).
      receptive_field: with ``geometry='receptive_field'``, ``{'convolutions':
        [(kernel, stride, padding, dilation), ...], 'image_size': N}``: every
        layer is mapped onto the grid with this receptive-field composition (the
        original's AlexNet mode, spec 2.2: all layers up to pool5 at 227; a
        converted AlexNet's model.json has it as ``metadata['upsample']``).
        Unit strips highlight the region above threshold on that grid too.
      progress: show each pass's progress bar (rate, ETA) and log each step;
        False silences it (``jaxdissect.progress.set_enabled`` for everything).
      name: report header (default ``"<Model> <data> <segmentation>"``).
      checkpoint_every: batches between checkpoints of the streaming passes.
      resolution: the expected comparison resolution; an error if the
        segmentation's differs (by default it is the segmentation's).
      row0_competes: the original's quirk: label 0 (no label) competes for a unit's label.
      settings: extra ``{name: value}`` shown in the report's header (e.g. model, segmenter).
      method: ``'pnas'`` (IoU against every label, spec 3.1) or
        ``'netdissect2017'`` (Broden scoring per primary category with the
        category-conditioned activation count, :mod:`jaxdissect.netdissect2017`;
        writes ``<layer>/<layer>-result.csv`` and ``netdissect2017.json``).
      views: ``{name: (layer, R or None)}`` to dissect named views of
        captured layers instead of ``layers`` (results keyed by name): a view
        with a ``[C, C]`` matrix is the layer rotated over its channels,
        ``a' = R a`` right after capture and before the thresholds
        (``jaxdissect.rotation``); several views of one layer share the passes.
      activation_cache_mb: host memory budget for keeping every layer's
        activations and the labels from pass 1 to passes 2 and 3; within it
        the model, decoding and segmenter run once per image, otherwise
        (or after resuming pass 1 from a checkpoint) passes 2 and 3 run them
        again. The choice is logged. 0 = never cache.
      formulas: > 0: each unit's best formula of up to this many concepts
        (``jaxdissect.explain.compositional``; ``exact_formulas``: provably
        optimal instead of beam search), as ``formula``/``formula_iou``.
      permutations: > 0: image-permutation p-values of each unit's best label
        (and formula) with this many Monte Carlo draws, Benjamini-Hochberg
        ``q_value``/``significant`` at FDR ``q`` over every tested pair, and a
        bootstrap ``iou_ci``. Both add no pass: pass 3 writes the unit masks
        (act > threshold, segmentation resolution) and concept masks of each
        batch to ``work/pass3/masks`` (bit-packed per image, only the non-empty
        (unit or label, image) pairs), so it resumes like the other passes; one
        layer's masks are read back at a time, never as dense masks. Results go into ``report.json``, the
        summary and ``index.html``; the returned ``DissectionResult``s are unchanged.
      label_metrics: score every unit against its chosen label with IoU, F1,
        AUPRC, Pearson correlation and cosine, at pixel level (upsampled
        activations on the segmentation grid) and image level (each image's max
        raw activation vs the label present in it), in one more resumable pass
        that reads the activation cache when pass 1 filled it
        (:mod:`jaxdissect.explain.unit_metrics`). Pixel AUPRC is binned: 2048
        equal bins per unit over ``[-M, M]``, ``M`` = the unit's ``|act_max|``,
        each bin one tied step, with bounds that contain the exact value
        (``auprc_bounds``). Recall and precision are not reported: they fail
        NeuronEval's extra- and missing-labels checks. Written to ``report.json``
        (``units[i]['metrics'] = {'pixel': {...}, 'image': {...}}``, None for
        label 0), the summary (per-layer medians) and ``index.html``.
      segmentation_cache: a directory (e.g. the per-user cache) where the label
        maps of a ``(segmenter, variables)`` segmentation are kept on disk and
        shared by every later dissection of the same data (``jaxdissect.segmentation.cache``):
        a batch whose items are all there is not segmented again. None (the
        default): no disk cache. Results are identical either way.
      segmentation_cache_mb: size budget of ``segmentation_cache`` in MiB
        (None: unbounded); writing stops, with a log line, when it is reached.
    """
    layers = [layers] if isinstance(layers, str) else list(layers)
    run = _Run(module, variables, layers, data, segmentation, quantile=quantile, miniou=miniou,
               topk=topk, thumbsize=thumbsize, batch_size=batch_size, output_dir=output_dir,
               num_images=num_images, mesh=mesh, geometry=geometry, progress=progress, name=name,
               checkpoint_every=checkpoint_every, resolution=resolution, row0_competes=row0_competes,
               settings=settings, method=method, views=views, activation_cache_mb=activation_cache_mb,
               receptive_field=receptive_field,
               explain=_explain_settings(formulas, exact_formulas, permutations, q),
               label_metrics=label_metrics, segmentation_cache=segmentation_cache,
               segmentation_cache_mb=segmentation_cache_mb)
    if output_dir is not None:
        return _dissect(run, write=True)
    run.output_dir = tempfile.mkdtemp(prefix="jaxdissect-")
    try:
        return _dissect(run, write=False)
    finally:
        shutil.rmtree(run.output_dir, ignore_errors=True)


def _explain_settings(formulas, exact, permutations, q):
    """The formula/significance add-on's settings, or None when it is off (the default path)."""
    if int(formulas) < 0 or int(permutations) < 0:
        raise DissectError(f"formulas and permutations must be >= 0, got {formulas} and {permutations}")
    if exact and not formulas:
        raise DissectError("exact_formulas needs formulas > 0 (the formula length)")
    if not 0 < q < 1:
        raise DissectError(f"q must be in (0, 1), got {q}")
    if not formulas and not permutations:
        return None
    return {"formulas": int(formulas), "exact": bool(exact), "permutations": int(permutations), "q": float(q)}


def _say(run, message):
    if run.progress:
        logging.info("%s", message)


def _dissect(run: _Run, write: bool) -> dict:
    primary = jax.process_index() == 0
    wd = streaming.Workdir(os.path.join(run.output_dir, WORK))
    if primary:  # one worker per work directory (the others of a multi-host job share it)
        wd.lock()
    try:
        return _dissect_locked(run, wd, write, primary)
    finally:
        run.finish_segmentation()
        wd.unlock()


def _dissect_locked(run: _Run, wd, write: bool, primary: bool) -> dict:
    from jaxdissect.statistics import DissectionResult

    _check_config(wd, run.config, primary)
    results_dir = os.path.join(wd.directory, "results")
    if wd.done("results"):
        results = {n: DissectionResult.load(os.path.join(results_dir, n)) for n in run.layers}
        if run.explain:
            for n in run.layers:
                with open(os.path.join(results_dir, f"explain-{n}.json")) as f:
                    run.explained[n] = json.load(f)
        if run.label_metrics:
            for n in run.layers:
                with open(os.path.join(results_dir, f"metrics-{n}.json")) as f:
                    run.metrics[n] = json.load(f)
        _say(run, f"statistics of {', '.join(run.layers)} loaded from {results_dir}")
    else:
        t0 = time.perf_counter()
        run.cache = [] if run.plan_cache() else None
        _say(run, f"pass 1/3 over {run.num_images} items: quantile histograms, top-{run.topk} images")
        pass1 = run.pass1(wd)
        _say(run, "pass 2/3: exact thresholds")
        thresholds = run.pass2(wd, {n: sel for n, (sel, _) in pass1.items()})
        _say(run, "pass 3/3: IoU against the segmentation")
        counts = run.pass3(wd, thresholds)
        results = {n: run.result(n, pass1[n], thresholds[n], counts[n]) for n in run.layers}
        if run.label_metrics:
            _say(run, "label metrics: every unit against its label, at pixel and image level")
            run.metrics_pass(wd, results)
        if run.explain:
            run.explain_layers(results_dir)
        if primary:
            for n, r in results.items():
                r.save(os.path.join(results_dir, n))
                if run.explain:
                    _write_json(os.path.join(results_dir, f"explain-{n}.json"), run.explained[n])
                if run.label_metrics:
                    _write_json(os.path.join(results_dir, f"metrics-{n}.json"), run.metrics[n])
            _write_json(os.path.join(results_dir, "run.json"), {"seconds": time.perf_counter() - t0})
            wd.mark_done("results")
    skipped = run.num_images - int(results[run.layers[0]].images)
    if skipped:
        names = sorted(getattr(run.data, "bad_files", {}).values())
        logging.warning("%d of %d images could not be read and were left out%s", skipped,
                        run.num_images, ":\n  " + "\n  ".join(names) if names else "")
    if not write or not primary:
        return results
    todo = [n for n in run.layers if not wd.done(f"layer-{n}")]
    if todo:
        _say(run, f"unit strips and reports for {', '.join(todo)}")
        strips = run.strips({n: results[n] for n in todo})
        for n in todo:
            run.write_layer(n, results[n], strips[n], skipped)
            wd.mark_done(f"layer-{n}")
    run.write_run(results, skipped)
    return results


def _check_config(wd, config, primary=True):
    path = os.path.join(wd.directory, "config.json")
    normalized = json.loads(json.dumps(config, sort_keys=True, default=_json_default))
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored != normalized:
            diff = sorted(k for k in set(stored) | set(normalized) if stored.get(k) != normalized.get(k))
            raise DissectError(
                f"{os.path.dirname(wd.directory)} holds a dissection with other settings (differing: "
                f"{', '.join(diff)}); choose another output_dir or delete {wd.directory} to recompute")
    elif primary:
        _write_json(path, normalized)
