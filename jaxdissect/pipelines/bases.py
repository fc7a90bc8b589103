"""Bases in the pipelines: specs turned into views, learned bases trained from the run's own data.

A dissection's ``basis`` setting (``DissectConfig.basis``, ``launch.dissect
--basis``) lists bases as specs (:mod:`jaxdissect.bases.spec`: ``neurons``,
``rotation:ALPHA[:SEED]``, ``sae:EXPANSION[,k=K]``, ``probe:net2vec``). Every
layer is dissected in every basis in ONE run (the views share each pass over
the data): view ``layer`` when one basis is listed, and for ``neurons``;
``layer@<spec>`` otherwise (:func:`spec_views`).

:func:`resolve` turns a spec into ``(basis, params, info)`` for one layer. A
fixed basis is built at once; a learned one is trained from the same
pipeline's data, or loaded from the per-user cache where it is kept, keyed by
the model (a digest of its variables), layer, data, images, batch size and
training settings (:class:`Source`): an SAE on the layer's activations
streamed through the model (:func:`jaxdissect.bases.sae.activation_batches`),
a probe on the activations and the run's own labels
(:func:`labelled_batches`: the labeller's segmentation of each image).
Training resumes after a kill; two processes asking for the same basis train
it once.

:class:`BasisReport` shows a learned basis's training in the report: a figure
per layer (SAE: loss, fraction of variance unexplained and dead features per
training batch; probe: held-out IoU per concept and the loss per epoch),
headline numbers, the settings, and for a probe each unit's concept and
held-out IoU in ``report.json``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxdissect.bases import BasisError, probe, sae
from jaxdissect.bases import spec as spec_lib
from jaxdissect.driver import Strategy

FIGURE = "basis.svg"
BASIS_DIR = "basis"


def view_name(layer: str, spec: spec_lib.BasisSpec, several: bool) -> str:
    """``layer`` for the neurons or a lone basis, else ``layer@<spec>`` (e.g. ``conv5_3@sae:8,k=32``)."""
    return layer if spec.kind == "neurons" or not several else f"{layer}@{spec.text}"


def spec_views(layers: Sequence[str], bases: str) -> dict[str, tuple[str, spec_lib.BasisSpec]]:
    """``{view: (layer, spec)}``: every layer in every basis of ``bases`` (``;``-separated specs)."""
    specs = spec_lib.parse_list(bases)
    return {view_name(layer, s, len(specs) > 1): (layer, s) for layer in layers for s in specs}


def model_digest(module, variables) -> dict:
    """What names a model's weights in a run's identity and in a learned basis's cache key."""
    from jaxdissect.segmentation import cache as segcache

    return {"class": f"{type(module).__module__}.{type(module).__name__}",
            "variables": segcache.variables_digest(variables)}


