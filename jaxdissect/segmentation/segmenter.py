"""Segment images into the concept labels of Network Dissection (the original's ``netpqc`` segmenter).

    segmenter, variables = load_segmenter(upp_dir="models/upp", color_dir="models/color")
    labels, label_names, label_categories = segment(segmenter, variables, images)

``images`` are RGB in [-1, 1], NHWC ``[N, H, W, 3]``; ``labels`` is int32
``[N, K, H / 4, W / 4]`` with, for ``netpqc``, K = 6 channels: object, material,
part, quadrant top/bottom, quadrant left/right, colour. Label numbers index
``label_names`` (0 = no label); see :mod:`jaxdissect.segmentation.labels` for
the numbering (identical to the original's) and the two decisions about its
quirks (last quadrant component: faithful by default, ``quad_quirk=False``
corrects it; colour "no label": written as 0 by default,
``faithful_color_blank=True`` reproduces the original).

The segmenter is a Flax Linen module whose fields hold the networks and the
static label tables, so the whole path (preprocessing, both networks, softmax
voting over sizes, argmax merging, connected components for the quadrants) is
one jit-compiled function. Everything is per image, so a batch sharded over a
device mesh (``jaxdissect.parallel.shard_batch``) is segmented in place, each
device working on its own images.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.checkpoint import CheckpointError, load_metadata, load_model
from jaxdissect.segmentation import labels as L
from jaxdissect.segmentation.preprocess import color_preprocess, upp_preprocess
from jaxdissect.errors import JaxDissectError

UPP_SEGSIZES = (256,)  # the original's UnifiedParsingSegmenter(segsizes=[256])
_CONVERT_HINT = ("convert the published files first: python -m converters.segmenter "
                 "--encoder=encoder_epoch_N.pth --decoder=decoder_epoch_N.pth --labels=labels.json "
                 "--output=DIR")


class SegmenterError(JaxDissectError, ValueError):
    """Segmenter files or inputs cannot be used; the message says why and what to do."""


def _group_softmax(x: jax.Array, sizes) -> jax.Array:
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return jnp.concatenate([jax.nn.softmax(x[..., a:b], axis=-1)
                            for a, b in zip(starts[:-1], starts[1:])], axis=-1)


class Segmenter(nn.Module):
    """UPP (+ colour) segmenter with its label tables: ``apply(variables, images, downsample)``.

    Returns int32 ``[N, K, H // downsample, W // downsample]`` label maps in the
    merged numbering of ``tables``. Attributes ``label_names``,
    ``label_categories`` and ``categories`` describe the labels.
    """

    tables: L.MergedLabels
    upp: Any  # jaxdissect.segmentation.UnifiedParsing
    color: Any = None  # jaxdissect.segmentation.ColorSegmenter, with a 'c' setting
    setting: str = "netpqc"
    quad_quirk: bool = True
    upp_segsizes: tuple[int, ...] = UPP_SEGSIZES

    @property
    def label_names(self) -> list[str]:
        return list(self.tables.label_names)

    @property
    def label_categories(self) -> list[str]:
        return list(self.tables.label_categories)

    @property
    def categories(self) -> list[str]:
        return list(self.tables.categories)

    def __call__(self, images: jax.Array, downsample: int = 4) -> jax.Array:
        seg_size = (images.shape[1] // downsample, images.shape[2] // downsample)
        upp = self.tables.upp
        # Sum of per-size softmaxes, as the original votes over segsizes (argmax only matters).
        scores = None
        for size in self.upp_segsizes:
            out = self.upp(upp_preprocess(images, size), seg_size)
            probs = (jax.nn.softmax(out["object"], -1), jax.nn.softmax(out["material"], -1),
                     _group_softmax(out["part"], upp.part_sizes))
            scores = probs if scores is None else tuple(a + b for a, b in zip(scores, probs))
        maps = [L.merge_upp(*scores, upp, quad_quirk=self.quad_quirk)]
        if self.tables.color is not None:
            table = self.tables.color
            pred = 0.0
            for size in table.segsizes:
                x = color_preprocess(images, table.imageformat_dict(), size)
                pred = pred + L.color_category_softmax(self.color(x, seg_size), table)
            maps.append(L.offset_color(L.merge_color(pred, table), self.tables))
        return jnp.concatenate(maps, axis=1).astype(jnp.int32)


def _model_dir(path: str | None, kind: str, setting: str, argname: str):
    if path is None:
        raise SegmenterError(
            f"segmenter setting {setting!r} needs the {kind} segmenter: pass {argname}=DIR, "
            f"a converted model directory ({_CONVERT_HINT})")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise SegmenterError(f"{argname}={path} does not exist; {_CONVERT_HINT}")
    try:
        meta = load_metadata(path)
    except CheckpointError as e:
        raise SegmenterError(f"{argname}={path}: {e}") from e
    expected = "upp" if argname == "upp_dir" else "color"
    if meta.get("kind") != expected or "labels" not in meta:
        other = {"upp": "upp_dir", "color": "color_dir"}.get(meta.get("kind"))
        hint = f"; it looks like a {meta.get('kind')} segmenter: pass it as {other}" if other else ""
        raise SegmenterError(f"{argname}={path} is not a converted {expected} segmenter "
                             f"(metadata kind {meta.get('kind')!r}){hint}")
    return path, meta


def load_segmenter(upp_dir: str | None = None, color_dir: str | None = None, setting: str = "netpqc",
                   *, dtype=None, quad_quirk: bool = True, faithful_color_blank: bool = False):
    """Load converted segmenters for ``setting``: returns ``(segmenter, variables)``.

    ``setting`` is the original's segmenter name: ``net`` + ``p`` (parts of every
    object, not only sky/building/person), ``q`` (quadrants), ``c`` (colour,
    needs ``color_dir``). ``dtype`` (e.g. ``jnp.bfloat16``) sets the networks'
    compute dtype; parameters stay float32.
    """
    try:
        parsed = L.parse_setting(setting)
    except L.LabelError as e:
        raise SegmenterError(str(e)) from e
    if color_dir is not None and not parsed.color:
        raise SegmenterError(f"color_dir was given but setting {setting!r} has no colour segmenter; "
                             f"use {setting + 'c'!r} or drop color_dir")
    upp_path, upp_meta = _model_dir(upp_dir, "UPP (unified parsing)", setting, "upp_dir")
    color_path = color_meta = None
    if parsed.color:
        color_path, color_meta = _model_dir(color_dir, "colour", setting, "color_dir")
    try:
        tables = L.merged_labels(parsed, upp_meta["labels"],
                                 color_meta["labels"] if color_meta else None, faithful_color_blank)
    except L.LabelError as e:
        raise SegmenterError(f"labels stored with the segmenters: {e}") from e
    upp_module, upp_vars = load_model(upp_path, dtype=dtype)
    try:
        L.check_sizes(tables.upp, upp_module.part_sizes, upp_module.n_object, upp_module.n_material,
                      upp_path)
    except L.LabelError as e:
        raise SegmenterError(str(e)) from e
    parts = {"upp": (upp_module, upp_vars)}
    if color_path:
        color_module, color_vars = load_model(color_path, dtype=dtype)
        if color_module.n_labels != tables.color.n_channels_in:
            raise SegmenterError(f"{color_path}: network has {color_module.n_labels} outputs but its "
                                 f"labels list {tables.color.n_channels_in}; convert it again")
        parts["color"] = (color_module, color_vars)
    variables: dict = {}
    for name, (_, v) in parts.items():
        for collection, tree in v.items():
            variables.setdefault(collection, {})[name] = tree
    segmenter = Segmenter(tables=tables, upp=upp_module, color=parts.get("color", (None,))[0],
                          setting=setting, quad_quirk=quad_quirk)
    return segmenter, variables


@functools.partial(jax.jit, static_argnums=(0, 3))
def _segment(segmenter: Segmenter, variables, images, downsample: int):
    return segmenter.apply(variables, images, downsample)


def _check_images(images, downsample: int, check_range: bool):
    if not isinstance(downsample, int) or downsample < 1:
        raise SegmenterError(f"downsample must be a positive integer, got {downsample!r}")
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise SegmenterError(
            f"images must be NHWC RGB [N, H, W, 3] in [-1, 1]; got shape {shape} "
            "(for NCHW arrays use x.transpose(0, 2, 3, 1))")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise SegmenterError(f"images must be floating point in [-1, 1], got {images.dtype} "
                             "(for uint8 bytes use x / 127.5 - 1)")
    if shape[1] < downsample or shape[2] < downsample:
        raise SegmenterError(f"image size {shape[1]}x{shape[2]} is smaller than downsample={downsample}")
    if check_range and not isinstance(images, jax.core.Tracer):
        xp = np if isinstance(images, np.ndarray) else jnp
        lo, hi = float(xp.min(images)), float(xp.max(images))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise SegmenterError("images contain NaN or infinite values")
        if lo < -1.5 or hi > 1.5:
            raise SegmenterError(
                f"images range over [{lo:.3g}, {hi:.3g}], not [-1, 1]: segmenters take RGB scaled "
                "to [-1, 1] (bytes: x / 127.5 - 1; ImageNet-normalised: undo the normalisation)")


def segment(segmenter: Segmenter, variables, images, downsample: int = 4, *, check_range: bool = True):
    """Label maps of ``images``: ``(labels int32 [N, K, H/ds, W/ds], label_names, label_categories)``.

    ``images``: RGB in [-1, 1], NHWC ``[N, H, W, 3]``; the label maps are
    ``H // downsample`` by ``W // downsample`` (as the original: 227 -> 56). ``label_names[n]`` / ``label_categories[n]`` describe label
    number ``n``; ``segmenter.categories`` lists the categories in the original's
    order. Compiled once per input shape; a batch sharded over devices stays sharded.
    ``check_range`` checks that values are finite and within [-1.5, 1.5] (one
    small reduction; pass False to skip it for arrays already known good).
    """
    if not isinstance(segmenter, Segmenter):
        raise SegmenterError("segment() needs the segmenter returned by load_segmenter()")
    if not isinstance(images, jax.Array):
        images = np.asarray(images)
    _check_images(images, downsample, check_range)
    labels = _segment(segmenter, variables, images, downsample)
    return labels, segmenter.label_names, segmenter.label_categories


def segmenter_from_spec(spec: str, **options):
    """``(segmenter, variables)`` from a command-line spec ``upp=<dir>[,color=<dir>][,setting=netpqc]``.

    ``options`` (``quad_quirk``, ``faithful_color_blank``) go to :func:`load_segmenter`.
    """
    fields = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in ("upp", "color", "setting"):
            raise SegmenterError(f"segmenter spec {spec!r}: expected comma-separated upp=<dir>, color=<dir>, "
                                 f"setting=<netpqc...>; cannot read {item!r}")
        fields[key.strip()] = value.strip()
    for key in ("upp", "color"):
        if key in fields and not os.path.isdir(fields[key]):
            raise SegmenterError(f"segmenter spec: {key} directory {fields[key]} does not exist; {_CONVERT_HINT}")
    return load_segmenter(fields.get("upp"), fields.get("color"), setting=fields.get("setting", "netpqc"),
                          **options)
