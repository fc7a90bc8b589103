"""Dissect any number of layers of a model in three streaming passes over the data.

``dissect(module, variables, layers, data, segmentation)`` labels every unit of
every requested layer with the concept its top-quantile region matches best
(spec 3.1). All layers share the same passes; the model runs once per image
per pass (capturing every layer at once) and the segmenter once per image:

1. per unit: high-bit histogram of the upsampled activations (exact quantile,
   first half), top-k images by the raw per-image maximum, mean and max;
2. low-bit histogram inside the buckets that hold the quantile -> exact
   thresholds ``T_u`` (the ``1 - quantile`` quantile, 0.99 by default);
3. IoU counts of ``upsampled act > T_u`` against the segmentation.

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

Passes go through ``jaxdissect.streaming.run_stream`` under
``output_dir/work``: a killed run resumes from its last checkpoint, and
finished passes and per-layer outputs are never recomputed. Outputs per layer
in ``output_dir/<layer>/``: ``report.json`` (spec 3.1), ``arrays.npz``,
``image/unit<u>.jpg`` strips (top 5 images, region above ``T_u`` highlighted),
``concepts_99.svg``; for the run: ``index.html`` and ``summary.*``.
"""

from __future__ import annotations

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
from jaxdissect.data import loader


class DissectError(ValueError):
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


