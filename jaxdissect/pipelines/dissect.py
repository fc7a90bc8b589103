"""Dissect any number of layers of a model: the model's batches for the pass driver, then the reports.

``dissect(module, variables, layers, data, segmentation)`` labels every unit of
every requested layer with the concept its top-quantile region matches best
(spec 3.1). This module only produces batches: the model captures every layer
at once (each layer seen through its views, ``jaxdissect.bases``) and a
labeller gives the labels (``jaxdissect.labellers``); :class:`jaxdissect.driver.Driver`
runs the passes (quantile histograms and top-k, exact thresholds, IoU, any
extra pass), their checkpoints and the activation cache; the method's
strategies score and explain the units; :mod:`jaxdissect.reports.dissection`
writes the outputs.

Activations are upsampled to the segmentation's resolution (``H / 4``: 56 for
224-pixel classifiers, 64 for 256-pixel generators) with the original's
geometry (``jaxdissect.kernels.upsample``); a ``[N, U]`` layer is a ``[N, 1, 1, U]`` map,
upsampled as a constant (edge replication). ``segmentation`` is a
``(segmenter, variables)`` pair from ``jaxdissect.load_segmenter`` (run on the
images in [-1, 1]: a classifier's input pixels, a generator's output),
``'dataset'`` (the labels the data source provides: ``seg`` /
``image_labels``) or None (no concept labels).

Generators: the model output (RGB in [-1, 1]) is what gets segmented and what
the thumbnails show, rendered as ``(x + 1) / 2``. The original rendered the
thumbnails of its GAN dissections as ``x`` clamped to [0, 1] (spec 2.6 quirk);
we use the corrected rendering, which its notebooks use too.

With ``activation_cache_mb`` (default 1024), pass 1 keeps every layer's
activations and the labels in host memory when they fit, and the later passes
read them from there: the model, the decoding and the segmenter then run once
per image (the log says whether the cache is used). With
``segmentation_cache`` (a directory) the segmenter's label maps are kept on
disk and shared by every later dissection of the same data
(``jaxdissect.segmentation.cache``); the log counts the images segmented and read from it.

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

from jaxdissect import config as config_lib
from jaxdissect import fileio, parallel, streaming
from jaxdissect.bases import Basis, Linear, Neurons
from jaxdissect.config import DissectConfig, DissectError
from jaxdissect.data import loader
from jaxdissect.driver import Driver, IoUScoring, Scoring, Strategy

__all__ = ["DissectError", "dissect", "method_strategies", "model_input", "trace_shapes", "forward_fn", "views_of"]

WORK = "work"
STRIP_IMAGES = 5


# --------------------------------------------------------------------------
# Inputs


def model_input(batch: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """``('z' or 'image', array)``: the model input of a data source's batch."""
    if "z" in batch:
        return "z", batch["z"]
    if "image" in batch:
        return "image", batch["image"]
    raise DissectError(f"data source batches need an 'image' or 'z' array; got keys {sorted(batch)}")


def _aval(x):
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = np.asarray(x)
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


@functools.lru_cache(maxsize=16)
def _traced(module, abstract_variables, abstract_x):
    from jaxdissect.layers import layer_shapes

    variables, x = (jax.tree_util.tree_unflatten(*t) for t in (abstract_variables, abstract_x))
    return layer_shapes(module, variables, x), jax.eval_shape(lambda v, i: module.apply(v, i), variables, x)


def trace_shapes(module, variables, x) -> tuple[dict, Any]:
    """``({layer: shape}, output shape)`` of ``module`` on ``x`` (traced, nothing computed; cached, so the
    launcher's trace and the dissection's are one)."""
    def key(tree):
        leaves, treedef = jax.tree.flatten(jax.tree.map(_aval, tree))
        return treedef, tuple(leaves)

    try:
        return _traced(module, key(variables), key(x))
    except TypeError:  # an unhashable module
        return _traced.__wrapped__(module, key(variables), key(x))


def _resolve_layers(module, shapes, layers: Sequence[str]):
    """``{layer: shape}`` of the requested layers; a ``[N, U]`` layer is a ``[N, 1, 1, U]`` map (one value per
    image, see :func:`as_map`); tokens and other shapes are refused with a one-line error."""
    valid = dissectable_layers(shapes, pooled=True)
    unknown = [n for n in layers if n not in shapes]
    if unknown:
        import difflib

        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, valid, n=3, cutoff=0.5)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise DissectError(f"unknown layer {', '.join(hints)}; {type(module).__name__} has these "
                           f"dissectable layers: {', '.join(valid)}")
    for n in layers:
        if n not in valid:
            raise not_a_map_error(n, shapes)
    return {n: tuple(shapes[n].shape[:1]) + ((1, 1) if len(shapes[n].shape) == 2 else tuple(shapes[n].shape[1:3]))
            + tuple(shapes[n].shape[-1:]) for n in layers}


