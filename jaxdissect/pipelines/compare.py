"""Compare networks, training snapshots, layers, rotations and learned bases in one dissection run.

``compare(members, data, ...)`` dissects every member's layers (and, with
``rotations``, every power ``Q^alpha`` of each layer, ``jaxdissect.rotation``;
with ``bases``, every basis of each layer: neurons, rotations, sparse
autoencoders of several sizes, concept probes, :mod:`jaxdissect.bases`) in
ONE run of :func:`jaxdissect.dissect`: the members are wrapped in an
:class:`Ensemble` module, so each pass reads and decodes every image once,
segments it once (or reads its Broden labels once) and runs every member on
it in the same jitted step; the rotated layers and bases are views of one
capture. ``rotations`` are rotation bases (``rotation:ALPHA:SEED``), named
``member.layer@ALPHA`` as ever.

``control='random_init'`` adds every member again at a random initialisation
(``<name>-random_init``, the same network with ``module.init``'s weights):
CVPR 2017's control, since label significance alone does not separate learned
from random features. With ``bases`` or ``control`` the table gains, per view,
``labelled`` (units with IoU above the cut-off), ``significant`` (units whose
label passes the image-permutation test at the config's FDR ``q``),
``mean_iou`` (mean IoU of the labelled units), ``dead`` (units that never
exceed zero on the data), for an SAE ``fvu`` (fraction of the layer's variance
its reconstruction leaves unexplained, end of training), for a probe
``heldout_iou`` (its mean held-out IoU), and, where the data has class labels,
``accuracy_drop_mean`` / ``accuracy_drop_max``: the classifier's accuracy lost
when one feature is removed (:class:`jaxdissect.layers.FeatureEdit`, the
reconstruction error kept), averaged and maximised over the features; and the
figure ``bases.svg``.

Outputs in ``output_dir``: ``dissection/`` (the ordinary per-layer reports of
every member/layer/alpha), ``compare.csv`` and ``compare.json`` (every
number: detectors and unique detectors per category, both conventions of the
2017 code, see :mod:`jaxdissect.netdissect2017`), the paper's figures as SVG
(unique detectors per category per network, per layer, over training
iterations, over rotation alpha; convention: per category, summed) and
``index.html`` (every string escaped).
"""

from __future__ import annotations

import dataclasses
import difflib
import html
import io
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import numpy as np

from jaxdissect import fileio
from jaxdissect import netdissect2017 as nd
from jaxdissect.errors import JaxDissectError
from jaxdissect.plotting import pyplot, save_figure

CATEGORY_COLORS = {"object": "#4e79a7", "scene": "#f28e2b", "part": "#59a14f", "material": "#e15759",
                   "texture": "#b07aa1", "color": "#edc948"}
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class CompareError(JaxDissectError, ValueError):
    """Members, layers or rotations that cannot be compared; the message names the fix."""


@dataclasses.dataclass
class Member:
    """One network or training snapshot: a display ``name`` (letters, digits, ``_``, ``-``), its
    Flax module and variables, the ``layers`` to dissect and, for snapshots, its ``iteration``;
    ``control`` names a control (``'random_init'``) of the member it copies."""

    name: str
    module: Any
    variables: Any
    layers: Sequence[str]
    iteration: int | None = None
    control: str | None = None


CONTROLS = ("random_init",)


def random_init(member: Member, x, seed: int = 0) -> Member:
    """``member`` at a random initialisation (``module.init`` with ``PRNGKey(seed)``), named ``<name>-random_init``."""
    import jax

    variables = jax.jit(member.module.init)(jax.random.PRNGKey(seed), x)
    return Member(f"{member.name}-random_init", member.module, variables, list(member.layers), member.iteration,
                  control="random_init")


class Ensemble(nn.Module):
    """Runs every member on the same input; member ``names[i]``'s layer ``L`` is layer ``names[i].L``."""

    members: tuple
    names: tuple

    @nn.compact
    def __call__(self, x):
        return tuple(m.clone(name=n, parent=self)(x) for m, n in zip(self.members, self.names))


def ensemble_variables(members: Sequence[Member]) -> dict:
    """The members' variables under their names, collection by collection."""
    out: dict = {}
    for m in members:
        for collection, tree in dict(m.variables).items():
            out.setdefault(collection, {})[m.name] = tree
    return out