def _fingerprint_variables(variables) -> str:
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _segmenter_fingerprint(segmentation) -> Any:
    if isinstance(segmentation, str):
        return segmentation
    seg, seg_vars = segmentation
    return {"segmenter": repr(seg)[:2000], "variables": _fingerprint_variables(seg_vars)}


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
    return {n: shapes[n].shape for n in layers}, valid


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
    """State shared by the passes of one dissection."""

    def __init__(self, module, variables, layers, data, segmentation, *, quantile, miniou, topk,
                 thumbsize, batch_size, output_dir, num_images, mesh, geometry, progress, name,
                 checkpoint_every, resolution):
        self.module, self.variables, self.data = module, variables, data
        self.segmentation = segmentation
        self.quantile, self.miniou, self.topk, self.thumbsize = quantile, miniou, topk, thumbsize
        self.geometry, self.progress, self.checkpoint_every = geometry, progress, checkpoint_every
        if not 0 < quantile < 1:
            raise DissectError(f"quantile must be in (0, 1), got {quantile}")
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.devices = self.mesh.size
        total = len(data)
        if num_images is not None and num_images > total:
            raise DissectError(f"num_images={num_images} but {data.name} has only {total} items")
        self.num_images = int(num_images or total)
        if self.num_images < 1:
            raise DissectError("nothing to dissect: the data source is empty")
        probe = data.get_batch([0])
        self.input_key, x0 = _model_input(probe)
        self.generator = self.input_key == "z"
        self.layers = list(layers)
        if not self.layers:
            raise DissectError("no layers to dissect")
        if len(set(self.layers)) != len(self.layers):
            raise DissectError(f"layers listed twice: {self.layers}")
        self.shapes, self.valid_layers = _resolve_layers(module, variables, x0[:1], self.layers)
        out = jax.eval_shape(lambda v, x: module.apply(v, x), variables, x0[:1])
        if self.generator:
            if not (isinstance(out, jax.ShapeDtypeStruct) and len(out.shape) == 4 and out.shape[-1] == 3):
                raise DissectError(f"a z data source needs a generator that outputs NHWC RGB images; "
                                   f"{type(module).__name__} outputs {out}")
            image_size = out.shape[1:3]
        else:
            image_size = x0.shape[1:3]
        self.image_size = tuple(int(s) for s in image_size)
        self._setup_segmentation(probe, resolution)
        bs = batch_size or (10 if self.generator else 16)
        self.batch_size = -(-bs // self.devices) * self.devices
        self.num_batches = -(-self.num_images // self.batch_size)
        self.output_dir = output_dir
        self.name = name or f"{type(module).__name__} {data.name} {self.seg_name}"
        self.config = {
            "model": {"class": f"{type(module).__module__}.{type(module).__name__}",
                      "variables": _fingerprint_variables(variables)},
            "data": data.fingerprint(), "segmentation": _segmenter_fingerprint(segmentation),
            "layers": self.layers, "quantile": quantile, "topk": topk, "geometry": geometry,
            "resolution": list(self.resolution), "num_images": self.num_images,
            "batch_size": self.batch_size, "devices": self.devices,
        }

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
            if "seg" in probe:
                seg_res = tuple(int(s) for s in probe["seg"].shape[-2:])
            else:
                seg_res = (h // 4, w // 4)
            self.label_names = list(self.data.label_names)
            self.label_categories = list(self.data.label_categories)
            self.categories = list(self.data.categories)
            self.seg_name = "dataset"
        else:
            seg, seg_vars = self.segmentation
            if h % 4 or w % 4:
                raise DissectError(f"images of {h}x{w} cannot be segmented at 1/4 resolution; the image "
                                   "size must be divisible by 4")
            from jaxdissect.segmentation import segment

            zc = jnp.zeros((1, h, w, 3), jnp.float32)
            labels, names, cats = segment(seg, seg_vars, zc, downsample=4)
            seg_res = tuple(int(s) for s in labels.shape[-2:])
            if seg_res != (h // 4, w // 4):
                raise DissectError(f"the segmenter returns {seg_res[0]}x{seg_res[1]} label maps for "
                                   f"{h}x{w} images, expected {h // 4}x{w // 4} (downsample 4)")
            self.label_names, self.label_categories, self.categories = _label_tables(seg, names, cats)
            self.seg_name = getattr(seg, "setting", "segmenter")
        if resolution is not None and tuple(resolution) != seg_res:
            raise DissectError(
                f"resolution {tuple(resolution)} requested but the segmentation is {seg_res[0]}x"
                f"{seg_res[1]}; activations are compared at the segmentation's resolution, so drop "
                "resolution= or use a segmentation of that size")
        self.resolution = seg_res

    def segment_batch(self, batch, output):
        """Labels ``[B, K, S, S]`` (and image labels or None) for one batch."""
        if isinstance(self.segmentation, str):
            seg = batch.get("seg")
            if seg is not None and tuple(seg.shape[-2:]) != self.resolution:
                raise DissectError(f"batch segmentation is {seg.shape[-2:]}, expected {self.resolution}")
            return seg, batch.get("image_labels")
        from jaxdissect.segmentation import segment

        seg, seg_vars = self.segmentation
        if self.generator:
            zc = output
        else:
            zc = jnp.asarray(batch["display"], jnp.float32) / 127.5 - 1.0
        labels, _, _ = segment(seg, seg_vars, zc, downsample=4)
        return labels, None

    # -- batches -----------------------------------------------------------
    def batches(self, keys):
        """``start -> iterator`` of this process's share of each global batch, placed on the mesh."""
        procs, pid = jax.process_count(), jax.process_index()
        if self.batch_size % procs:
            raise DissectError(f"batch size {self.batch_size} does not divide over {procs} processes")
        local = self.batch_size // procs

        def make(start):
            def generate():
                for b in range(start, self.num_batches):
                    lo = b * self.batch_size + pid * local
                    idx = np.arange(lo, lo + local)
                    real = idx[idx < self.num_images]
                    batch = dict(self.data.get_batch(real)) if len(real) else {}
                    batch = {k: v for k, v in batch.items() if k in keys}
                    valid = np.asarray(batch.pop("valid", np.ones(len(real), bool)), bool) if real.size \
                        else np.zeros(0, bool)
                    if not real.size:
                        batch = {k: np.zeros((0,) + v.shape[1:], v.dtype) for k, v in self._probe(keys).items()}
                    batch["valid"] = valid
                    batch["index"] = real.astype(np.int32)
                    yield loader.pad_batch(batch, local)

            return loader.prefetch(generate(), 2)

        return make

    def _probe(self, keys):
        batch = self.data.get_batch([0])
        return {k: np.asarray(v) for k, v in batch.items() if k in keys and k != "valid"}

    # -- compute -----------------------------------------------------------
    def params(self):
        return jax.device_put(self.variables, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

    def forward_fn(self):
        from jaxdissect.layers import capture

        layers = list(self.layers)

        @jax.jit
        def forward(variables, x):
            out, acts = capture(self.module, variables, x, layers)
            return out, {n: jnp.asarray(a, jnp.float32) for n, a in acts.items()}

        return forward

    def upsampled_rows(self, act):
        """``[B, h, w, U]`` -> upsampled pixel rows ``[B * S * S, U]`` (original geometry)."""
        up = _kernels.upsample(act, self.resolution, self.geometry)
        return up.reshape(-1, up.shape[-1])

    def pixel_rows(self, per_image):
        s = self.resolution[0] * self.resolution[1]
        return jnp.repeat(per_image, s, axis=0)

    def run_pass(self, wd, name, init, update, keys, extra_config=None):
        """One resumable pass: ``update(state, acts, batch) -> state`` per device."""
        forward = self.forward_fn()
        params = self.params()
        state = parallel.stack_init(self.mesh, init)
        step_update = parallel.per_device(update, self.mesh)
        need_output = self.generator and name == "pass3" and not isinstance(self.segmentation, str)

        def step(state, batch):
            batch = parallel.shard_batch(self.mesh, batch)
            out, acts = forward(params, batch[self.input_key])
            extra = {}
            if name == "pass3":
                seg, image_labels = self.segment_batch(batch, out if need_output else None)
                if seg is not None:
                    extra["seg"] = seg
                if image_labels is not None:
                    extra["image_labels"] = image_labels
            return step_update(state, acts, {"valid": batch["valid"], "index": batch["index"], **extra})

        config = {**self.config, "pass": name, **(extra_config or {})}
        return streaming.run_stream(
            step, state, self.batches(keys), num_batches=self.num_batches,
            workdir=os.path.join(wd.directory, name), config=config,
            checkpoint_every=self.checkpoint_every, desc=f"dissect {name}")

    # -- thumbnails --------------------------------------------------------
    def strips(self, topk_indices: Mapping[str, np.ndarray], thresholds: Mapping[str, np.ndarray],
               valid_counts: Mapping[str, np.ndarray]):
        """Per layer ``{unit: strip}``: each unit's top images, its region above threshold highlighted.

        Only the images in some unit's top ``STRIP_IMAGES`` are read again; their
        activations are recomputed (all layers in one forward pass per batch).
        """
        from jaxdissect.reports import strips as strip_lib

        wanted = {}
        for name, idx in topk_indices.items():
            k = min(STRIP_IMAGES, idx.shape[1])
            for u in range(idx.shape[0]):
                n = int(min(k, valid_counts[name][u]))
                for r in range(n):
                    wanted.setdefault(int(idx[u, r]), []).append((name, u, r))
        thumbs = {name: {} for name in topk_indices}
        forward = self.forward_fn()
        order = sorted(wanted)
        bs = self.batch_size
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            batch = dict(self.data.get_batch(chunk))
            x = loader.pad_batch({"x": np.asarray(batch[self.input_key])}, bs)["x"]
            out, acts = forward(self.variables, x)
            acts = {n: np.asarray(a) for n, a in acts.items()}
            display = _to_bytes_zc(out) if self.generator else np.asarray(batch["display"])
            for j, image_index in enumerate(chunk):
                for name, u, r in wanted[image_index]:
                    thumbs[name][(u, r)] = strip_lib.masked_thumbnail(
                        display[j], acts[name][j, :, :, u], float(thresholds[name][u]), self.thumbsize)
        result = {}
        for name, idx in topk_indices.items():
            per_unit = {}
            for u in range(idx.shape[0]):
                images = [thumbs[name][(u, r)] for r in range(STRIP_IMAGES) if (u, r) in thumbs[name]]
                if images:
                    per_unit[u] = strip_lib.unit_strip(images)
            result[name] = per_unit
        return result

    # -- the three passes --------------------------------------------------
    def units(self, name) -> int:
        return int(self.shapes[name][-1])

    def pass1(self, wd):
        from jaxdissect.kernels import quantile as q

        bs = self.batch_size

        def init():
            return {n: {"q": q.high_init(self.units(n)), "topk": _kernels.topk_init(self.units(n), self.topk)}
                    for n in self.layers} | {"_valid": jnp.zeros((), jnp.int32)}

        def update(state, acts, b):
            valid = b["valid"]
            new = {"_valid": state["_valid"] + valid.sum(dtype=jnp.int32)}
            for n in self.layers:
                rows = self.upsampled_rows(acts[n])
                new[n] = {"q": q.high_update(state[n]["q"], rows, self.pixel_rows(valid),
                                             self.pixel_rows(b["index"] // bs)),
                          "topk": _kernels.topk_update(state[n]["topk"], acts[n], b["index"], valid)}
            return new

        state = parallel.to_host(self.run_pass(wd, "pass1", init(), update, self.model_keys()))
        for n in self.layers:
            bad = np.asarray(state[n]["q"]["nonfinite"]).sum(0)
            if bad.any():
                u = int(np.flatnonzero(bad)[0])
                batch = int(np.asarray(state[n]["q"]["first_bad_batch"]).min(0)[u])
                raise DissectError(
                    f"layer {n} unit {u} has {int(bad[u])} NaN/Inf activations (first in batch {batch}, "
                    f"images {batch * bs}..{min(self.num_images, (batch + 1) * bs) - 1}); check the model "
                    "weights and the input preprocessing")
        return state

    def pass2(self, wd, state1):
        from jaxdissect.kernels import quantile as q

        level = 1.0 - self.quantile
        selections = {n: q.select(state1[n]["q"], level) for n in self.layers}

        def update(state, acts, b):
            return {n: q.low_update(state[n], self.upsampled_rows(acts[n]), self.pixel_rows(b["valid"]))
                    for n in self.layers}

        init = {n: q.low_init(selections[n]) for n in self.layers}
        state = parallel.to_host(self.run_pass(wd, "pass2", init, update, self.model_keys()))
        return {n: q.finish(selections[n], state[n]) for n in self.layers}

    def pass3(self, wd, thresholds):
        num_labels = len(self.label_names)

        def update(state, acts, b):
            new = {}
            for n in self.layers:
                rows = self.upsampled_rows(acts[n])
                new[n] = _kernels.iou_update(state[n], rows, b.get("seg"), b.get("image_labels"),
                                             b["valid"], self.resolution)
            return new

        init = {n: _kernels.iou_init(np.asarray(thresholds[n], np.float32), num_labels) for n in self.layers}
        keys = self.model_keys() + ("seg", "image_labels") if isinstance(self.segmentation, str) \
            else self.model_keys() + (() if self.generator else ("display",))
        state = self.run_pass(wd, "pass3", init, update, keys,
                              extra_config={"thresholds": {n: _hash_array(t) for n, t in thresholds.items()}})
        return parallel.to_host(state)

    def model_keys(self):
        return (self.input_key,)

    # -- outputs -----------------------------------------------------------
    def layer_dir(self, name):
        return os.path.join(self.output_dir, name.replace("/", "_"))

    def header_name(self, skipped):
        return self.name + (f" ({skipped} unreadable images skipped)" if skipped else "")

    def write_layer(self, name, result, strips, skipped):
        from jaxdissect.reports import bargraph, report_json, strips as strip_lib

        d = self.layer_dir(name)
        os.makedirs(d, exist_ok=True)
        np.savez(os.path.join(d, "arrays.npz.tmp.npz"), **result.arrays())
        os.replace(os.path.join(d, "arrays.npz.tmp.npz"), os.path.join(d, "arrays.npz"))
        strip_lib.save_strips(d, strips)
        bargraph.write_concept_bargraph(os.path.join(d, "concepts_99.svg"), result.units, self.miniou)
        report_json.write_report_json(os.path.join(d, "report.json"), self.header_name(skipped), result.units)

    def write_run(self, results, skipped):
        from jaxdissect.reports import html, summary

        rows = summary.layer_summary([(n, results[n].units) for n in self.layers], self.miniou)
        summary.write_summary(self.output_dir, rows, title=self.name)
        by_layer = {r["layer"]: r for r in rows}
        layers = []
        for n in self.layers:
            row = by_layer.get(n, {})
            entry = {"name": n, "dir": os.path.basename(self.layer_dir(n)), "units": results[n].units,
                     "svg": "concepts_99.svg",
                     "summary": {"units": row.get("units"), "interpretable": row.get("interpretable"),
                                 "unique concepts": row.get("unique_concepts"),
                                 "images": self.num_images - skipped, "skipped images": skipped}}
            layers.append(entry)
        return html.write_run_report(self.output_dir, self.header_name(skipped), layers)


class LayerResult:
    """What dissecting one layer gives: thresholds, IoU, top-k images, counts and per-unit labels."""

    def __init__(self, layer: str, arrays: Mapping[str, np.ndarray], units: list[dict]):
        self.layer = layer
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.units = units

    def __getattr__(self, key):
        arrays = self.__dict__.get("_arrays", {})
        if key in arrays:
            return arrays[key]
        raise AttributeError(key)

    def arrays(self) -> dict[str, np.ndarray]:
        """``thresholds [U]``, ``iou [U, L]``, ``topk_values``/``topk_indices [U, k]`` and the counts."""
        return dict(self._arrays)

    def save(self, path: str) -> None:
        np.savez(path + ".npz", **self._arrays)
        _write_json(path + ".json", {"layer": self.layer, "units": self.units})

    @classmethod
    def load(cls, path: str) -> "LayerResult":
        with np.load(path + ".npz") as f:
            arrays = {k: f[k] for k in f.files}
        with open(path + ".json") as f:
            meta = json.load(f)
        return cls(meta["layer"], arrays, meta["units"])

    def __repr__(self):
        n = len(self.units)
        return f"LayerResult({self.layer!r}, {n} units, {self.interpretable()} with IoU > miniou)"

    def interpretable(self) -> int:
        return int(self._arrays.get("interpretable", np.zeros(0)).sum())


def _hash_array(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()[:16]


def _label_tables(segmenter, names, cats):
    """(label names, category per label, category list) from what ``segment`` returns."""
    names = [str(n) for n in names]
    per_label = getattr(segmenter, "label_categories", None)
    if per_label is None and len(cats) == len(names):
        per_label = cats
    if per_label is None:
        raise DissectError("cannot tell the category of each segmenter label")
    categories = list(dict.fromkeys(getattr(segmenter, "categories", None) or per_label))
    return names, [str(c) for c in per_label], [str(c) for c in categories]


def dissect(module, variables, layers: str | Sequence[str], data, segmentation="dataset", *,
            quantile: float = 0.01, miniou: float = 0.04, topk: int = 100, thumbsize: int = 100,
            batch_size: int | None = None, output_dir: str | None = None, num_images: int | None = None,
            mesh=None, geometry: str = "original", progress: bool = True, name: str | None = None,
            checkpoint_every: int = 50, resolution: tuple[int, int] | None = None) -> dict[str, LayerResult]:
    """Dissect ``layers`` of ``module`` over ``data``; returns ``{layer: LayerResult}``.

    Args:
      module, variables: a Flax Linen model and its variables (``jaxdissect.load_model``).
      layers: layer names ('.'-joined module paths, see ``jaxdissect.layer_names``).
      data: a data source (``jaxdissect.data``: ``PlacesFolder``, ``ImageFolder``,
        ``LatentSource``, ``BrodenSource``, ``SyntheticScenes``, or your own).
      segmentation: ``(segmenter, variables)`` from ``jaxdissect.load_segmenter``, or
        ``'dataset'`` for the labels the data source provides.
      quantile: top fraction of each unit's upsampled activations that counts as
        "on" (0.01: threshold = 0.99 quantile, exact).
      miniou: a unit is interpretable when its best IoU exceeds this.
      topk: images tracked per unit (by raw per-image maximum); 5 are shown.
      thumbsize: thumbnail size of the unit strips.
      batch_size: images per step (rounded up to a multiple of the device count).
      output_dir: where reports and the resumable work directory go; None keeps
        nothing on disk (a temporary work directory, deleted at the end).
      num_images: dissect only the first ``num_images`` items.
      mesh: a ``jaxdissect.parallel.make_mesh`` mesh (default: all devices).
      geometry: activation upsampling, ``'original'`` (zero-padded, spec 2.2) or
        ``'clamped'`` (see ``jaxdissect.kernels.upsample``).
      progress: log each pass and where the outputs are.
      name: report header (default ``"<Model> <data> <segmentation>"``).
      checkpoint_every: batches between checkpoints of the streaming passes.
      resolution: the expected comparison resolution; an error if the
        segmentation's differs (it is otherwise taken from the segmentation).
    """
    layers = [layers] if isinstance(layers, str) else list(layers)
    run = _Run(module, variables, layers, data, segmentation, quantile=quantile, miniou=miniou,
               topk=topk, thumbsize=thumbsize, batch_size=batch_size, output_dir=output_dir,
               num_images=num_images, mesh=mesh, geometry=geometry, progress=progress, name=name,
               checkpoint_every=checkpoint_every, resolution=resolution)
    temporary = None
    if output_dir is None:
        temporary = tempfile.mkdtemp(prefix="jaxdissect-")
        run.output_dir = temporary
    try:
        return _dissect(run, write=output_dir is not None)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


def _say(run, message):
    if run.progress:
        logging.info("%s", message)


def _dissect(run: _Run, write: bool) -> dict[str, LayerResult]:
    primary = jax.process_index() == 0
    with streaming.Workdir(os.path.join(run.output_dir, WORK)) as wd:
        _check_config(wd, run.config)
        results_dir = os.path.join(wd.directory, "results")
        if wd.done("results"):
            results = {n: LayerResult.load(os.path.join(results_dir, n)) for n in run.layers}
            with open(os.path.join(results_dir, "run.json")) as f:
                skipped = json.load(f)["skipped"]
            _say(run, f"statistics of {', '.join(run.layers)} loaded from {results_dir}")
        else:
            t0 = time.perf_counter()
            _say(run, f"pass 1/3 over {run.num_images} items: quantile histograms and top-{run.topk}")
            state1 = run.pass1(wd)
            skipped = int(run.num_images - np.asarray(state1["_valid"]).sum())
            _say(run, "pass 2/3: exact thresholds")
            thresholds = run.pass2(wd, state1)
            _say(run, "pass 3/3: IoU against the segmentation")
            state3 = run.pass3(wd, thresholds)
            results = {n: _layer_result(run, n, state1[n], thresholds[n], state3[n]) for n in run.layers}
            if primary:
                os.makedirs(results_dir, exist_ok=True)
                for n, r in results.items():
                    r.save(os.path.join(results_dir, n))
                _write_json(os.path.join(results_dir, "run.json"),
                            {"skipped": skipped, "seconds": time.perf_counter() - t0})
                wd.mark_done("results")
        if skipped:
            names = sorted(getattr(run.data, "bad_files", {}).values())
            logging.warning("%d of %d images could not be read and were left out%s", skipped,
                            run.num_images, ":\n  " + "\n  ".join(names) if names else "")
        if not write or not primary:
            return results
        todo = [n for n in run.layers if not wd.done(f"layer-{n}")]
        if todo:
            _say(run, f"unit strips for {', '.join(todo)}")
            strips = run.strips({n: results[n].topk_indices for n in todo},
                                {n: results[n].thresholds for n in todo},
                                {n: results[n].topk_count for n in todo})
            for n in todo:
                run.write_layer(n, results[n], strips[n], skipped)
                wd.mark_done(f"layer-{n}")
        index = run.write_run(results, skipped)
        _say(run, f"report: {index}")
    return results


def _check_config(wd, config):
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
    else:
        _write_json(path, normalized)


# --------------------------------------------------------------------------
# Kernel glue: the per-layer statistics the passes fold in.


def _interp_matrix(source: int, target: int, geometry: str) -> np.ndarray:
    t = np.arange(target, dtype=np.float64)
    u = (t + 0.5) * source / target - 0.5
    if geometry == "clamped":
        u = np.clip(u, 0, source - 1)
    elif geometry != "original":
        raise DissectError(f"geometry must be 'original' or 'clamped', got {geometry!r}")
    lo = np.floor(u).astype(np.int64)
    frac = u - lo
    m = np.zeros((target, source), np.float64)
    for idx, w in ((lo, 1.0 - frac), (lo + 1, frac)):
        ok = (idx >= 0) & (idx < source)
        np.add.at(m, (t[ok].astype(np.int64), idx[ok]), w[ok])
    return m.astype(np.float32)


class _kernels:
    @staticmethod
    def upsample(act, size, geometry):
        mh = _interp_matrix(act.shape[1], size[0], geometry)
        mw = _interp_matrix(act.shape[2], size[1], geometry)
        return jnp.einsum("sh,bhwu,tw->bstu", mh, act, mw, precision=jax.lax.Precision.HIGHEST)

    @staticmethod
    def topk_init(units, k):
        return {"values": jnp.full((units, k), -jnp.inf, jnp.float32),
                "indices": jnp.full((units, k), -1, jnp.int32),
                "max": jnp.full((units,), -jnp.inf, jnp.float32)}

    @staticmethod
    def topk_update(state, act, index, valid):
        per_image = jnp.where(valid[:, None], act.max(axis=(1, 2)), -jnp.inf).T       # [U, B]
        idx = jnp.where(valid, index, -1)
        values = jnp.concatenate([state["values"], per_image], 1)
        indices = jnp.concatenate([state["indices"], jnp.broadcast_to(idx, per_image.shape)], 1)
        k = state["values"].shape[1]
        neg, ind = jax.lax.sort((-values, jnp.where(indices < 0, jnp.iinfo(jnp.int32).max, indices)),
                                dimension=1, num_keys=2)
        ind = jnp.where(ind == jnp.iinfo(jnp.int32).max, -1, ind)
        return {"values": -neg[:, :k], "indices": ind[:, :k],
                "max": jnp.maximum(state["max"], per_image.max(1))}

    @staticmethod
    def topk_result(state):
        values = np.asarray(state["values"])
        indices = np.asarray(state["indices"])
        d, u, k = values.shape
        values = values.transpose(1, 0, 2).reshape(u, d * k)
        indices = indices.transpose(1, 0, 2).reshape(u, d * k)
        key_idx = np.where(indices < 0, np.iinfo(np.int64).max, indices)
        order = np.lexsort((key_idx, -values), axis=1)[:, :k]
        values = np.take_along_axis(values, order, 1)
        indices = np.take_along_axis(indices, order, 1)
        return {"topk_values": values, "topk_indices": indices,
                "topk_count": (indices >= 0).sum(1), "max": np.asarray(state["max"]).max(0)}

    @staticmethod
    def iou_init(thresholds, num_labels):
        u = thresholds.shape[0]
        return {"threshold": jnp.asarray(thresholds), "pixels": jnp.zeros((), jnp.int32),
                "active": jnp.zeros((u,), jnp.int32), "label_pixels": jnp.zeros((num_labels,), jnp.int32),
                "intersection": jnp.zeros((u, num_labels), jnp.int32)}

    @staticmethod
    def iou_update(state, rows, seg, image_labels, valid, resolution):
        num_labels = state["label_pixels"].shape[0]
        s = resolution[0] * resolution[1]
        pv = jnp.repeat(valid, s)
        on = (rows > state["threshold"][None]) & pv[:, None]                          # [P, U]
        b = valid.shape[0]
        present = jnp.zeros((b * s, num_labels), bool)
        if seg is not None:
            k = seg.shape[1]
            flat = seg.transpose(0, 2, 3, 1).reshape(b * s, k)
            present = present.at[jnp.arange(b * s)[:, None], flat].set(True)
        if image_labels is not None:
            per_image = jnp.zeros((b, num_labels), bool).at[jnp.arange(b)[:, None], image_labels].set(True)
            present = present | jnp.repeat(per_image, s, axis=0)
        present = present.at[:, 0].set(False) & pv[:, None]
        inter = jnp.einsum("pu,pl->ul", on.astype(jnp.float32), present.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST).astype(jnp.int32)
        return {"threshold": state["threshold"], "pixels": state["pixels"] + pv.sum(dtype=jnp.int32),
                "active": state["active"] + on.sum(0, dtype=jnp.int32),
                "label_pixels": state["label_pixels"] + present.sum(0, dtype=jnp.int32),
                "intersection": state["intersection"] + inter}

    @staticmethod
    def iou_result(state):
        active = np.asarray(state["active"]).astype(np.int64).sum(0)
        labels = np.asarray(state["label_pixels"]).astype(np.int64).sum(0)
        inter = np.asarray(state["intersection"]).astype(np.int64).sum(0)
        union = active[:, None] + labels[None, :] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        return {"iou": iou.astype(np.float32), "pixels": np.asarray(state["pixels"]).astype(np.int64).sum(0),
                "active": active, "label_pixels": labels, "intersection": inter}


def _layer_result(run: _Run, name, state1, thresholds, state3) -> LayerResult:
    arrays = {"thresholds": np.asarray(thresholds, np.float32)}
    arrays.update(_kernels.topk_result(state1["topk"]))
    arrays.update(_kernels.iou_result(state3))
    iou = arrays["iou"]
    scores = iou.copy()
    scores[:, 0] = -1.0
    best = scores.argmax(1)
    best_iou = iou[np.arange(iou.shape[0]), best]
    units = [{"unit": u, "label": run.label_names[int(c)], "cat": run.label_categories[int(c)],
              "iou": float(v)} for u, (c, v) in enumerate(zip(best, best_iou))]
    arrays["label"] = best
    arrays["best_iou"] = best_iou
    arrays["interpretable"] = best_iou > run.miniou
    return LayerResult(name, arrays, units)