def dissectable_layers(shapes: Mapping[str, Any], pooled: bool = False) -> list[str]:
    """The layers of ``{layer: shape}`` that dissect: ``[N, H, W, U]`` maps, and with ``pooled`` also
    ``[N, U]`` layers (a dense layer, a transformer's CLS token: one value per image and unit)."""
    ranks = (2, 4) if pooled else (4,)
    return [n for n, s in shapes.items() if isinstance(s, jax.ShapeDtypeStruct) and len(s.shape) in ranks]


def not_a_map_error(name: str, shapes: Mapping[str, Any]) -> DissectError:
    """The one-line error for a layer that is neither a ``[N, H, W, U]`` map nor ``[N, U]`` values.

    Transformer tokens ``[N, T, C]`` (CLS + patches) name the block's patch-grid
    views (``.residual``, ``.attention``, ``.mlp.neurons``) and their ``_cls`` twins
    when the model has them (:mod:`jaxdissect.models.transformer`).
    """
    shape = tuple(getattr(shapes[name], "shape", ()))
    if len(shape) == 3:
        from jaxdissect.models.transformer import GridError

        views = [n for n in dissectable_layers(shapes) if n.startswith(name + ".")
                 and n[len(name) + 1:] in ("residual", "attention", "mlp.neurons")]
        hint = (f"dissect its patch-grid views {', '.join(views)} or their '_cls' twins (the CLS token)" if views
                else "dissect a vision block's '.residual', '.attention' or '.mlp.neurons' layer (the patch grid) "
                     "or its '_cls' twin (the CLS token)")
        return GridError(f"layer {name} holds tokens [N, {shape[1]}, {shape[2]}] (a transformer's sequence: CLS "
                         "and patch tokens), which cannot be laid on a "
                         f"grid as they are; {hint}")
    return DissectError(f"layer {name} has shape [N, {', '.join(map(str, shape[1:]))}], neither a [N, H, W, units] "
                        f"feature map nor [N, units] values; dissectable layers: "
                        f"{', '.join(dissectable_layers(shapes, pooled=True))}")


def as_map(acts):
    """A layer's activations as a map: ``[N, U]`` values become ``[N, 1, 1, U]`` (one value per image)."""
    return acts if acts.ndim == 4 else acts.reshape(acts.shape[0], 1, 1, acts.shape[-1])


def views_of(layers: Sequence[str], views: Mapping[str, tuple] | None) -> dict[str, tuple[str, Basis, dict]]:
    """``{view: (layer, basis, params)}`` from ``layers`` or ``views``.

    A view is ``(layer, basis, params)`` (``jaxdissect.bases``), or ``(layer,
    R)``: ``R`` a ``[C, C]`` rotation over the channels (a :class:`Linear`
    basis), None for the layer's own units, or a basis spec (``'sae:8'``,
    :mod:`jaxdissect.bases.spec`; ``(layer, BasisSpec, None)`` until
    :class:`Dissection` resolves it, training a learned basis from its data).
    """
    from jaxdissect.bases.spec import BasisSpec, parse

    if views is None:
        if len(set(layers)) != len(layers):
            raise DissectError(f"layers listed twice: {list(layers)}")
        return {n: (n, Neurons(), {}) for n in layers}
    if layers:
        raise DissectError(f"give layers or views, not both (layers {list(layers)}); list every layer as "
                           "a view: views={name: (layer, None)}")
    out = {}
    for v, spec in dict(views).items():
        if len(spec) == 3:
            layer, basis, params = spec
        elif isinstance(spec[1], (str, BasisSpec)):
            layer, basis, params = spec[0], parse(spec[1]) if isinstance(spec[1], str) else spec[1], None
        else:
            layer, matrix = spec
            basis, params = (Neurons(), {}) if matrix is None else (
                Linear(label="rotation"), {"matrix": np.asarray(matrix, np.float32)})
        out[str(v)] = (str(layer), basis, None if params is None else dict(params))
    return out


# --------------------------------------------------------------------------
# The model's batches


