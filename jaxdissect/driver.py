"""The pass driver: every dissection's passes, their resume state, progress and activation cache.

Like the original's ``tally`` (a user-supplied batch function, each pass
resumable from its own state), one :class:`Driver` runs the passes of every
dissection, whoever produces the batches:

1. ``pass1``: per unit, high-bit quantile histograms, top-k images, mean, max;
2. ``pass2``: low-bit histograms inside the selected buckets -> exact thresholds;
3. ``pass3``: IoU counts of ``upsampled act > threshold`` against the labels;
   the scoring strategy then labels every unit (:class:`IoUScoring`, or the
   2017 method's :class:`jaxdissect.netdissect2017.Netdissect2017Scoring`);
4. any extra pass a strategy asks for (label metrics: ``metrics``).

A **source** produces batches; the driver never runs a model itself:

* ``num_batches``, ``batch_size`` (global), ``images`` (an upper bound on the
  images, or None), ``label_keys`` (host keys the labels need);
* ``cache_bytes()``: host bytes to keep every batch's activations and labels
  between passes (0: never cache);
* ``reader(keys)``: ``start -> iterator`` of host batches from batch ``start``
  holding ``keys``;
* ``produce(batch, labels, keys)``: the batch on the devices as a dict
  ``acts`` (``{view: [B, h, w, U]}``, or a sparse basis's
  :class:`~jaxdissect.kernels.codes.SparseCodes`, which the plans read as
  they are and the taps see dense), ``valid``, ``index``, ``batch_id``
  and, when ``labels``, ``seg`` (``[B, K, S, S]``) and ``image_labels``
  (``[B, J]`` or absent), plus the ``keys`` strategies asked for (e.g.
  ``display``);
* ``error(pass_name, view, exc)``: the exception to raise for a kernel's
  :class:`~jaxdissect.statistics.DissectionError` (to name the data or
  layer), or None to raise it as it is.

``jaxdissect.statistics.dissect_activations`` (activations you stream in) and
``jaxdissect.pipelines.dissect`` (a model over a data source) are two sources.

**Strategies** (:class:`Strategy`) are the method variants: a scoring (how a
unit's label is chosen from pass 3's counts), and add-ons that tap passes with
a :class:`Tap` (a per-batch device function with its own per-device state,
replicated params passed to jit as arguments, and a host fold of its per-batch
outputs, all checkpointed with the pass), finish after the passes, and add
outputs through the report hooks. See ``docs/architecture.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from jaxdissect import parallel
from jaxdissect.kernels import codes as codes_k
from jaxdissect.statistics import DissectionError, DissectionResult, Plan

PASSES = ("pass1", "pass2", "pass3")
LABELS = ("seg", "image_labels")


class LabelTables(NamedTuple):
    """Names of the labels (label 0 = none), the category of each label and the category list."""

    label_names: list
    label_categories: list
    categories: list


@dataclasses.dataclass
class Tap:
    """Per-batch work of a strategy inside one pass.

    ``update(state, params, acts, batch) -> (state, outputs)`` is traced into
    the pass's per-device step: ``state`` is this tap's per-device state
    (``init``, a NumPy tree, stacked over devices), ``params`` its replicated
    arrays (weights, thresholds: jit arguments, never constants), ``acts``
    ``{view: [b, h, w, U]}`` and ``batch`` the device's share of ``valid``,
    ``index``, ``batch_id``, the labels when the pass reads them and
    ``keys``. ``update`` must be hashable (a module function or a frozen
    dataclass with ``__call__``), so equal taps compile once. ``outputs`` (a
    tree of ``[b, ...]`` arrays) are gathered to the host, flattened to the
    global batch, and folded by ``fold(host, outputs, batch) -> host``
    (``batch`` on the host: ``valid``, ``index``, ``batch_id``, labels) into
    ``host_init``'s NumPy tree, checkpointed with the pass (``host_init``
    None: ``fold`` only has side effects, e.g. files written before the
    checkpoint that covers the batch). ``identity``
    (JSON-able) joins the pass's resume identity: describe what ``init`` and
    ``params`` depend on.
    """

    update: Callable
    init: Any = dataclasses.field(default_factory=dict)
    params: Any = dataclasses.field(default_factory=dict)
    host_init: Any = None
    fold: Callable | None = None
    keys: tuple = ()
    identity: Any = None


class Strategy:
    """A method variant plugged into the driver; every hook is optional.

    Passes: ``plan_options`` (static ``Plan`` keywords), ``identity()`` (joins
    the run's resume identity), ``tap(pass_name,
    driver)`` (a :class:`Tap` for a pass, or None), ``extra_pass`` (a pass of
    its own after the labels are chosen, tapped the same way), ``finish(driver,
    taps)`` -> ``{view: JSON-able}`` (``taps``: ``{pass: (device state, host
    state)}``; saved as ``results/<name>-<view>.json`` so a finished run
    reloads it). Outputs (called by :mod:`jaxdissect.reports.dissection`, in
    the order the strategies are listed): ``unit_fields``, ``summary_row``,
    ``layer_numbers``, ``settings``, ``page_options``, ``write_layer``, ``layer_figures``.
    """

    name = ""                       # unique among a run's strategies; keys its taps and saved outputs
    extra_pass: str | None = None
    describe_pass = ""
    cache_keys: tuple = ()

    def check(self, driver: "Driver") -> None:
        """Raise a clear error when this strategy cannot run here (e.g. multi-host)."""

    def identity(self):
        """JSON-able: what the results depend on beyond the config (e.g. a word list's contents), joined to
        the run's resume identity; None (the default) adds nothing."""
        return None

    def plan_options(self, tables: LabelTables) -> dict:
        return {}

    def tap(self, pass_name: str, driver: "Driver") -> Tap | None:
        return None

    def finish(self, driver: "Driver", taps: Mapping[str, tuple]) -> Mapping[str, Any] | None:
        return None

    # -- outputs (``found``: this strategy's finish() output for the view) --
    def unit_fields(self, view: str, found) -> Sequence[Mapping] | None:
        """Extra fields of each unit's ``report.json`` entry."""

    def summary_row(self, view: str, found, units) -> Mapping:
        """Extra columns of the layer's row in ``summary.*``."""
        return {}

    def layer_numbers(self, view: str, result, units) -> Mapping:
        """Extra headline numbers of the layer on ``index.html``."""
        return {}

    def settings(self) -> Mapping:
        """Extra lines of the run's settings table."""
        return {}

    def page_options(self) -> Mapping:
        """Keywords of ``reports.html.write_run_report``."""
        return {}

    def write_layer(self, directory: str, view: str, result) -> None:
        """Extra files in the layer's output folder."""

    def layer_figures(self, view: str) -> Sequence[tuple[str, str]]:
        """Figures ``(file in the layer's folder, caption)`` shown with the layer on ``index.html``."""
        return ()


class Scoring(Strategy):
    """How a unit's label is chosen from pass 3's counts (exactly one per run)."""

    def score(self, counts: Mapping, plan: Plan, tables: LabelTables) -> tuple:
        """``(iou [U, L], label [U], label_iou [U], interpretable [U], result config extras)``."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class IoUScoring(Scoring):
    """PNAS scoring (spec 3.1): each unit's best IoU over every label; a detector when it exceeds ``miniou``."""

    miniou: float = 0.04
    row0_competes: bool = False

    def score(self, counts, plan, tables):
        from jaxdissect.kernels import iou as iou_k
        from jaxdissect.kernels import labels as labels_k

        iou = iou_k.iou(counts["intersection"], counts["active"], counts["label_pixels"])
        if iou.shape[1] == 1 and not self.row0_competes:  # no concept labels (segmentation=None)
            zeros = np.zeros(iou.shape[0])
            return iou, zeros.astype(np.int64), zeros, zeros.astype(bool), {}
        label, label_iou, interpretable = (np.asarray(x) for x in labels_k.best_labels(
            iou, miniou=self.miniou, row0_competes=self.row0_competes))
        return iou, label, label_iou, interpretable, {}


def array_digest(a) -> str:
    """A short sha256 of an array's bytes (resume identities of thresholds and labels)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()[:16]


# The plans' kernels of each pass: init (from the previous pass's output), per-device update, host finish.
def _plan_update(name):
    if name == "pass1":
        return lambda p, s, a, b: p.pass1_update(s, a, b["valid"], b["index"], b["batch_id"])
    if name == "pass2":
        return lambda p, s, a, b: p.pass2_update(s, a, b["valid"])
    if name == "pass3":
        return lambda p, s, a, b: p.pass3_update(s, a, b["seg"], b["valid"], b["batch_id"], b.get("image_labels"))
    return None


@functools.lru_cache(maxsize=64)
def _pass_step(name: str, plans: tuple, taps: tuple, mesh):
    """The jitted per-device step of pass ``name`` over every ``(view, Plan)`` and ``(key, tap update)``.

    Cached, so repeated dissections (and views of equal shapes) compile once.
    """
    update_plan = _plan_update(name)

    def update(state, params, acts, b):
        new, outputs = {}, {}
        if update_plan is not None:
            new["plans"] = {v: update_plan(p, state["plans"][v], acts[v], b) for v, p in plans}
        if taps:  # strategies see dense units (sparse codes scattered; unused views cost nothing under jit)
            dense = {v: codes_k.dense(a) for v, a in acts.items()}
            new["taps"] = {}
            for key, fn in taps:
                new["taps"][key], outputs[key] = fn(state["taps"][key], params[key], dense, b)
        return new, outputs

    return parallel.per_device(update, mesh, params=True)


def _flat(x):
    return x.reshape((-1,) + x.shape[2:])


class Driver:
    """Runs a dissection's passes over a source (see the module docstring).

    ``plans``: ``{view: Plan}``; ``workdir``: the work directory (a pass's
    checkpoints go to ``workdir/<pass>``; strategies may keep files there),
    or None; ``checkpoints=False``: no checkpoints even with a work directory
    (a temporary one: nothing would resume from it);
    ``identity``: the JSON-able settings that every pass's resume record
    holds; ``cache_mb``: host memory for the activation cache (0: never);
    ``check_finite``: stop pass 1 at its next checkpoint when an activation
    is NaN/Inf; ``log``: the driver's messages (None: silent).
    """

    def __init__(self, source, plans: Mapping[str, Plan], tables: LabelTables, *, mesh, workdir: str | None,
                 identity: Mapping, checkpoint_every: int = 50, progress: bool = True, cache_mb: int = 0,
                 check_finite: bool = False, checkpoints: bool = True,
                 log: Callable[[str], None] | None = None):
        self.source, self.plans, self.tables, self.mesh = source, dict(plans), tables, mesh
        self.views = list(self.plans)
        self.workdir, self.identity = workdir, dict(identity)
        self.checkpoint_every, self.progress = checkpoint_every, progress
        self.cache_mb, self.check_finite, self.checkpoints = cache_mb, check_finite, checkpoints
        self.log = log or (lambda message: None)
        self.num_batches, self.batch_size = source.num_batches, source.batch_size
        self.num_images = source.images
        self.cache = None
        self.cache_keys: tuple = ()
        self.thresholds: dict | None = None
        self.results: dict | None = None

    # -- the whole run ---------------------------------------------------------------------------------------
    def run(self, scoring: Scoring, strategies: Sequence[Strategy] = (), config: Mapping | None = None):
        """The passes, the scoring and every strategy's extra pass and finish.

        Returns ``({view: DissectionResult}, {strategy name: {view: finish output}})``.
        ``config`` is each result's ``config`` record (the scoring adds its keys).
        """
        strategies = [s for s in strategies if s is not scoring]
        names = [s.name for s in strategies]
        if "" in names or len(set(names)) != len(names):
            raise ValueError(f"every strategy besides the scoring needs its own name (class attribute name); "
                             f"got {names}")
        for s in strategies:
            s.check(self)
        taps: dict = {s.name: {} for s in strategies}
        self.plan_cache(strategies)
        self.log(f"pass 1/3 over {self.num_images} items: quantile histograms, top-"
                 f"{next(iter(self.plans.values())).topk} images")
        # Each pass's merged state is finished at once, so its host copy is freed before the next pass.
        first = self.finish_plans("pass1", self.run_pass("pass1", strategies, taps),
                                  lambda v, p, s: p.pass1_finish(s))
        self.log("pass 2/3: exact thresholds")
        init2 = {v: p.pass2_init(first[v][0]) for v, p in self.plans.items()}
        self.thresholds = self.finish_plans("pass2", self.run_pass("pass2", strategies, taps, init=init2),
                                            lambda v, p, s: p.pass2_finish(first[v][0], s))
        del init2
        self.log("pass 3/3: IoU against the segmentation")
        init3 = {v: p.pass3_init(self.thresholds[v]) for v, p in self.plans.items()}
        counts = self.finish_plans("pass3", self.run_pass(
            "pass3", strategies, taps, init=init3,
            extra={"thresholds": {v: array_digest(t) for v, t in self.thresholds.items()}}),
            lambda v, p, s: p.pass3_finish(s))
        self.results = {v: self.result(v, scoring, first[v][1], self.thresholds[v], counts[v], config or {})
                        for v in self.views}
        for s in strategies:
            if s.extra_pass:
                if s.describe_pass:
                    self.log(s.describe_pass)
                self.run_pass(s.extra_pass, [s], taps, plans=False)
        found = {s.name: s.finish(self, taps[s.name]) for s in strategies}
        return self.results, {k: v for k, v in found.items() if v is not None}

    def result(self, view, scoring, stats, thresholds, counts, config) -> DissectionResult:
        plan = self.plans[view]
        iou, label, label_iou, interpretable, extra = scoring.score(counts, plan, self.tables)
        names, cats = self.tables.label_names, self.tables.label_categories
        return DissectionResult(
            thresholds=np.asarray(thresholds, np.float32), iou=iou, label=np.asarray(label).astype(np.int64),
            label_iou=np.asarray(label_iou).astype(np.float64), interpretable=np.asarray(interpretable).astype(bool),
            pixels=int(counts["pixels"]), label_pixels=counts["label_pixels"], active=counts["active"],
            intersection=counts["intersection"], top_values=stats["top_values"], top_index=stats["top_index"],
            act_mean=stats["mean"], act_max=stats["max"], images=int(stats["images"]),
            label_names=None if names is None else list(names), categories=None if cats is None else list(cats),
            config={**config.get(view, {}), **extra}, category_active=counts.get("category_active"))

    def finish_plans(self, name, state, finish):
        """Per view ``finish(view, plan, merged per-device states)``; kernel errors via the source."""
        out = {}
        for v, p in self.plans.items():
            try:
                out[v] = finish(v, p, state["plans"][v])
            except DissectionError as e:
                error = self.source.error(name, v, e)
                if error is None:
                    raise
                raise error from e
        return out

    # -- the activation cache --------------------------------------------------------------------------------
    def plan_cache(self, strategies) -> None:
        """Decide (and log) whether pass 1 keeps what the later passes need, within the budget."""
        need = self.source.cache_bytes()
        budget = int(self.cache_mb or 0) * 2**20
        fits = 0 < need <= budget and jax.process_count() == 1
        if need:
            self.log(f"activation cache: {need / 2**20:.0f} MiB for {self.num_images} images " + (
                f"within the budget of {budget / 2**20:.0f} MiB: the model, decoding and segmentation run once "
                "per image" if fits else
                f"over the budget of {budget / 2**20:.0f} MiB (activation_cache_mb): passes 2 and 3 read and run "
                "the model again"))
        self.cache = [] if fits else None
        self.cache_keys = tuple(dict.fromkeys(k for s in strategies for k in s.cache_keys))

    # -- one pass -------------------------------------------------------------------------------------------
    def run_pass(self, name: str, strategies: Sequence[Strategy], taps: dict, *, init=None, plans: bool = True,
                 extra: Mapping | None = None):
        """One resumable pass over every batch; returns the merged state ``{"plans": {view: [D, ...]}}``.

        Each strategy's tap of the pass runs in the same step; its final
        (device, host) states go to ``taps[strategy name][name]``.
        """
        mesh = self.mesh
        tapped = [(s.name, t) for s in strategies for t in [s.tap(name, self)] if t is not None]
        plan_items = tuple(self.plans.items()) if plans else ()
        step_fn = _pass_step(name if plans else f"extra:{name}", plan_items,
                             tuple((k, t.update) for k, t in tapped), mesh)
        fill = name == "pass1" and self.cache is not None
        use_cache = name != "pass1" and self.cache is not None and len(self.cache) == self.num_batches
        read_labels = name == "pass3" or not plans or fill  # extra passes score units against their labels
        keys = tuple(dict.fromkeys([k for _, t in tapped for k in t.keys] + list(self.cache_keys if fill else ())))
        params = jax.device_put({k: t.params for k, t in tapped},
                                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        folds = [(k, t.fold) for k, t in tapped if t.fold is not None]
        source = self.source
        cached_keys = ("valid", "index", "batch_id") + LABELS + self.cache_keys

        def step(state, batch):
            if use_cache:
                b = parallel.shard_batch(mesh, batch)
            else:
                b = source.produce(batch, read_labels, keys)
            acts = b.pop("acts")
            if fill:
                self.cache.append({"acts": jax.tree.map(np.asarray, acts),
                                   **{k: np.asarray(v) for k, v in b.items() if k in cached_keys}})
            device, outputs = step_fn(state["device"], params, acts, b)
            if not folds:
                return {**state, "device": device}
            outputs = jax.tree.map(_flat, parallel.to_host(outputs))
            host_batch = {k: np.asarray(v) for k, v in parallel.to_host(
                {k: b[k] for k in ("valid", "index", "batch_id") + LABELS if k in b}).items()}
            host = dict(state.get("host", {}))
            for k, fold in folds:
                folded = fold(host.get(k), outputs[k], host_batch)
                if k in host:
                    host[k] = folded
            return {"device": device, **({"host": host} if host else {})}

        if use_cache:
            batches = lambda start: iter(self.cache[start:])  # noqa: E731
        else:
            batches = source.reader((source.label_keys if read_labels else ()) + keys)
        device = {}
        if plans:
            device["plans"] = init if init is not None else {
                v: p.pass1_init(self.num_images) for v, p in self.plans.items()}
        if tapped:
            device["taps"] = {k: t.init for k, t in tapped}
        state = {"device": parallel.stack_init(mesh, device)}
        hosts = {k: t.host_init for k, t in tapped if t.fold is not None and t.host_init is not None}
        if hosts:
            state["host"] = hosts
        if name != "pass1":
            self.log(f"{name}: " + ("reading the activation cache" if use_cache else "reading the data"))
        config = {**self.identity, "pass": name, **(extra or {})}
        identities = {k: t.identity for k, t in tapped if t.identity is not None}
        if identities:
            config["taps"] = identities
        check = self._check_finite if name == "pass1" and self.check_finite else None
        state = self._stream(step, state, batches, name, config, check)
        if fill and len(self.cache) != self.num_batches:
            # Pass 1 resumed from a checkpoint: the cache misses its first batches, so recompute.
            self.log("pass 1 resumed from a checkpoint: passes 2 and 3 run the model again")
            self.cache = None
        device = parallel.to_host(state["device"])
        for k, _ in tapped:
            taps[k][name] = (device.get("taps", {}).get(k), state.get("host", {}).get(k))
        return device

    def _check_finite(self, state, index) -> None:
        bad = parallel.to_host({v: s["quantile"]["nonfinite"] for v, s in state["device"]["plans"].items()})
        for v, counts in bad.items():
            if np.asarray(counts).sum(0).any():
                self.finish_plans("pass1", {"plans": parallel.to_host(state["device"]["plans"])},
                                  lambda v, p, s: p.pass1_finish(s))

    def _stream(self, step, state, batches, name, config, check):
        """One pass: resumable through ``streaming.run_stream`` with checkpoints, else a plain loop."""
        from jaxdissect import progress as progress_lib
        from jaxdissect import streaming

        show = None if self.progress else False
        if self.workdir is not None and self.checkpoints:
            return streaming.run_stream(step, state, batches, num_batches=self.num_batches,
                                        workdir=os.path.join(self.workdir, name), config=config,
                                        checkpoint_every=self.checkpoint_every, desc=f"dissect {name}",
                                        check=check, progress=show)
        bar = progress_lib.progress(total=self.num_batches, desc=f"dissect {name}", unit="batch", enabled=show)
        try:
            for i, batch in enumerate(batches(0)):
                state = step(state, batch)
                bar.update(1)
                if check is not None and (i + 1) % self.checkpoint_every == 0:
                    check(state, i)
        finally:
            bar.close()
        return state
