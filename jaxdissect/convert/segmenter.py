"""Convert the published CSAIL segmenters (PyTorch) into jaxdissect model directories.

    python -m converters.segmenter --encoder=encoder_epoch_40.pth \
        --decoder=decoder_epoch_40.pth --labels=labels.json --output=DIR [--kind=upp|color]

``upp`` is the unified perceptual parser (deep-stem ResNet-50 + UPerNet,
``upp-resnet50-upernet``), ``color`` the colour segmenter (dilated ResNet-18 +
PPM deep-sup, ``color-resnet18dilated-ppm_deepsup``); by default the kind is
read from the decoder's keys. Unlike the original (``strict=False``), every
key and shape of both files is checked. Tolerated and dropped: BatchNorm
``num_batches_tracked`` counters, an encoder ``fc.weight``/``fc.bias`` (a
full ResNet's classifier, unused), and, for ``color``, the deep-supervision
branch ``cbr_deepsup.*``/``conv_last_deepsup.*`` (checked, used only in training).
The class counts of the decoder must agree with ``labels.json``, which is
stored whole in the model's metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.convert import common
from jaxdissect.checkpoint import save_model

KINDS = ("upp", "color")
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_SHAPE_PROBE = 64  # input side used to trace parameter shapes (any multiple of 32 works)


# ----------------------------------------------------------------------------- labels.json

def _fail_labels(path, problem):
    raise common.ConversionError(f"{path}: {problem}; use the labels.json distributed with this segmenter")


def read_labels(path: str) -> dict:
    """Parse ``labels.json`` (clear errors for a missing or malformed file)."""
    if not os.path.exists(path):
        raise common.ConversionError(f"labels file {path} does not exist; pass --labels=.../labels.json")
    try:
        with open(path, encoding="utf-8") as f:
            labels = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise common.ConversionError(f"cannot parse {path} as JSON ({e}); the file is damaged") from e
    if not isinstance(labels, dict):
        _fail_labels(path, f"top level is a {type(labels).__name__}, not an object")
    return labels


def _str_list(labels, key, path, nonempty=True):
    value = labels.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (nonempty and not value):
        _fail_labels(path, f"'{key}' must be a non-empty list of names")
    return value


def upp_label_counts(labels: Mapping, path: str = "labels.json") -> dict:
    """Validate a UPP ``labels.json``; returns ``n_object``, ``n_material``, ``n_scene``, ``part_sizes``.

    ``part_sizes`` are the part-group lengths ordered by the owner's object
    index, which is how the decoder's part channels are laid out.
    """
    missing = [k for k in ("object", "material", "scene", "part", "object_part") if k not in labels]
    if missing:
        _fail_labels(path, f"missing key(s) {missing} of a unified-parsing label file "
                           "(needs object, material, scene, part, object_part)")
    objects = _str_list(labels, "object", path)
    _str_list(labels, "material", path)
    _str_list(labels, "scene", path)
    parts = set(_str_list(labels, "part", path))
    object_part = labels["object_part"]
    if not isinstance(object_part, dict) or not object_part:
        _fail_labels(path, "'object_part' must be a non-empty object mapping object names to part lists")
    for owner, names in object_part.items():
        if owner not in objects:
            _fail_labels(path, f"object_part names {owner!r}, which is not in the 'object' list")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            _fail_labels(path, f"object_part[{owner!r}] must be a non-empty list of part names")
        unknown = [n for n in names if n not in parts]
        if unknown:
            _fail_labels(path, f"object_part[{owner!r}] uses {unknown}, which are not in the 'part' list")
    owners = sorted(object_part, key=objects.index)
    return {
        "n_object": len(objects),
        "n_material": len(labels["material"]),
        "n_scene": len(labels["scene"]),
        "part_sizes": tuple(len(object_part[o]) for o in owners),
    }


def color_label_count(labels: Mapping, path: str = "labels.json") -> int:
    """Validate a colour-segmenter ``labels.json``; returns the number of label channels."""
    entries, categories = labels.get("labels"), labels.get("categories")
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("category"), str)
            for e in entries):
        _fail_labels(path, "'labels' must be a non-empty list of {name, category} objects")
    if not isinstance(categories, list) or not categories or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in categories):
        _fail_labels(path, "'categories' must be a non-empty list of {name} objects")
    names = {c["name"] for c in categories}
    stray = sorted({e["category"] for e in entries} - names)
    if stray:
        _fail_labels(path, f"labels use categories {stray} that 'categories' does not list")
    fmt = labels.get("imageformat")
    ok = isinstance(fmt, dict) and fmt.get("byteorder") in ("RGB", "BGR")
    for key in ("mean", "stdev"):
        v = fmt.get(key) if isinstance(fmt, dict) else None
        ok = ok and isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
    if not ok or not all(s > 0 for s in fmt["stdev"]):
        _fail_labels(path, "'imageformat' must give byteorder 'RGB' or 'BGR', 3 means and 3 positive stdevs")
    sizes = labels.get("segsizes", [256])
    if not isinstance(sizes, list) or not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
        _fail_labels(path, "'segsizes' must be a non-empty list of positive integers")
    return len(entries)


# ----------------------------------------------------------------------------- key layout

def build_module(kind: str, counts):
    """The Flax module of ``kind`` for the label ``counts`` (dict for upp, int for color)."""
    from jaxdissect.segmentation import ColorSegmenter, UnifiedParsing

    if kind == "upp":
        return UnifiedParsing(counts["n_object"], counts["n_material"], counts["n_scene"], counts["part_sizes"])
    return ColorSegmenter(counts)


def variable_shapes(module):
    """Shape tree of ``module``'s variables (traced on a small input, nothing computed)."""
    x = jnp.zeros((1, _SHAPE_PROBE, _SHAPE_PROBE, 3), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), x, (8, 8)))