def _check_members(members: Sequence[Member], x) -> dict:
    """``{member name: {layer: shape}}`` after checking names and layers."""
    from jaxdissect.layers import layer_shapes

    if not members:
        raise CompareError("nothing to compare: give at least one model")
    names = [m.name for m in members]
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise CompareError(f"model names {bad} may hold only letters, digits, '_' and '-'; rename them")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CompareError(f"model names {twice} are used twice; give every model its own name")
    out = {}
    for m in members:
        if not m.layers:
            raise CompareError(f"model {m.name}: no layers to dissect")
        shapes = out[m.name] = layer_shapes(m.module, m.variables, x)
        valid = [n for n, s in shapes.items() if len(getattr(s, "shape", ())) == 4]
        for layer in m.layers:
            if layer not in valid:
                close = difflib.get_close_matches(layer, valid, n=3, cutoff=0.5)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise CompareError(f"model {m.name} has no dissectable layer {layer!r}{hint}; its layers: "
                                   f"{', '.join(valid)}")
    return out


def view_name(member: str, layer: str, alpha: float | None) -> str:
    return f"{member}.{layer}" + ("" if alpha is None else f"@{alpha:g}")


def _view(member: str, layer: str, spec, seed: int) -> str:
    """A basis's view: ``m.layer`` (neurons), ``m.layer@ALPHA`` (a rotation of the run's seed, else
    ``@ALPHA:SEED``) or ``m.layer@<spec>``."""
    if spec.kind == "neurons":
        return view_name(member, layer, None)
    if spec.kind == "rotation":
        return view_name(member, layer, spec.alpha) + ("" if spec.seed == seed else f":{spec.seed}")
    return f"{member}.{layer}@{spec.text}"


def _views(members, member_shapes, specs, seed, unpermute):
    """``(views, keys)``: ``{view: (captured layer, None) | (layer, basis, params) | (layer, learned spec)}`` and
    ``{view: (member, layer, alpha, spec)}``; fixed bases are built here, before any data is read, learned ones
    are trained by the run."""
    from jaxdissect.bases import BasisError

    views, keys, built = {}, {}, {}
    for m in members:
        shapes = member_shapes[m.name]
        for layer in m.layers:
            source = f"{m.name}.{layer}"
            if specs is None:
                views[source] = (source, None)
                keys[source] = (m, layer, None, None)
                continue
            c = int(shapes[layer].shape[-1])
            for spec in specs:
                name = _view(m.name, layer, spec, seed)
                exact_identity = spec.kind == "rotation" and spec.alpha == 0 and not unpermute  # Q^0 = I
                if spec.kind == "neurons" or exact_identity:
                    views[name] = (source, None)
                elif spec.learned:
                    views[name] = (source, spec)
                else:
                    if (c, spec) not in built:
                        try:
                            built[c, spec] = spec.build(c, unpermute)
                        except BasisError as e:
                            raise CompareError(f"model {m.name} layer {layer}: {e}") from e
                    views[name] = (source, *built[c, spec])
                keys[name] = (m, layer, spec.alpha if spec.kind == "rotation" else None, spec)
    return views, keys


def _category_list(result) -> list[str]:
    if "category_names" in result.config:
        return list(result.config["category_names"])
    return list(dict.fromkeys(c for c in (result.categories or [])[1:] if c and c != "-"))


def layer_counts(result, miniou: float = 0.04) -> dict:
    """Detector counts of one ``DissectionResult``, both conventions (:func:`netdissect2017.unique_detectors`).

    A PNAS-method result is scored per category from its IoU matrix (each label
    in the category it carries), so both kinds of run give the same table.
    """
    if result.category_active is not None:
        return nd.unique_detectors(nd.scores_of(result), result.config["category_names"], miniou)
    cats = _category_list(result)
    index = nd.label_category_index(result.categories or ["-"] * result.iou.shape[1], cats)
    iou = np.where(index[None] >= 0, np.asarray(result.iou, np.float64), 0.0)
    units = iou.shape[0]
    cat_label = np.zeros((units, len(cats)), np.int64)
    cat_score = np.zeros((units, len(cats)))
    for c in range(len(cats)):
        members = np.flatnonzero(index == c)
        if members.size:
            best = iou[:, members].argmax(1)
            cat_score[:, c] = iou[np.arange(units), members[best]]
            cat_label[:, c] = np.where(cat_score[:, c] > 0, members[best], 0)
    best_cat = len(cats) - 1 - np.argmax(cat_score[:, ::-1], axis=1) if cats else np.zeros(units, np.int64)
    rows = np.arange(units)
    scores = nd.Scores(iou=iou, category_label=cat_label, category_score=cat_score, best_category=best_cat,
                       label=cat_label[rows, best_cat] if cats else np.zeros(units, np.int64),
                       score=cat_score[rows, best_cat] if cats else np.zeros(units))
    return nd.unique_detectors(scores, cats, miniou)


