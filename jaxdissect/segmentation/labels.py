"""The merged label space of the segmenters and the argmax merging of their scores.

A dissection compares units with concepts; the concepts are the labels that the
segmenters write into an int32 label map ``[N, K, h, w]``. This module turns the
segmenters' ``labels.json`` contents into the original's label numbering (spec
1.7.4, 1.7.5, 1.7.7) and merges per-pixel scores into those numbers.

UPP (unified perceptual parsing) numbering, ``N_obj = len(object) - 1``,
``N_mat = len(material) - 1``::

    0                      '-' (no label)                 object
    1 .. N_obj             objects                        object
    N_obj+1 .. 5 N_obj     <obj>-t, -l, -b, -r (quad)     part
    then N_mat materials                                  material
    then part names that are not object names             part

Without quad the four divided blocks are absent. A part name equal to an object
name is reported as that object (building's ``window`` is the object
``window``; a part ``-`` is 0), others get the next number on first appearance
while walking the owner objects in order (``object_part`` key order with ``p``,
else sky, building, person).

Decoder part groups are mapped to owners by OBJECT NUMBER (the decoder orders
its groups by increasing object number) and their sizes are checked; the
original indexed groups by the owner's position in its walking order, which is
the same thing when ``object_part`` keys are in object-number order (true of the
published file, whose first owners are sky, building, person).

The colour segmenter's labels start with ``('-', '-')``; every distinct
non-internal name gets the next number; each category is one output channel,
the argmax within that category's channels, optionally masked by a rule.

Merging (``MergedSegmenter``): the colour block follows the UPP labels, so its
numbers are offset by ``len(upp labels)``. The original adds the offset to
every colour value, so the colour segmenter's "no label" 0 becomes the label
``('-', '-')`` at index ``offset``, a real, always-present condition whose
category ``-`` is not even in the category list (spec 5 item 6). By default we
keep the numbering identical (``('-', '-')`` stays in the list at the same index)
but write 0 where the colour segmenter has no label, so that index is never
emitted; ``faithful_color_blank=True`` reproduces the original.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.segmentation.quad import quad_split
from jaxdissect.errors import JaxDissectError

UPP_CATEGORIES = ("object", "part", "material")
DEFAULT_PART_OWNERS = ("sky", "building", "person")
QUAD_SUFFIXES = ("t", "l", "b", "r")


class LabelError(JaxDissectError, ValueError):
    """A labels.json or segmenter setting cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class SegmenterSetting:
    """A segmenter name such as ``netpqc`` parsed into its switches (``experiment/setting.py``)."""

    name: str
    all_parts: bool  # p: parts of every object with parts, not just sky, building, person
    quad: bool  # q: top/left/bottom/right subdivision of each object component
    color: bool  # c: add the colour segmenter


def parse_setting(setting: str) -> SegmenterSetting:
    """Parse ``net`` + any of ``p``, ``q``, ``c`` (e.g. ``netpqc``, the default of the original).

    ``x`` (textures) is refused: the original cannot load that segmenter either
    (its weights were never published next to the others).
    """
    if not isinstance(setting, str) or not setting.startswith("net"):
        raise LabelError(
            f"segmenter setting {setting!r} must be 'net' followed by any of p (all parts), "
            "q (quadrants), c (colour), e.g. 'netpqc'")
    flags = setting[3:]
    if "x" in flags:
        raise LabelError(
            f"segmenter setting {setting!r} asks for the texture segmenter (x), which is not "
            "supported (its weights were never published; the original fails the same way); "
            "drop the x, e.g. 'netpqc'")
    bad = sorted(set(flags) - set("pqc"))
    if bad or len(set(flags)) != len(flags):
        raise LabelError(
            f"segmenter setting {setting!r} has unknown or repeated letters {bad or list(flags)}; "
            "allowed after 'net': p (all parts), q (quadrants), c (colour), each at most once")
    return SegmenterSetting(setting, "p" in flags, "q" in flags, "c" in flags)


# --------------------------------------------------------------------------- UPP


@dataclasses.dataclass(frozen=True)
class UppLabels:
    """Static (hashable) UPP label tables: names, categories and the part translation."""

    names: tuple[str, ...]  # merged label number -> name
    label_categories: tuple[str, ...]  # merged label number -> category
    n_object: int  # len(object), including '-'
    n_material: int  # len(material), including '-'
    part_sizes: tuple[int, ...]  # decoder part groups, in increasing object number
    owners: tuple[int, ...]  # object numbers whose parts are reported, in walking order
    owner_groups: tuple[int, ...]  # decoder group index of each owner
    part_translation: tuple[tuple[int, ...], ...]  # per owner: index in its group -> label number
    quad: bool

    categories = UPP_CATEGORIES

    @property
    def n_obj(self) -> int:
        """Number of real objects (``N_obj`` of the spec)."""
        return self.n_object - 1

    @property
    def material_offset(self) -> int:
        return self.n_obj * (5 if self.quad else 1)

    @property
    def n_channels(self) -> int:
        return 5 if self.quad else 3