def torch_layout(shapes) -> dict[str, dict[str, tuple]]:
    """``{'encoder': {torch key: shape}, 'decoder': {...}}`` of the tensors a segmenter's variables need.

    Submodule names mirror the PyTorch keys, so a Flax leaf ``params/encoder/a/b/kernel``
    is torch ``a.b.weight`` (OIHW), ``scale``/``bias`` of a BatchNorm are
    ``weight``/``bias`` and ``batch_stats`` ``mean``/``var`` are ``running_mean``/``running_var``.
    """
    layout = {"encoder": {}, "decoder": {}}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        collection, part, *names, leaf_name = [p.key for p in path]
        key, shape = _torch_key(collection, names, leaf_name, tuple(leaf.shape))
        layout[part][key] = shape
    return layout


def _torch_key(collection, names, leaf_name, shape):
    prefix = ".".join(names)
    if collection == "batch_stats":
        return f"{prefix}.running_{leaf_name}", shape
    if leaf_name == "kernel":
        kh, kw, cin, cout = shape
        return f"{prefix}.weight", (cout, cin, kh, kw)
    if leaf_name == "scale":
        return f"{prefix}.weight", shape
    return f"{prefix}.bias", shape


def _from_torch(state, collection, names, leaf_name):
    key, _ = _torch_key(collection, names, leaf_name, (0, 0, 0, 0))
    value = state[key]
    return common.conv_kernel(value) if leaf_name == "kernel" else np.asarray(value, np.float32)


def _color_deepsup_shapes(n_labels):
    shapes = {"cbr_deepsup.0.weight": (128, 256, 3, 3), "conv_last_deepsup.weight": (n_labels, 128, 1, 1),
              "conv_last_deepsup.bias": (n_labels,)}
    for k in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"cbr_deepsup.1.{k}"] = (128,)
    return shapes


def infer_kind(decoder_state: Mapping) -> str:
    """``'upp'`` or ``'color'`` from a decoder state_dict's keys."""
    if "ppm_last_conv.0.weight" in decoder_state or "object_head.1.weight" in decoder_state:
        return "upp"
    if "conv_last.0.weight" in decoder_state or "conv_last.4.weight" in decoder_state:
        return "color"
    sample = ", ".join(sorted(decoder_state)[:5])
    raise common.ConversionError(
        "the decoder file is neither a UPerNet unified-parsing decoder (ppm_last_conv.*, object_head.*) nor a "
        f"PPM colour decoder (conv_last.*); its first keys are: {sample}. Pass the decoder_epoch_*.pth file "
        "of upp-resnet50-upernet or color-resnet18dilated-ppm_deepsup")