def table(results: dict, keys: dict, miniou: float) -> tuple[list[str], list[dict]]:
    """``(categories, rows)``: one row per dissected view with every count."""
    rows, categories = [], []
    for name, r in results.items():
        member, layer, alpha, _ = keys[name]
        counts = layer_counts(r, miniou)
        cats = list(counts["top"]["per_category"])
        categories += [c for c in cats if c not in categories]
        row = {"name": name, "model": member.name, "iteration": member.iteration, "layer": layer, "alpha": alpha,
               "units": counts["units"],
               "detectors": counts["per_category"]["detectors"], "unique": counts["per_category"]["unique"],
               "detectors_top": counts["top"]["detectors"], "unique_top": counts["top"]["unique"]}
        for c in cats:
            row[f"unique_{c}"] = counts["per_category"]["per_category"][c]
            row[f"detectors_{c}"] = counts["per_category"]["detectors_per_category"][c]
            row[f"unique_top_{c}"] = counts["top"]["per_category"][c]
        rows.append(row)
    return categories, rows


# --------------------------------------------------------------------------- figures


def _stacked(ax, labels, rows, categories):
    bottom = np.zeros(len(rows))
    for c in categories:
        vals = np.array([r.get(f"unique_{c}", 0) for r in rows], float)
        ax.bar(np.arange(len(rows)), vals, bottom=bottom, color=CATEGORY_COLORS.get(c), label=c)
        bottom += vals
    ax.set_xticks(np.arange(len(rows)))
    ax.set_xticklabels(labels, rotation=45 if len(rows) > 3 else 0, ha="right" if len(rows) > 3 else "center",
                       fontsize=8)
    ax.set_ylabel("unique detectors")


def write_figures(output_dir: str, categories: list[str], rows: list[dict], threshold: float) -> dict:
    """The paper's figures as SVG; returns ``{title: file name}`` of those that apply."""
    plt = pyplot()

    figures = {}
    units = [r for r in rows if r["alpha"] is None and r.get("basis", "neurons") == "neurons"]  # not a learned basis
    plain = {(r["model"], r["layer"]) for r in units}
    base = [r for r in rows if r in units or (r["alpha"] == 0 and (r["model"], r["layer"]) not in plain)]
    note = f"IoU > {threshold:g}, per category, summed"

    def save(fig, name, title):
        fig.tight_layout()
        save_figure(fig, os.path.join(output_dir, name))
        figures[title] = name

    models = list(dict.fromkeys(r["model"] for r in base))
    if base:
        last = [[r for r in base if r["model"] == m][-1] for m in models]
        last.sort(key=lambda r: -r["unique"])
        fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(last) + 3), 3.5))
        _stacked(ax, [f"{r['model']}\n{r['layer']}" for r in last], last, categories)
        ax.set_title(f"Networks ({note})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save(fig, "unique_per_network.svg", "Unique detectors per network")
    if any(sum(r["model"] == m for r in base) > 1 for m in models):
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(base) + 3), 3.5))
        _stacked(ax, [f"{r['model']}\n{r['layer']}" for r in base], base, categories)
        ax.set_title(f"Layers ({note})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save(fig, "unique_per_layer.svg", "Unique detectors per layer")
    snaps = [r for r in base if r["iteration"] is not None]
    if snaps:
        layers = list(dict.fromkeys(r["layer"] for r in snaps))
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers) + 1, 3.5), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            sel = sorted((r for r in snaps if r["layer"] == layer), key=lambda r: r["iteration"])
            its = [r["iteration"] for r in sel]
            for c in categories:
                ax.plot(its, [r.get(f"unique_{c}", 0) for r in sel], marker="o", color=CATEGORY_COLORS.get(c),
                        label=c)
            ax.set_xscale("symlog")
            ax.set_xlabel("training iteration")
            ax.set_title(layer, fontsize=9)
        axes[0][0].set_ylabel("unique detectors")
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save(fig, "unique_over_iterations.svg", "Unique detectors over training iterations")
    rotated = [r for r in rows if r["alpha"] is not None]
    if rotated:
        groups = list(dict.fromkeys((r["model"], r["layer"]) for r in rotated))
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups) + 1, 3.5), squeeze=False)
        for ax, (m, layer) in zip(axes[0], groups):
            sel = sorted((r for r in rotated if (r["model"], r["layer"]) == (m, layer)), key=lambda r: r["alpha"])
            _stacked(ax, [f"{r['alpha']:g}" for r in sel], sel, categories)
            ax.set_xlabel("rotation power alpha")
            ax.set_title(f"{m} {layer}", fontsize=9)
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save(fig, "unique_over_rotation.svg", "Unique detectors over rotation alpha")
    if any("basis" in r for r in rows):
        save(bases_figure(rows, threshold), "bases.svg", "Bases: neurons, rotations, SAEs, probes, trained and at "
                                                         "random initialisation")
    return figures