@functools.lru_cache(maxsize=16)
def _forward(module, layers: tuple[str, ...], views: tuple, codes: bool = False):
    """Jitted forward pass capturing ``layers`` (cached, so repeated dissections compile once).

    ``views`` is ``((name, layer, basis), ...)``: a view's units are
    ``basis.encode(params[name], activations of layer)``, right after capture
    (with ``codes``, ``basis.codes``: a sparse basis's units as
    :class:`~jaxdissect.kernels.codes.SparseCodes`, which the statistics read).
    """
    from jaxdissect.layers import capture

    @jax.jit
    def forward(variables, x, params):
        out, acts = capture(module, variables, x, layers)
        acts = {n: as_map(jnp.asarray(a, jnp.float32)) for n, a in acts.items()}
        return out, {v: (basis.codes if codes else basis.encode)(params[v], acts[layer]) for v, layer, basis in views}

    return forward


def forward_fn(module, views: Mapping[str, tuple], mesh=None, codes: bool = False):
    """Jitted ``(variables, x) -> (output, {view: float32 units})``: one pass, every view.

    ``views``: ``{view: (layer, basis, params)}`` (see :func:`views_of`); the
    bases' params are placed (replicated) once and passed to jit as arguments.
    ``codes``: a sparse basis's units as :class:`~jaxdissect.kernels.codes.SparseCodes` (the passes).
    """
    captured = tuple(dict.fromkeys(layer for layer, _, _ in views.values()))
    spec = tuple((v, layer, basis) for v, (layer, basis, _) in views.items())
    try:
        f = _forward(module, captured, spec, codes)
    except TypeError:  # an unhashable module: compile for this run only
        f = _forward.__wrapped__(module, captured, spec, codes)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    params = jax.device_put({v: p for v, (_, _, p) in views.items()},
                            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return lambda variables, x: f(variables, x, params)


class ModelBatches:
    """The pass driver's source for a model over a data source (see ``jaxdissect.driver``)."""

    def __init__(self, run: "Dissection"):
        self.run = run
        self.num_batches, self.batch_size, self.images = run.num_batches, run.batch_size, run.num_images
        self.label_keys = run.labeller.keys
        self._forward, self._params = {}, None

    def forward_fn(self, codes: bool = False):
        """Jitted ``(variables, x) -> (output, {view: float32 units})`` (see :func:`forward_fn`)."""
        if codes not in self._forward:
            self._forward[codes] = forward_fn(self.run.module, self.run.views, self.run.mesh, codes=codes)
        return self._forward[codes]

    def replicated_variables(self):
        if self._params is None:
            self._params = jax.device_put(self.run.variables, jax.sharding.NamedSharding(
                self.run.mesh, jax.sharding.PartitionSpec()))
        return self._params

    def cache_bytes(self) -> int:
        """Host bytes to keep every view's activations and the labels of all images between passes."""
        run = self.run
        per_image = sum(run.code_bytes.values())
        per_image += run.labeller.channels * run.resolution[0] * run.resolution[1] * 4
        return per_image * self.num_batches * self.batch_size

    def reader(self, keys):
        """``start -> iterator`` over this process's share of global batches ``start, start + 1, ...``.

        Each batch holds the model input and ``keys`` of the source plus
        ``valid`` and ``index``, padded to a fixed size; decoding runs in a
        background thread.
        """
        run = self.run
        keys = (run.input_key,) + tuple(keys)
        procs, pid = jax.process_count(), jax.process_index()
        if run.batch_size % procs:
            raise DissectError(f"batch size {run.batch_size} does not divide over {procs} processes")
        local = run.batch_size // procs
        template = {k: np.asarray(v)[:0] for k, v in run.probe.items() if k in keys}

        def make(start):
            def generate():
                for b in range(start, run.num_batches):
                    lo = b * run.batch_size + pid * local
                    real = np.arange(lo, min(lo + local, run.num_images))
                    if real.size:
                        full = run.data.get_batch(real)
                        batch = {k: np.asarray(v) for k, v in full.items() if k in keys}
                        valid = np.asarray(full.get("valid", np.ones(real.size, bool)), bool)
                    else:
                        batch, valid = dict(template), np.zeros(0, bool)
                    batch["valid"] = valid
                    batch["index"] = real.astype(np.int32)
                    yield loader.pad_batch(batch, local)

            return loader.prefetch(generate(), 2)

        return make

    def produce(self, batch, labels: bool, keys=()):
        run = self.run
        batch = parallel.shard_batch(run.mesh, batch)
        out, acts = self.forward_fn(codes=True)(self.replicated_variables(), batch[run.input_key])
        b = {"acts": acts, "valid": batch["valid"], "index": batch["index"],
             "batch_id": batch["index"] // run.batch_size}
        if labels:
            seg, image_labels = run.labeller.labels(batch, out if run.generator else None)
            b["seg"] = seg
            if image_labels is not None:
                b["image_labels"] = image_labels
        b.update({k: batch[k] for k in keys if k in batch})
        return b

    def error(self, pass_name, view, e):
        if pass_name == "pass1":
            return DissectError(f"layer {view}: {e} (batches of {self.batch_size} images)")
        return DissectError(f"{self.run.data.name}: {e}")


# --------------------------------------------------------------------------
# One dissection


def method_strategies(config: DissectConfig, extra: Sequence[Strategy] = (),
                      run=None) -> tuple[Scoring, list[Strategy]]:
    """``(scoring, strategies)`` of a config, in report order (``extra``: more strategies; a
    :class:`~jaxdissect.driver.Scoring` among them replaces the config's). ``run``: the
    :class:`Dissection` (its label tables, data, images and cache directory), which the open-vocabulary
    labels need; the add-ons that score units against concept labels are left out when it has none."""
    from jaxdissect import netdissect2017
    from jaxdissect.explain.pipeline import Explanations, LabelMetrics

    scoring = next((s for s in extra if isinstance(s, Scoring)), None)
    if scoring is None:
        scoring = (netdissect2017.Netdissect2017Scoring(config.miniou) if config.method == "netdissect2017"
                   else IoUScoring(config.miniou, config.row0_competes))
    labelled = run is None or len(run.tables.label_names) > 1
    out: list[Strategy] = []
    if config.addon_on("explain") and labelled:
        out.append(Explanations(config.formulas, config.exact_formulas,
                                config.permutations if config.significance else 0, config.q))
    out.append(scoring)
    if config.addon_on("label_metrics") and labelled:
        out.append(LabelMetrics())
    if config.addon_on("open_vocab"):
        from jaxdissect.explain.open_vocab_strategy import OpenVocab

        if run is None:
            raise DissectError("the open-vocabulary labels (scorer) are built from a dissection's data and labels; "
                               "set scorer in jaxdissect.dissect's config")
        out.append(OpenVocab.from_run(config, run))
    return scoring, out + [s for s in extra if s is not scoring]


class Dissection:
    """Settings, shapes, labels and per-view plans of one dissection; runs it and writes its outputs."""

    def __init__(self, module, variables, layers, data, segmentation, config: DissectConfig, *, views=None,
                 mesh=None, progress=True, name=None, settings=None, segmentation_cache=None, strategies=(),
                 cache_dir=None):
        from jaxdissect.labellers import make_labeller
        from jaxdissect.statistics import Plan

        self.config = config
        self.module, self.variables, self.data = module, variables, data
        self.progress, self.settings, self.cache_dir = progress, dict(settings or {}), cache_dir
        self.geometry = config.geometry or "original"
        self.receptive_field = config_lib.receptive_field_options(self.geometry, config.receptive_field)
        self.quantile = config.level_quantile
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.devices = self.mesh.size
        total = len(data)
        if config.num_images is not None and config.num_images > total:
            raise DissectError(f"num_images={config.num_images} but {data.name} has only {total} items")
        self.num_images = int(config.num_images or total)
        if self.num_images < 1:
            raise DissectError(f"nothing to dissect: {data.name} is empty")
        probe = self.probe = data.get_batch([0])
        self.input_key, x0 = model_input(probe)
        self.generator = self.input_key == "z"
        if config.bases is not None:
            from jaxdissect.pipelines.bases import spec_views

            if views is not None:
                raise DissectError(f"give views or bases (basis={config.bases!r}), not both; a view can name its "
                                   "basis by a spec: views={name: (layer, 'sae:8')}")
            layers, views = [], spec_views(list(layers), config.bases)
        self.views = views_of(list(layers), views)
        if not self.views:
            raise DissectError("no layers to dissect")
        self.layers = list(self.views)
        layer_shapes, out = trace_shapes(module, variables, x0[:1])
        captured = _resolve_layers(module, layer_shapes, list(dict.fromkeys(lay for lay, _, _ in self.views.values())))
        self.image_level = {v for v, (layer, _, _) in self.views.items() if len(layer_shapes[layer].shape) == 2}
        if self.generator:
            if not (isinstance(out, jax.ShapeDtypeStruct) and len(out.shape) == 4 and out.shape[-1] == 3):
                raise DissectError(f"a z data source needs a generator that outputs NHWC RGB images; "
                                   f"{type(module).__name__} outputs {out}")
            image_size = out.shape[1:3]
        else:
            image_size = x0.shape[1:3]
        self.image_size = tuple(int(s) for s in image_size)
        bs = config.batch_size or (10 if self.generator else 16)
        self.batch_size = -(-bs // self.devices) * self.devices
        from jaxdissect.pipelines.bases import model_digest

        self.model_digest = model_digest(module, variables)
        self.labeller = make_labeller(segmentation, data, probe, self.image_size, self.batch_size, self.mesh,
                                      generator=self.generator, model_digest=self.model_digest,
                                      cache_root=segmentation_cache, cache_mb=config.segmentation_cache_mb)
        self.tables = self.labeller.tables
        self.resolution = self.labeller.resolution
        if config.resolution is not None and tuple(config.resolution) != self.resolution:
            raise DissectError(
                f"resolution {tuple(config.resolution)} requested but the segmentation is {self.resolution[0]}x"
                f"{self.resolution[1]}; activations are compared at the segmentation's resolution, so drop "
                "resolution= or use a segmentation of that size")
        self.num_batches = -(-self.num_images // self.batch_size)
        self.name = name or f"{type(module).__name__} {data.name} {self.labeller.name}"
        learned = self.resolve_bases(captured, cache_dir)
        self.shapes, self.code_bytes = {}, {}
        for v, (layer, basis, params) in self.views.items():
            c = int(captured[layer][-1])
            if isinstance(basis, Linear) and basis.label == "rotation" and np.shape(params["matrix"]) != (c, c):
                m = np.shape(params["matrix"])
                raise DissectError(f"{v}: a {'x'.join(map(str, m))} rotation cannot act on layer {layer} "
                                   f"with {c} channels; build it for {c} channels "
                                   f"(jaxdissect.rotation.random_rotation_powers({c}, ...))")
            basis.check(params, c)
            self.shapes[v] = tuple(captured[layer][:-1]) + (basis.num_units(params, c),)
            # Bytes per image of the units as the passes read them (a sparse basis's codes: its listed pairs).
            codes = jax.eval_shape(basis.codes, params, jax.ShapeDtypeStruct(captured[layer], jnp.float32))
            self.code_bytes[v] = sum(int(np.prod(x.shape[1:])) * x.dtype.itemsize for x in jax.tree.leaves(codes))
        if learned:
            from jaxdissect.pipelines.bases import BasisReport

            strategies = list(strategies) + [BasisReport(learned)]
        self.scoring, self.strategies = method_strategies(config, strategies, run=self)
        options = {}
        for s in self.strategies:
            options.update(s.plan_options(self.tables))
        # A [N, U] layer is one value per image: its 1x1 map is upsampled as a constant (edge replication).
        self.plans = {
            v: Plan(num_units=int(self.shapes[v][-1]), num_labels=len(self.tables.label_names),
                    source_hw=tuple(int(s) for s in self.shapes[v][1:3]), resolution=self.resolution,
                    quantile=self.quantile, topk=int(config.topk),
                    **({"geometry": "clamped"} if v in self.image_level else
                       {"geometry": self.geometry, **self.receptive_field}), **options)
            for v in self.layers}
        resolved = config.replace(quantile=self.quantile, geometry=self.geometry)
        self.identity = {
            "config": resolved.identity(), "model": self.model_digest, "data": data.fingerprint(),
            "segmentation": self.labeller.identity(),
            "views": {v: [layer, basis.identity(params)] for v, (layer, basis, params) in self.views.items()},
            "resolution": list(self.resolution), "num_images": self.num_images, "batch_size": self.batch_size,
            "devices": self.devices}
        extra = {s.name: s.identity() for s in self.strategies if s.identity() is not None}
        if extra:
            self.identity["strategies"] = extra

    def resolve_bases(self, captured, cache_dir) -> dict:
        """Views named by a basis spec get their basis (a learned one trained from this run's data or loaded
        from ``<cache_dir>/bases``); returns ``{view: (spec text, basis, params, training info)}`` of the learned
        ones."""
        from jaxdissect.bases import BasisError
        from jaxdissect.bases.spec import BasisSpec
        from jaxdissect.pipelines import bases as bases_lib

        pending = {v: (layer, spec) for v, (layer, spec, _) in self.views.items() if isinstance(spec, BasisSpec)}
        if not pending:
            return {}
        c = self.config
        source = bases_lib.Source(self.module, self.variables, self.data, self.num_images, self.batch_size,
                                  self.input_key, self.model_digest, labeller=self.labeller,
                                  generator=self.generator, mesh=self.mesh, memory_mb=c.activation_cache_mb)
        learned = {}
        for v, (layer, spec) in pending.items():
            if spec.learned:
                self.say(f"{v}: {spec.text} basis of {layer} (trained from this run's data once, then cached)")
            try:
                basis, params, info = bases_lib.resolve(
                    spec, layer, int(captured[layer][-1]), source, cache_dir=cache_dir,
                    sae_config=bases_lib.sae_settings(c), probe_config=bases_lib.probe_settings(c),
                    unpermute=c.rotation_unpermute, progress=self.progress, log=self.say)
            except BasisError as e:
                raise DissectError(f"layer {layer}, basis {spec.text}: {e}") from None
            self.views[v] = (layer, basis, params)
            if info is not None:
                learned[v] = (spec.text, basis, params, info)
        return learned

    def say(self, message):
        if self.progress:
            logging.info("%s", message)

    def result_config(self, view) -> dict:
        """The ``config`` record of a view's ``DissectionResult``."""
        layer, basis, _ = self.views[view]
        c = self.config
        out = {"layer": view, "quantile": self.quantile, "miniou": c.miniou, "topk": c.topk,
               "row0_competes": c.row0_competes, "geometry": self.plans[view].geometry,
               "resolution": list(self.resolution),
               **({"receptive_field": _json_receptive_field(self.receptive_field)}
                  if self.receptive_field and view not in self.image_level else {}),
               **({"image_level": True} if view in self.image_level else {}), "num_images": self.num_images}
        if not isinstance(basis, Neurons):
            out["rotated_layer"] = layer
        return out

    # -- the run -------------------------------------------------------------------------------------------
    def execute(self, output_dir: str | None) -> dict:
        """Dissect into ``output_dir`` with the reports, or with None in a temporary directory (nothing kept).

        Afterwards ``found`` holds each strategy's per-view outputs (``{strategy name: {view: ...}}``) and
        ``views`` every view's resolved ``(layer, basis, params)``.
        """
        if output_dir is not None:
            return self.run(output_dir, write=True)
        tmp = tempfile.mkdtemp(prefix="jaxdissect-")
        try:
            return self.run(tmp, write=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def run(self, output_dir: str, write: bool) -> dict:
        """Dissect into ``output_dir`` (``write``: the reports too; without them the directory is a temporary
        one, so the statistics are not saved for resuming)."""
        self.output_dir = output_dir
        self.source = ModelBatches(self)
        primary = jax.process_index() == 0
        wd = streaming.Workdir(os.path.join(output_dir, WORK))
        if primary:  # one worker per work directory (the others of a multi-host job share it)
            wd.lock()
        try:
            return self._run_locked(wd, write, primary)
        finally:
            self.labeller.finish(self.say)
            wd.unlock()

    def _run_locked(self, wd, write: bool, primary: bool) -> dict:
        from jaxdissect.reports import dissection as report
        from jaxdissect.statistics import DissectionResult

        check_identity(wd, self.identity, primary)
        results_dir = os.path.join(wd.directory, "results")
        saved = [s for s in self.strategies if s.name]
        if wd.done("results"):
            results = {v: DissectionResult.load(os.path.join(results_dir, v)) for v in self.layers}
            found = {}
            for s in saved:
                found[s.name] = {}
                for v in self.layers:
                    with open(os.path.join(results_dir, f"{s.name}-{v}.json")) as f:
                        found[s.name][v] = json.load(f)
            self.say(f"statistics of {', '.join(self.layers)} loaded from {results_dir}")
        else:
            t0 = time.perf_counter()
            self.labeller.open(self.say)  # before the passes: its log lines come before the progress bars
            driver = Driver(self.source, self.plans, self.tables, mesh=self.mesh, workdir=wd.directory,
                            identity=self.identity, checkpoint_every=self.config.checkpoint_every,
                            progress=self.progress, cache_mb=self.config.activation_cache_mb, checkpoints=write,
                            log=self.say)
            results, found = driver.run(self.scoring, self.strategies,
                                        config={v: self.result_config(v) for v in self.layers})
            if primary and write:
                for v, r in results.items():
                    r.save(os.path.join(results_dir, v))
                    for s in saved:
                        fileio.write_json(os.path.join(results_dir, f"{s.name}-{v}.json"), found[s.name][v])
                fileio.write_json(os.path.join(results_dir, "run.json"), {"seconds": time.perf_counter() - t0})
                wd.mark_done("results")
        self.found = found
        skipped = self.num_images - int(results[self.layers[0]].images)
        if skipped:
            names = sorted(getattr(self.data, "bad_files", {}).values())
            logging.warning("%d of %d images could not be read and were left out%s", skipped,
                            self.num_images, ":\n  " + "\n  ".join(names) if names else "")
        if not write or not primary:
            return results
        out = report.Outputs(self.output_dir, self.strategies, found, miniou=self.config.miniou,
                             title=self.name + (f" ({skipped} unreadable images skipped)" if skipped else ""))
        todo = [v for v in self.layers if not wd.done(f"layer-{v}")]
        if todo:
            self.say(f"unit strips and reports for {', '.join(todo)}")
            strips = self.strips({v: results[v] for v in todo})
            for v in todo:
                out.write_layer(v, results[v], strips[v])
                wd.mark_done(f"layer-{v}")
        out.write_run(self.layers, results, self.run_settings(skipped), images=self.num_images - skipped,
                      skipped=skipped,
                      skipped_files=sorted(str(f) for f in getattr(self.data, "bad_files", {}).values()))
        return results

    def run_settings(self, skipped) -> dict:
        """The run's settings table (the strategies add theirs after these)."""
        c = self.config
        settings = {"model": type(self.module).__name__, "data": f"{self.data.name} ({self.num_images} items)",
                    "segmenter": self.labeller.name}
        settings.update(self.settings)
        settings.update({"images read": self.num_images - skipped,
                         "quantile": f"{self.quantile:g} (threshold: each unit's top {self.quantile:.2%} of "
                                     "activations)",
                         "IoU cut-off": f"{c.miniou:g} (a unit is a detector when its best IoU exceeds it)",
                         "geometry": self.geometry})
        if c.method != "pnas":
            settings["method"] = c.method
        return settings

    # -- thumbnails --------------------------------------------------------
    def strips(self, results: Mapping[str, Any]) -> dict[str, dict[int, np.ndarray]]:
        """Per view ``{unit: strip}``: each unit's top images, its region above threshold highlighted.

        Only the images in some unit's top ``STRIP_IMAGES`` are read again; their
        activations are recomputed (every view in one forward pass per batch).
        """
        from jaxdissect.reports import strips as strip_lib

        wanted: dict[int, list] = {}
        for name, r in results.items():
            for u, row in enumerate(np.asarray(r.top_index)[:, :STRIP_IMAGES]):
                for rank, image in enumerate(row):
                    if image >= 0:
                        wanted.setdefault(int(image), []).append((name, u, rank))
        thumbs: dict[tuple, np.ndarray] = {}
        source = self.source
        forward = source.forward_fn()
        order = sorted(wanted)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = self.data.get_batch(chunk)
            x = loader.pad_batch({"x": np.asarray(batch[self.input_key])}, self.batch_size)["x"]
            out, acts = forward(source.replicated_variables(), parallel.shard_batch(self.mesh, x))
            display = _to_bytes_zc(out) if self.generator else np.asarray(batch["display"])
            # The receptive-field grid highlights the region the IoU counted, not the default bilinear one.
            masks = ({n: np.asarray(_unit_mask_fn(self.plans[n])(a, jnp.asarray(results[n].thresholds, jnp.float32)))
                      for n, a in acts.items() if n in results} if self.geometry == "receptive_field" else {})
            acts = {n: np.asarray(a) for n, a in acts.items()}
            for j, image in enumerate(chunk):
                for name, u, rank in wanted[image]:
                    thumbs[(name, u, rank)] = strip_lib.masked_thumbnail(
                        display[j], acts[name][j, :, :, u], float(results[name].thresholds[u]),
                        self.config.thumbsize, mask=masks[name][j, :, :, u] if name in masks else None)
        out_strips = {}
        for name, r in results.items():
            per_unit = {}
            for u in range(len(r.thresholds)):
                images = [thumbs[(name, u, k)] for k in range(STRIP_IMAGES) if (name, u, k) in thumbs]
                if images:
                    per_unit[u] = strip_lib.unit_strip(images)
            out_strips[name] = per_unit
        return out_strips


def dissect(module, variables, layers: str | Sequence[str], data, segmentation="dataset",
            config: DissectConfig | Mapping[str, Any] | None = None, *, views: Mapping[str, tuple] | None = None,
            output_dir: str | None = None, mesh=None, progress: bool = True, name: str | None = None,
            settings: Mapping[str, Any] | None = None, segmentation_cache: str | None = None,
            strategies: Sequence[Strategy] = (), cache_dir: str | None = None, **overrides) -> dict:
    """Dissect ``layers`` of ``module`` over ``data``; returns ``{layer: DissectionResult}``.

    Args:
      module, variables: a Flax Linen model and its variables (``jaxdissect.load_model``).
      layers: layer names ('.'-joined module paths, see ``jaxdissect.layer_names``): ``[N, H, W, U]``
        feature maps, or ``[N, U]`` layers (one value per image: a dense layer, a ViT's ``_cls`` token).
      data: a data source (``PlacesFolder``, ``ImageFolder``, ``LatentSource``,
        ``BrodenSource``, ``SyntheticScenes`` or your own, see ``jaxdissect.data``).
      segmentation: ``(segmenter, variables)`` from ``jaxdissect.load_segmenter``,
        ``'dataset'`` for the labels the data source provides, or None for no labels.
      config: the dissection's settings, a :class:`jaxdissect.config.DissectConfig`
        (or a dict of its fields; None: the defaults). ``**overrides`` replace
        some of its fields, e.g. ``dissect(..., quantile=0.02, topk=20)``:
        quantile, miniou, topk, thumbsize, batch_size, num_images, geometry,
        receptive_field, resolution, row0_competes, method, formulas,
        exact_formulas, significance, permutations, q, label_metrics, scorer,
        vocabulary, similarity, similarity_top_k, checkpoint_every, activation_cache_mb, segmentation_cache_mb (see the
        field docs there).
      views: ``{name: (layer, basis, params)}`` or ``{name: (layer, R or None)}``
        to dissect named views of captured layers instead of ``layers``
        (results keyed by name): a basis (``jaxdissect.bases``) maps the
        layer's channels to its units right after capture, before the
        thresholds; a ``[C, C]`` matrix ``R`` is the rotation ``a' = R a``
        (``jaxdissect.rotation``); several views of one layer share the passes.
      output_dir: where reports and the resumable work directory (``work/``) go;
        None keeps nothing on disk (temporary work directory, no reports).
      mesh: a ``jaxdissect.parallel.make_mesh`` mesh (default: all devices).
      progress: show each pass's progress bar (rate, ETA) and log each step;
        False silences it (``jaxdissect.progress.set_enabled`` for everything).
      name: report header (default ``"<Model> <data> <segmentation>"``).
      settings: extra ``{name: value}`` shown in the report's header (e.g. model, segmenter).
      segmentation_cache: a directory (e.g. the per-user cache) where the label
        maps of a ``(segmenter, variables)`` segmentation are kept on disk and
        shared by every later dissection of the same data (``jaxdissect.segmentation.cache``).
        None (the default): no disk cache. Results are identical either way.
      strategies: more method strategies (``jaxdissect.driver.Strategy``):
        add-ons after the config's, or a ``Scoring`` that replaces its scoring.
      cache_dir: the per-user cache (None: ``jaxdissect.fileio.default_cache_dir()``)
        where a CLIP scorer's text embeddings of a vocabulary (``scorer=...``) and
        learned bases (``basis='sae:8'``, ``probe:net2vec``, or a spec in
        ``views``) are kept once computed, the latter under ``bases/``.

    With ``basis`` (``dissect(..., basis='neurons;sae:8,k=32')``, see
    :mod:`jaxdissect.pipelines.bases`), every layer is dissected in every
    listed basis in one run: results keyed ``layer`` (one basis) or
    ``layer@<spec>``.
    """
    config = config_lib.create(config, **overrides)
    layers = [layers] if isinstance(layers, str) else list(layers)
    run = Dissection(module, variables, layers, data, segmentation, config, views=views, mesh=mesh,
                     progress=progress, name=name, settings=settings, segmentation_cache=segmentation_cache,
                     strategies=strategies, cache_dir=cache_dir)
    return run.execute(output_dir)


def check_identity(wd, identity, primary=True):
    """Refuse a work directory written with another identity; record it in a new one (``config.json``)."""
    path = os.path.join(wd.directory, "config.json")
    normalized = json.loads(json.dumps(identity, sort_keys=True, default=_json_default))
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored != normalized:
            diff = sorted(k for k in set(stored) | set(normalized) if stored.get(k) != normalized.get(k))
            if "config" in diff:
                inner, now = stored.get("config") or {}, normalized["config"]
                diff.remove("config")
                diff += sorted(k for k in set(inner) | set(now) if inner.get(k) != now.get(k))
            raise DissectError(
                f"{os.path.dirname(wd.directory)} holds a dissection with other settings (differing: "
                f"{', '.join(diff)}); choose another output_dir or delete {wd.directory} to recompute")
    elif primary:
        fileio.write_json(path, normalized)


# --------------------------------------------------------------------------
# Helpers


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(repr(value))


def _to_bytes_zc(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8, as ``(x + 1) / 2`` (the corrected generator rendering)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=32)
def _unit_mask_fn(plan):
    """Jitted ``(acts [B, h, w, U], thresholds [U]) -> bool [B, S, S, U]``: the masks pass 3 counts."""
    return jax.jit(lambda acts, t: plan.upsample(acts) > t)


def _json_receptive_field(rf: dict) -> dict:
    return {"convolutions": [list(c) for c in rf["convolutions"]], "image_size": rf["image_size"]}