def _str_list(data: Mapping, key: str, where: str) -> list[str]:
    value = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise LabelError(f"{where}: '{key}' must be a list of names; got {type(value).__name__}")
    return list(value)


def upp_labels(labels: Mapping[str, Any], all_parts: bool = True, quad: bool = True,
               where: str = "UPP labels.json") -> UppLabels:
    """UPP label tables from ``labels.json`` contents (keys object, material, part, object_part)."""
    objects = _str_list(labels, "object", where)
    materials = _str_list(labels, "material", where)
    object_part = labels.get("object_part")
    if not isinstance(object_part, Mapping):
        raise LabelError(f"{where}: 'object_part' must map object names to part-name lists")
    if not objects or objects[0] != "-" or not materials or materials[0] != "-":
        raise LabelError(f"{where}: 'object' and 'material' must start with the no-label entry '-'")
    # Later duplicates win, as in the original's dict comprehension.
    object_numbers = {name: i for i, name in enumerate(objects)}
    unknown = [k for k in object_part if k not in object_numbers]
    if unknown:
        raise LabelError(f"{where}: object_part names objects not in 'object': {unknown[:5]}")
    for owner, parts in object_part.items():
        if not isinstance(parts, (list, tuple)) or not parts or not all(isinstance(p, str) for p in parts):
            raise LabelError(f"{where}: object_part[{owner!r}] must be a non-empty list of part names")
    # The decoder's part groups, in increasing object number.
    by_number = sorted(object_part, key=lambda k: object_numbers[k])
    part_sizes = tuple(len(object_part[k]) for k in by_number)
    group_of = {object_numbers[k]: g for g, k in enumerate(by_number)}

    walk = list(object_part) if all_parts else list(DEFAULT_PART_OWNERS)
    missing = [k for k in walk if k not in object_part]
    if missing:
        raise LabelError(f"{where}: objects {missing} have no part list in object_part; "
                         "use a setting with p (all parts) or a complete labels.json")
    mult = 5 if quad else 1
    n_obj = len(objects) - 1
    first_part = n_obj * mult + 1 + (len(materials) - 1)
    part_numbers: dict[str, int] = {}
    part_names: list[str] = []
    translation = []
    for owner in walk:
        row = []
        for part in object_part[owner]:
            if part in object_numbers:
                row.append(object_numbers[part])
            else:
                if part not in part_numbers:
                    part_numbers[part] = first_part + len(part_names)
                    part_names.append(part)
                row.append(part_numbers[part])
        translation.append(tuple(row))

    names = list(objects)
    cats = ["object"] * len(objects)
    if quad:
        for suffix in QUAD_SUFFIXES:
            names += [f"{o}-{suffix}" for o in objects[1:]]
            cats += ["part"] * n_obj
    names += materials[1:]
    cats += ["material"] * (len(materials) - 1)
    names += part_names
    cats += ["part"] * len(part_names)
    owners = tuple(object_numbers[k] for k in walk)
    return UppLabels(
        names=tuple(names), label_categories=tuple(cats), n_object=len(objects),
        n_material=len(materials), part_sizes=part_sizes, owners=owners,
        owner_groups=tuple(group_of[o] for o in owners), part_translation=tuple(translation),
        quad=quad)


def merge_upp(object_scores: jax.Array, material_scores: jax.Array, part_scores: jax.Array,
              table: UppLabels, quad_quirk: bool = True) -> jax.Array:
    """UPP label map ``[N, 3 (+2 with quad), h, w]`` int32 from NHWC per-pixel scores.

    Scores are logits or probabilities (only the argmax matters; part groups are
    argmaxed within themselves). Channels: object, material, part, then with quad
    the t/b and l/r channels (``quad_quirk``: see :func:`jaxdissect.segmentation.quad.quad_split`).
    """
    if part_scores.shape[-1] != sum(table.part_sizes):
        raise LabelError(f"part scores have {part_scores.shape[-1]} channels; labels.json's "
                         f"object_part needs {sum(table.part_sizes)}")
    obj = jnp.argmax(object_scores, axis=-1).astype(jnp.int32)
    mat = jnp.argmax(material_scores, axis=-1).astype(jnp.int32)
    mat = jnp.where(mat > 0, mat + table.material_offset, 0)
    starts = np.concatenate([[0], np.cumsum(table.part_sizes)])
    part = jnp.zeros_like(obj)
    for owner, group, trans in zip(table.owners, table.owner_groups, table.part_translation):
        local = jnp.argmax(part_scores[..., starts[group]:starts[group + 1]], axis=-1)
        part = jnp.where(obj == owner, jnp.asarray(trans, jnp.int32)[local], part)
    channels = [obj, mat, part]
    if table.quad:
        channels += list(quad_split(obj, table.n_obj, quirk=quad_quirk))
    return jnp.stack(channels, axis=1)