# The columns of a comparison of bases (or with a control), after the detector counts.
BASIS_FIELDS = ("basis", "control", "labelled", "significant", "mean_iou", "dead", "fvu", "heldout_iou",
                "accuracy_drop_mean", "accuracy_drop_max")
_PANELS = (("unique", "unique detectors"), ("significant", "significant labels"),
           ("mean_iou", "mean IoU of labelled units"), ("accuracy_drop_mean", "accuracy drop per ablated unit"))


def bases_figure(rows: list[dict], threshold: float):
    """One panel per measure; a bar per (model, layer, basis), trained and random-init side by side."""
    plt = pyplot()
    trained = [r for r in rows if not r.get("control")]
    controls = {(r["model"].removesuffix(f"-{r['control']}"), r["layer"], r["basis"]): r
                for r in rows if r.get("control")}
    panels = [(k, t) for k, t in _PANELS if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.7 * len(trained) + 2), 2.2 * len(panels) + 0.8),
                             squeeze=False, sharex=True)
    x = np.arange(len(trained))
    models = len({r["model"] for r in trained}) > 1
    labels = [(f"{r['model']} " if models else "") + f"{r['layer']}\n{r['basis']}" for r in trained]
    def value(r, key):
        return np.nan if r is None or r.get(key) is None else float(r[key])

    for ax, (key, title) in zip(axes[:, 0], panels):
        ax.bar(x - 0.2, [value(r, key) for r in trained], 0.4, color="#4e79a7", label="trained")
        if controls:
            ax.bar(x + 0.2, [value(controls.get((r["model"], r["layer"], r["basis"])), key) for r in trained], 0.4,
                   color="#bab0ac", label="random init")
        ax.set_ylabel(title, fontsize=8)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_title(f"Units of each basis (labelled: IoU > {threshold:g})", fontsize=9)
    axes[-1, 0].set_xticks(x)
    axes[-1, 0].set_xticklabels(labels, rotation=45 if len(x) > 4 else 0, ha="right" if len(x) > 4 else "center",
                                fontsize=7)
    return fig


# --------------------------------------------------------------------------- outputs


def write_tables(output_dir: str, categories: list[str], rows: list[dict], config: dict) -> None:
    import csv

    fields = ["name", "model", "iteration", "layer", "alpha", "units", "detectors", "unique", "detectors_top",
              "unique_top"]
    if any("basis" in r for r in rows):
        fields += list(BASIS_FIELDS)
    for prefix in ("unique_", "detectors_", "unique_top_"):
        fields += [prefix + c for c in categories]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fields, restval=0)
    w.writeheader()
    w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    fileio.write_text(os.path.join(output_dir, "compare.csv"), text.getvalue())
    fileio.write_json(os.path.join(output_dir, "compare.json"), {"config": config, "categories": categories,
                                                                "rows": rows})


def _cell(value, column: str) -> str:
    return f"{value:.4g}" if isinstance(value, float) and column in BASIS_FIELDS else str(value)