def layer_basis(text: str, module, variables, layer: str, data, *, batch_size: int = 16,
                num_images: int | None = None, cache_dir: str | None = None, config=None,
                progress: bool | None = None, log=None):
    """``(basis, params, info)`` of ``layer`` in basis ``text``, trained (or loaded) from ``data`` outside a dissection.

    As a dissection of the same model, data, images and batch size would
    train it (the same cache entry); a probe learns from the data's own
    segmentation (``seg``). ``config``: a ``DissectConfig`` whose ``sae_*`` and
    ``probe_*`` fields set the training (default: their defaults).
    """
    from jaxdissect import config as config_lib
    from jaxdissect import parallel
    from jaxdissect.labellers import make_labeller
    from jaxdissect.layers import layer_shapes

    spec = spec_lib.parse(text)
    config = config or config_lib.DissectConfig()
    first = data.get_batch([0])
    key = "image" if "image" in first else "z"
    x = np.asarray(first[key])[:1]
    shape = layer_shapes(module, variables, x).get(layer)
    if shape is None or isinstance(shape, tuple):
        raise BasisError(f"unknown layer {layer!r} of {type(module).__name__}")
    mesh = parallel.make_mesh()
    batch_size = -(-batch_size // mesh.size) * mesh.size
    labeller = None
    if spec.kind == "probe" and "seg" in first:
        labeller = make_labeller("dataset", data, first, tuple(x.shape[1:3]), batch_size, mesh, generator=False)
    n = len(data) if num_images is None else min(int(num_images), len(data))
    source = Source(module, variables, data, n, batch_size, key, model_digest(module, variables), labeller=labeller,
                    mesh=mesh, memory_mb=config.activation_cache_mb)
    return resolve(spec, layer, int(shape.shape[-1]), source, cache_dir=cache_dir, sae_config=sae_settings(config),
                   probe_config=probe_settings(config), unpermute=config.rotation_unpermute, progress=progress,
                   log=log)


class _First:
    """The first ``n`` items of a data source (what the run dissects, so what a learned basis sees)."""

    def __init__(self, data, n: int):
        self.data, self.n = data, int(n)

    def __len__(self) -> int:
        return self.n

    def get_batch(self, indices):
        return self.data.get_batch(indices)


@dataclasses.dataclass
class Source:
    """What learned bases are trained from: ``module`` over the first ``num_images`` items of ``data``.

    ``model_digest`` (JSON-able) names the weights in the cache key;
    ``labeller`` (``jaxdissect.labellers``) gives a probe its labels, on
    ``mesh``; ``generator``: the labels are of the model's output images.
    """

    module: Any
    variables: Any
    data: Any
    num_images: int
    batch_size: int
    input_key: str
    model_digest: Any
    labeller: Any = None
    generator: bool = False
    mesh: Any = None
    memory_mb: int = 1024          # activations (and labels) are kept in memory between epochs when they fit
    _streams: dict = dataclasses.field(default_factory=dict, repr=False)

    def identity(self, layer: str) -> dict:
        """The cache key's data part: model, layer, data, images and batch size."""
        return {"model": self.model_digest, "layer": layer, "data": self.data.fingerprint(),
                "images": self.num_images, "batch_size": self.batch_size}

    def activations(self, layer: str, num_batches: int, seed: int):
        """``batches(start)`` of ``layer``'s activations (epochs of the images in seeded orders); the model runs
        once per image when they fit ``memory_mb``, and once for every SAE of the layer."""
        key = (layer, num_batches, seed)
        if key not in self._streams:
            self._streams[key] = sae.activation_batches(
                self.module, self.variables, layer, _First(self.data, self.num_images), batch_size=self.batch_size,
                num_batches=num_batches, input_key=self.input_key, seed=seed, memory_mb=self.memory_mb)
        return self._streams[key]


def labelled_batches(source: Source, layer: str) -> Callable[[], Any]:
    """``batches()`` of ``(acts [b, h, w, C], seg [b, K, S, S])`` over the run's images, in order.

    The labels are the labeller's (the data's own or a segmenter's, through
    its cache), exactly those the dissection scores against; unreadable
    images are left out. Kept in host memory when they fit ``memory_mb``.
    """
    from jaxdissect import parallel
    from jaxdissect.data import loader
    from jaxdissect.layers import capture

    s = source
    mesh = s.mesh if s.mesh is not None else parallel.make_mesh()
    def capture_layer(v, x):
        out, acts = capture(s.module, v, x, [layer])
        return out, acts[layer]

    forward = jax.jit(capture_layer)
    keys = (s.input_key,) + tuple(s.labeller.keys)

    def generate():
        for start in range(0, s.num_images, s.batch_size):
            real = np.arange(start, min(start + s.batch_size, s.num_images))
            full = s.data.get_batch(real)
            batch = {k: np.asarray(v) for k, v in full.items() if k in keys}
            batch["valid"] = np.asarray(full.get("valid", np.ones(real.size, bool)), bool)
            batch["index"] = real.astype(np.int32)
            batch = loader.pad_batch(batch, s.batch_size)
            on_mesh = parallel.shard_batch(mesh, batch)
            out, acts = forward(s.variables, on_mesh[s.input_key])
            seg, _ = s.labeller.labels(on_mesh, out if s.generator else None)
            keep = batch["valid"]
            yield np.asarray(acts, np.float32)[keep], np.asarray(seg)[keep]

    s.labeller.open(lambda message: None)
    held: list = []
    size = 0
    for item in generate():
        held.append(item)
        size += item[0].nbytes + item[1].nbytes
        if size > s.memory_mb * 2**20:
            return generate
    return lambda: iter(held)


def sae_settings(config) -> sae.Settings:
    """SAE training settings of a ``DissectConfig`` (expansion and k come from each spec)."""
    return sae.Settings(num_batches=config.sae_batches, minibatch=config.sae_minibatch,
                        learning_rate=config.sae_learning_rate)


def probe_settings(config) -> probe.Settings:
    """Probe training settings of a ``DissectConfig``."""
    return probe.Settings(epochs=config.probe_epochs)


def resolve(spec: spec_lib.BasisSpec, layer: str, channels: int, source: Source | None, *, cache_dir: str | None,
            sae_config: sae.Settings | None = None, probe_config: probe.Settings | None = None,
            unpermute: bool = False, progress: bool | None = None, log=None):
    """``(basis, params, info)`` of ``spec`` on ``layer`` (``channels`` channels); ``info`` None for a fixed basis.

    A learned basis is trained from ``source`` (or loaded from
    ``<cache_dir>/bases``, default the per-user cache).
    """
    if not spec.learned:
        basis, params = spec.build(channels, unpermute)
        return basis, params, None
    if source is None:
        raise BasisError(f"{spec.text} is learned from data: give the model and data it is trained on")
    if cache_dir is None:
        from jaxdissect.fileio import default_cache_dir

        cache_dir = default_cache_dir()
    identity = source.identity(layer)
    if spec.kind == "sae":
        settings = dataclasses.replace(sae_config or sae.Settings(), expansion=spec.expansion, k=spec.k)
        return spec_lib.resolve(spec, channels, cache_dir=cache_dir, identity=identity, settings=settings,
                                activations=source.activations(layer, settings.num_batches, settings.seed),
                                progress=progress, log=log)
    labeller = source.labeller
    if labeller is None or len(labeller.tables.label_names) < 2:
        raise BasisError(f"{spec.text} learns concept directions from segmentation labels; give a segmentation "
                         "('dataset' or a segmenter)")
    names = list(labeller.tables.label_names)
    identity["labels"] = labeller.identity()
    return spec_lib.resolve(spec, channels, cache_dir=cache_dir, identity=identity,
                            settings=probe_config or probe.Settings(),
                            labelled=labelled_batches(source, layer), num_labels=len(names), label_names=names,
                            progress=progress, log=log)


# --------------------------------------------------------------------------
# The report


def summary(info: Mapping | None) -> dict:
    """Headline numbers of a learned basis's training (empty for a fixed one).

    SAE: ``fvu`` (fraction of the layer's variance its reconstruction leaves
    unexplained, mean of the last tenth of the training batches) and ``dead``
    (features that fired in none of the last ``dead_after`` training
    samples). Probe: ``heldout_iou`` (mean over the concepts of the IoU of
    ``probe > 0`` with the concept on the held-out images).
    """
    if not info:
        return {}
    if "curve" in info:
        fvu = np.asarray(info["curve"]["fvu"], np.float64)
        return {"fvu": float(fvu[-max(1, len(fvu) // 10):].mean()), "dead": int(info["curve"]["dead"][-1])}
    return {"heldout_iou": float(np.mean(info["heldout_iou"])) if info.get("heldout_iou") else 0.0}


def write_figure(path: str, view: str, info: Mapping) -> str:
    """The training figure of a learned basis (SVG): the SAE's curves or the probe's held-out IoU."""
    from jaxdissect.plotting import pyplot, save_figure

    plt = pyplot()
    if "curve" in info:
        curve = info["curve"]
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        steps = np.arange(1, len(curve["fvu"]) + 1)
        axes[0].plot(steps, curve["loss"], label="loss")
        axes[0].plot(steps, curve["fvu"], label="FVU")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("training batch")
        axes[0].legend(fontsize=8)
        axes[1].plot(steps, curve["dead"], color="tab:red")
        axes[1].set_xlabel("training batch")
        axes[1].set_ylabel(f"dead features (of {info['units']})")
        fig.suptitle(f"{view}: TopK SAE training (FVU: fraction of variance unexplained)", fontsize=9)
    else:
        iou = np.asarray(info["heldout_iou"], np.float64)
        fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.25 * len(iou) + 3), 3),
                                 gridspec_kw={"width_ratios": [3, 1]})
        axes[0].bar(np.arange(len(iou)), iou, color="tab:green")
        axes[0].set_xticks(np.arange(len(iou)))
        axes[0].set_xticklabels(info["concepts"], rotation=90, fontsize=6)
        axes[0].set_ylabel(f"held-out IoU ({info['heldout_images']} images)")
        axes[1].plot(np.arange(1, len(info["loss"]) + 1), info["loss"], marker="o")
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("loss")
        fig.suptitle(f"{view}: Net2Vec probe directions, held-out IoU of probe > 0 per concept", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


class BasisReport(Strategy):
    """The learned bases in the report: ``learned`` is ``{view: (spec text, basis, params, info)}``.

    Each learned view's folder gets ``basis/`` (the basis itself, as the
    cache keeps it, so interventions act on exactly the dissected features:
    :func:`load_view_basis`) and ``basis.svg`` (its training).
    """

    name = "bases"

    def __init__(self, learned: Mapping[str, tuple]):
        self.learned = dict(learned)

    def finish(self, driver, taps):
        return {v: {"spec": self.learned[v][0], **summary(self.learned[v][3])} if v in self.learned else {}
                for v in driver.views}

    def unit_fields(self, view, found):
        info = self.learned[view][3] if view in self.learned else None
        if not info or "concepts" not in info:
            return None
        return [{"concept": c, "heldout_iou": float(i)} for c, i in zip(info["concepts"], info["heldout_iou"])]

    def summary_row(self, view, found, units):
        return {f"basis {k}": v for k, v in (found or {}).items()}

    def layer_numbers(self, view, result, units):
        if view not in self.learned:
            return {}
        text, _, _, info = self.learned[view]
        names = {"fvu": "SAE FVU (training)", "dead": "dead features (training)",
                 "heldout_iou": "probe held-out IoU (mean)"}
        return {"basis": text, **{names[k]: v for k, v in summary(info).items()}}

    def settings(self):
        return {f"basis of {view}": f"{text} (trained once, cached in {info.get('path', '?')})"
                for view, (text, _, _, info) in self.learned.items()}

    def write_layer(self, directory, view, result):
        if view in self.learned:
            from jaxdissect.bases import cache

            _, _, params, info = self.learned[view]
            os.makedirs(os.path.join(directory, BASIS_DIR), exist_ok=True)
            cache.save(os.path.join(directory, BASIS_DIR), params, {k: v for k, v in info.items() if k != "path"})
            write_figure(os.path.join(directory, FIGURE), view, info)

    def layer_figures(self, view):
        if view not in self.learned:
            return ()
        caption = "SAE training curve" if "curve" in self.learned[view][3] else "probe held-out IoU per concept"
        return ((FIGURE, caption),)


def load_view_basis(view_dir: str):
    """``(basis, params, info)`` of a dissected view's learned basis (``<view_dir>/basis/``), or None."""
    import json

    folder = os.path.join(view_dir, BASIS_DIR)
    if not os.path.exists(os.path.join(folder, "info.json")):
        return None
    with open(os.path.join(folder, "info.json")) as f:
        kind = json.load(f).get("format")
    return (sae.load if kind == "jaxdissect-sae" else probe.load)(folder)


def dissected_view(dissection_dir: str, layer: str, text: str | None, channels: int, unpermute: bool = False):
    """``(view, (basis, params) or None)``: the view of ``layer`` a dissection holds in basis ``text``.

    The folder is ``<layer>@<spec>`` (several bases dissected) or ``<layer>``
    (one). A learned basis is read from the folder (the features that were
    dissected); a fixed one is rebuilt from its spec. None or ``neurons``:
    ``(layer, None)``.
    """
    s = spec_lib.parse(text) if text else spec_lib.BasisSpec("neurons")
    if s.kind == "neurons":
        return layer, None
    for view in (f"{layer}@{s.text}", layer):
        folder = os.path.join(dissection_dir, view.replace("/", "_"))
        if not os.path.isdir(folder):
            continue
        if not s.learned:
            return view, s.build(channels, unpermute)
        found = load_view_basis(folder)
        if found is not None and found[0].describe() == s.text:
            return view, found[:2]
    raise BasisError(f"{dissection_dir} holds no dissection of {layer} in basis {s.text} (no folder {layer}@{s.text} "
                     f"or {layer} with its basis/); dissect it first: python -m launch.dissect --layers={layer} "
                     f"--basis='{s.text}' --output_dir={dissection_dir}")