# --------------------------------------------------------------------------- colour


@dataclasses.dataclass(frozen=True)
class ColorLabels:
    """Static colour-segmenter tables (spec 1.7.5)."""

    names: tuple[str, ...]  # external label number -> name; 0 is '-'
    label_categories: tuple[str, ...]
    categories: tuple[str, ...]  # one output channel each, in labels.json order
    n_channels_in: int  # decoder output channels (= len(labels))
    category_channels: tuple[tuple[int, ...], ...]  # per category: decoder channels
    category_map: tuple[tuple[int, ...], ...]  # per category: index within it -> external number
    masks: tuple[tuple[int, int] | None, ...]  # per category: (category, index) that must win, or None
    imageformat: tuple[str, tuple[float, ...], tuple[float, ...]]  # byteorder, mean, stdev
    segsizes: tuple[int, ...]

    def imageformat_dict(self) -> dict:
        return {"byteorder": self.imageformat[0], "mean": self.imageformat[1],
                "stdev": self.imageformat[2]}


def _get(entry, key, default=None):
    return entry.get(key, default) if isinstance(entry, Mapping) else default


def color_labels(labels: Mapping[str, Any], where: str = "colour labels.json") -> ColorLabels:
    """Colour label tables from ``labels.json`` contents (labels, categories, imageformat, segsizes)."""
    entries = labels.get("labels") if isinstance(labels, Mapping) else None
    cats = labels.get("categories") if isinstance(labels, Mapping) else None
    if not isinstance(entries, (list, tuple)) or not entries:
        raise LabelError(f"{where}: 'labels' must be a non-empty list of {{name, category}}")
    if not isinstance(cats, (list, tuple)) or not cats:
        raise LabelError(f"{where}: 'categories' must be a non-empty list of {{name, mask?}}")
    for e in entries:
        if not isinstance(_get(e, "name"), str) or not isinstance(_get(e, "category"), str):
            raise LabelError(f"{where}: every label needs string 'name' and 'category'; got {e!r}")
    cat_names = [_get(c, "name") for c in cats]
    if not all(isinstance(c, str) for c in cat_names) or len(set(cat_names)) != len(cat_names):
        raise LabelError(f"{where}: category names must be distinct strings; got {cat_names}")

    label_number = {"-": 0}
    names, label_cats = ["-"], ["-"]
    for e in entries:
        if _get(e, "internal") or e["name"] in label_number:
            continue
        label_number[e["name"]] = len(names)
        names.append(e["name"])
        label_cats.append(e["category"])
    channels = []
    where_in: dict[str, tuple[int, int]] = {}
    for ci, cat in enumerate(cat_names):
        idx = tuple(i for i, e in enumerate(entries) if e["category"] == cat)
        if not idx:
            raise LabelError(f"{where}: category {cat!r} has no labels")
        channels.append(idx)
        for k, i in enumerate(idx):
            where_in[entries[i]["name"]] = (ci, k)
    masks = []
    for c in cats:
        rule = _get(c, "mask")
        if rule is None:
            masks.append(None)
        elif rule not in where_in:
            raise LabelError(f"{where}: category {_get(c, 'name')!r} is masked by unknown label {rule!r}")
        else:
            masks.append(where_in[rule])
    fmt = labels.get("imageformat")
    try:
        imageformat = (str(fmt["byteorder"]), tuple(float(v) for v in fmt["mean"]),
                       tuple(float(v) for v in fmt["stdev"]))
    except (KeyError, TypeError, ValueError) as e:
        raise LabelError(f"{where}: 'imageformat' must have byteorder, mean and stdev; got {fmt!r}") from e
    segsizes = tuple(int(s) for s in labels.get("segsizes") or (256,))
    return ColorLabels(
        names=tuple(names), label_categories=tuple(label_cats), categories=tuple(cat_names),
        n_channels_in=len(entries), category_channels=tuple(channels),
        category_map=tuple(tuple(label_number.get(entries[i]["name"], 0) for i in idx)
                           for idx in channels),
        masks=tuple(masks), imageformat=imageformat, segsizes=segsizes)