def _check_class_counts(kind, decoder_state, counts, labels_path):
    if kind == "upp":
        heads = {"object": ("object_head.1.bias", counts["n_object"], "len(object)"),
                 "material": ("material_head.1.bias", counts["n_material"], "len(material)"),
                 "scene": ("scene_head.2.bias", counts["n_scene"], "len(scene)"),
                 "part": ("part_head.1.bias", sum(counts["part_sizes"]),
                          "the total length of the object_part lists")}
    else:
        heads = {"label": ("conv_last.4.bias", counts, "len(labels)")}
    wrong = [f"{name}: decoder has {decoder_state[key].shape[0]}, labels.json has {n} ({how})"
             for name, (key, n, how) in heads.items()
             if key in decoder_state and decoder_state[key].ndim == 1 and decoder_state[key].shape[0] != n]
    if wrong:
        raise common.ConversionError(
            f"the decoder's class counts disagree with {labels_path}: " + "; ".join(wrong)
            + ". Use the labels.json that was published with this decoder")


# ----------------------------------------------------------------------------- conversion

def convert_state_dicts(kind: str, encoder_state: Mapping, decoder_state: Mapping, labels: Mapping,
                        labels_path: str = "labels.json"):
    """Check both state_dicts against ``kind``'s layout and ``labels``; returns ``(module, variables, dropped)``.

    ``dropped`` lists the keys that were present, tolerated and not converted.
    """
    if kind not in KINDS:
        raise common.ConversionError(f"unknown segmenter kind {kind!r}; use one of {KINDS}")
    counts = upp_label_counts(labels, labels_path) if kind == "upp" else color_label_count(labels, labels_path)
    _check_class_counts(kind, decoder_state, counts, labels_path)
    module = build_module(kind, counts)
    shapes = variable_shapes(module)
    layout = torch_layout(shapes)
    what = {"upp": "the unified-parsing %s (ResNet-50 deep stem + UPerNet)",
            "color": "the colour-segmenter %s (dilated ResNet-18 + PPM deep-sup)"}[kind]
    encoder_state = dict(encoder_state)
    dropped = sorted(k for k in encoder_state if k.startswith("fc."))
    for k in dropped:
        del encoder_state[k]
    common.check_state_dict(encoder_state, layout["encoder"], what=what % "encoder", ignore=_IGNORED_SUFFIXES)
    expected_decoder = dict(layout["decoder"])
    if kind == "color":
        extra = _color_deepsup_shapes(counts)
        expected_decoder.update(extra)
        dropped += sorted(extra)
    common.check_state_dict(decoder_state, expected_decoder, what=what % "decoder", ignore=_IGNORED_SUFFIXES)
    for state in (encoder_state, decoder_state):
        bad = sorted(k for k, v in state.items()
                     if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)))
        if bad:
            raise common.ConversionError(f"tensors with NaN or infinite values: {', '.join(bad[:10])}; "
                                         "the checkpoint is damaged, download it again")

    states = {"encoder": encoder_state, "decoder": decoder_state}

    def fill(path, _):
        collection, part, *names, leaf_name = [p.key for p in path]
        return _from_torch(states[part], collection, names, leaf_name)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return module, variables, dropped


def convert(encoder_path: str, decoder_path: str, labels_path: str, output_dir: str, kind: str | None = None) -> dict:
    """Convert one published segmenter into the model directory ``output_dir``; returns the metadata written."""
    common.require_empty_output(output_dir)
    labels = read_labels(labels_path)
    encoder_state = common.load_state_dict(encoder_path)
    decoder_state = common.load_state_dict(decoder_path)
    inferred = infer_kind(decoder_state)
    if kind is None:
        kind = inferred
    elif kind != inferred:
        raise common.ConversionError(
            f"--kind={kind} but {decoder_path} is a {inferred} decoder; drop --kind or pass the matching files")
    module, variables, dropped = convert_state_dicts(kind, encoder_state, decoder_state, labels, labels_path)
    metadata = {
        "kind": kind,
        "labels": labels,
        "source": {
            "encoder": os.path.basename(encoder_path),
            "encoder_sha256": common.sha256(encoder_path),
            "decoder": os.path.basename(decoder_path),
            "decoder_sha256": common.sha256(decoder_path),
            "labels": os.path.basename(labels_path),
            "dropped_keys": dropped,
        },
        "preprocessing": ("jaxdissect.segmentation.preprocess.upp_preprocess" if kind == "upp"
                          else "jaxdissect.segmentation.preprocess.color_preprocess"),
        "input": {"layout": "NHWC", "size": 256},
    }
    save_model(output_dir, module, variables, metadata)
    return metadata