def render_html(title: str, categories: list[str], rows: list[dict], figures: dict, threshold: float) -> str:
    esc = html.escape
    cols = ["model", "iteration", "layer", "alpha", "units", "detectors", "unique", "detectors_top", "unique_top"]
    if any("basis" in r for r in rows):
        cols += list(BASIS_FIELDS)
    cols += [f"unique_{c}" for c in categories]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "\n".join("<tr>" + "".join(f"<td>{esc('' if r.get(c) is None else _cell(r.get(c, 0), c))}</td>"
                                      for c in cols) + "</tr>" for r in rows)
    figs = "\n".join(f'<figure><img src="{esc(f, quote=True)}" alt="{esc(t, quote=True)}">'
                     f"<figcaption>{esc(t)}</figcaption></figure>" for t, f in figures.items())
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }} figure {{ display: inline-block; }}
img {{ max-width: 100%; }}</style></head>
<body><h1>{esc(title)}</h1>
<p>detectors / unique: per category with IoU &gt; {esc(f'{threshold:g}')}, summed over categories (the CVPR
figure); _top: distinct top labels of units with IoU &ge; {esc(f'{threshold:g}')} (the report). Every number is in
<a href="compare.csv">compare.csv</a> and <a href="compare.json">compare.json</a>; unit reports:
<a href="dissection/index.html">dissection/index.html</a>.</p>
{figs}
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table></body></html>
"""


# A comparison's defaults where they differ from a dissection's: the 2017 method, fewer and smaller strips.
DEFAULTS = {"method": "netdissect2017", "topk": 10, "thumbsize": 64}


def compare_config(config=None, **overrides):
    """The ``DissectConfig`` of a comparison: ``config`` (None: the dissection defaults with :data:`DEFAULTS`)
    with ``overrides``."""
    from jaxdissect import config as config_lib

    return config_lib.create(config if config is not None else DEFAULTS, **overrides)


def compare(members: Sequence[Member], data, segmentation="dataset", config=None, *,
            rotations: Sequence[float] | None = None, rotation_seed: int = 1, bases=None,
            control: str | None = None, output_dir: str | None = None, progress: bool = True,
            title: str | None = None, segmentation_cache: str | None = None, cache_dir: str | None = None,
            **overrides) -> dict:
    """Dissect every member (and rotation power, and basis) in one run; returns ``{"rows", "categories", "results"}``.

    ``members``: :class:`Member` list (networks or training snapshots; each
    with its own layer list). ``rotations``: powers ``alpha`` of the random
    rotation of every listed layer (``rotation_seed`` and the config's
    ``rotation_unpermute`` as NetDissect's flags). ``bases``: basis specs
    (``'neurons;rotation:1;sae:2;sae:8;probe:net2vec'`` or a list), each
    dissected on every listed layer; learned ones are trained from this data
    once and kept in ``cache_dir`` (default: the per-user cache), with the
    config's ``sae_*``/``probe_*`` settings. ``control='random_init'``: every
    member also at a random initialisation (see the module docstring for the
    columns both add). ``config`` and ``**overrides``: the dissection's
    settings as for :func:`jaxdissect.dissect` (defaults: :data:`DEFAULTS`);
    ``segmentation_cache`` as there. The members must take the same input
    (one data source feeds them all).
    """
    from jaxdissect.bases import BasisError
    from jaxdissect.bases import spec as spec_lib
    from jaxdissect.pipelines.dissect import Dissection, model_input

    config = compare_config(config, **overrides)
    members = list(members)
    probe = data.get_batch([0])
    _, x = model_input(probe)
    if control is not None:
        if control not in CONTROLS:
            raise CompareError(f"control {control!r}: the controls are {', '.join(CONTROLS)}")
        members += [random_init(m, x[:1]) for m in members]
    shapes = _check_members(members, x[:1])
    specs = None
    if rotations is not None:
        rotations = [float(a) for a in rotations]
        if not rotations or any(a < 0 for a in rotations):
            raise CompareError(f"rotations must be a non-empty list of powers alpha >= 0, got {rotations}")
        specs = [spec_lib.BasisSpec("rotation", alpha=a, seed=int(rotation_seed)) for a in rotations]
    if bases is not None:
        try:
            listed = spec_lib.parse_list(bases if isinstance(bases, str) else ";".join(
                b if isinstance(b, str) else b.text for b in bases))
        except BasisError as e:
            raise CompareError(str(e)) from None
        specs = (specs or []) + listed
        twice = sorted({s.text for s in specs if [t.text for t in specs].count(s.text) > 1})
        if twice:
            raise CompareError(f"basis {', '.join(twice)} is given twice (by rotations and bases); give it once")
    views, keys = _views(members, shapes, specs, rotation_seed, config.rotation_unpermute)
    ensemble = Ensemble(tuple(m.module for m in members), tuple(m.name for m in members))
    title = title or f"Comparison of {', '.join(m.name for m in members)} on {data.name}"
    run = Dissection(ensemble, ensemble_variables(members), [], data, segmentation, config, views=views,
                     progress=progress, name=title, segmentation_cache=segmentation_cache, cache_dir=cache_dir)
    results = run.execute(None if output_dir is None else os.path.join(output_dir, "dissection"))
    categories, rows = table(results, keys, config.miniou)
    extended = bases is not None or control is not None
    if extended:
        drops = accuracy_drops(keys, run.views, data, run.num_images, run.batch_size, output_dir,
                               log=run.say)
        basis_columns(rows, results, keys, run.found, drops)
    if output_dir is not None:
        record = {"members": [{"name": m.name, "iteration": m.iteration, "layers": list(m.layers)} for m in members],
                  "data": data.name, "method": config.method, "miniou": config.miniou, "rotations": rotations,
                  "rotation_seed": rotation_seed, "rotation_unpermute": config.rotation_unpermute,
                  "quantile": config.level_quantile}
        if extended:
            record.update(bases=[s.text for s in specs or ()], control=control,
                          significance_q=config.q if config.significance else None)
        write_tables(output_dir, categories, rows, record)
        figures = write_figures(output_dir, categories, rows, config.miniou)
        fileio.write_text(os.path.join(output_dir, "index.html"),
                          render_html(title, categories, rows, figures, config.miniou))
    return {"rows": rows, "categories": categories, "results": results}


def basis_columns(rows: list[dict], results: dict, keys: dict, found: dict, drops: dict) -> None:
    """Add :data:`BASIS_FIELDS` to the table's rows (see the module docstring for what each means)."""
    explain, learned = found.get("explain") or {}, found.get("bases") or {}
    for row in rows:
        name = row["name"]
        r, (member, _, _, spec) = results[name], keys[name]
        labelled = np.asarray(r.interpretable, bool)
        units = explain.get(name) or []
        tested = any("p_value" in u for u in units)
        info = learned.get(name) or {}
        row.update(basis=spec.text if spec is not None else "neurons", control=member.control,
                   labelled=int(labelled.sum()),
                   significant=sum(bool(u.get("significant")) for u in units) if tested else None,
                   mean_iou=float(np.asarray(r.label_iou)[labelled].mean()) if labelled.any() else 0.0,
                   dead=int((np.asarray(r.act_max) <= 0).sum()), fvu=info.get("fvu"),
                   heldout_iou=info.get("heldout_iou"))
        row["accuracy_drop_mean"], row["accuracy_drop_max"] = drops.get(name, (None, None))


def accuracy_drops(keys: dict, views: dict, data, num_images: int, batch_size: int, output_dir: str | None,
                   log=print) -> dict:
    """``{view: (mean, max)}``: the classifier's accuracy lost when one unit of the view is removed, over its units.

    A unit of a basis is removed with :class:`jaxdissect.layers.FeatureEdit`
    (reconstruction error kept), a neuron zeroed; each view's sweep is one
    pass over the images (:func:`jaxdissect.interventions.classifier.single_unit_sweep`),
    resumable under ``output_dir/ablation``. Empty when the data has no class
    labels or a member is not a classifier of them.
    """
    from jaxdissect.bases import Neurons
    from jaxdissect.interventions import classifier as ci
    from jaxdissect.interventions.common import InterventionError

    if "label" not in data.get_batch([0]):
        log("accuracy drop per ablated unit: the data has no class labels, so none is measured")
        return {}
    out = {}
    for name, (member, layer, _, _) in keys.items():
        _, basis, params = views[name]
        features = None if isinstance(basis, Neurons) else (basis, params)
        checkpoint = None if output_dir is None else os.path.join(output_dir, "ablation", _safe_name(name))
        try:
            base, per = ci.single_unit_sweep(member.module, member.variables, layer, data, num_items=num_images,
                                             batch_size=batch_size, checkpoint=checkpoint, basis=features)
        except InterventionError as e:
            log(f"accuracy drop per ablated unit: not measured ({e})")
            return {}
        total = max(int(base["total"]), 1)
        drop = (np.sum(base["correct"]) - np.asarray(per["correct"]).sum(1)) / total
        out[name] = (float(drop.mean()), float(drop.max()))
    return out


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