def color_category_softmax(logits: jax.Array, table: ColorLabels) -> jax.Array:
    """The original's colour scores: global softmax, then a softmax within each category."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.zeros_like(p)
    for idx in table.category_channels:
        idx = np.asarray(idx)
        out = out.at[..., idx].set(jax.nn.softmax(p[..., idx], axis=-1))
    return out


def merge_color(scores: jax.Array, table: ColorLabels) -> jax.Array:
    """Colour label map ``[N, n_categories, h, w]`` int32 (0 = no label) from NHWC scores."""
    if scores.shape[-1] != table.n_channels_in:
        raise LabelError(f"colour scores have {scores.shape[-1]} channels; labels.json lists "
                         f"{table.n_channels_in} labels")
    local = [jnp.argmax(scores[..., np.asarray(idx)], axis=-1) for idx in table.category_channels]
    out = []
    for ci, mask in enumerate(table.masks):
        translated = jnp.asarray(table.category_map[ci], jnp.int32)[local[ci]]
        if mask is not None:
            translated = jnp.where(local[mask[0]] == mask[1], translated, 0)
        out.append(translated)
    return jnp.stack(out, axis=1)


# --------------------------------------------------------------------------- merged


@dataclasses.dataclass(frozen=True, repr=False)
class MergedLabels:
    """The label space of a whole setting: UPP labels, then (with ``c``) the colour labels."""

    upp: UppLabels
    color: ColorLabels | None
    faithful_color_blank: bool = False

    def __repr__(self) -> str:
        # Short but content-addressed: used in fingerprints of results computed with these labels.
        digest = hashlib.sha256(repr((self.upp, self.color)).encode()).hexdigest()[:16]
        return (f"MergedLabels(labels={len(self.label_names)}, channels={self.n_channels}, "
                f"quad={self.upp.quad}, color={self.color is not None}, "
                f"faithful_color_blank={self.faithful_color_blank}, sha256={digest})")

    @property
    def color_offset(self) -> int:
        return len(self.upp.names)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.upp.names + (self.color.names if self.color else ())

    @property
    def label_categories(self) -> tuple[str, ...]:
        return self.upp.label_categories + (self.color.label_categories if self.color else ())

    @property
    def categories(self) -> tuple[str, ...]:
        """Union of the component category lists, in order of appearance."""
        cats = list(self.upp.categories)
        for c in self.color.categories if self.color else ():
            if c not in cats:
                cats.append(c)
        return tuple(cats)

    @property
    def n_channels(self) -> int:
        return self.upp.n_channels + (len(self.color.categories) if self.color else 0)


def merged_labels(setting: str | SegmenterSetting, upp_json: Mapping,
                  color_json: Mapping | None = None, faithful_color_blank: bool = False) -> MergedLabels:
    """Label tables of ``setting`` from the labels.json contents of its segmenters."""
    if isinstance(setting, str):
        setting = parse_setting(setting)
    if setting.color and color_json is None:
        raise LabelError(f"segmenter setting {setting.name!r} includes the colour segmenter (c) "
                         "but no colour labels were given")
    return MergedLabels(
        upp=upp_labels(upp_json, all_parts=setting.all_parts, quad=setting.quad),
        color=color_labels(color_json) if setting.color else None,
        faithful_color_blank=faithful_color_blank)


def offset_color(color_map: jax.Array, table: MergedLabels) -> jax.Array:
    """Colour label map in merged numbering (see the module docstring on the blank label)."""
    shifted = color_map + table.color_offset
    if table.faithful_color_blank:
        return shifted
    return jnp.where(color_map > 0, shifted, 0)


def label_category_pairs(table: MergedLabels) -> list[tuple[str, str]]:
    """``[(label, category), ...]`` like the original's ``get_label_and_category_names()[0]``."""
    return list(zip(table.label_names, table.label_categories))


def check_sizes(table: UppLabels, part_sizes: Sequence[int], n_object: int, n_material: int,
                where: str) -> None:
    """Raise unless the UPP network's class counts match the label tables."""
    problems = []
    if tuple(part_sizes) != table.part_sizes:
        problems.append(f"part groups {tuple(part_sizes)} vs object_part sizes in object-number "
                        f"order {table.part_sizes}")
    if n_object != table.n_object:
        problems.append(f"{n_object} object classes vs {table.n_object} names")
    if n_material != table.n_material:
        problems.append(f"{n_material} material classes vs {table.n_material} names")
    if problems:
        raise LabelError(f"{where}: network and labels.json disagree: " + "; ".join(problems)
                         + ". Convert the checkpoint again with its own labels.json")
