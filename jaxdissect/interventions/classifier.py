"""Classifier unit ablation (spec 3.3): what each unit of a layer does for each class.

Per-class precision, recall, accuracy, true-negative rate and balanced
accuracy (the one-vs-rest "single-class accuracy") of a classifier, clean and
with units of one layer zeroed. Everything is computed from exact integer
counts per class (images of the class, predictions of it, correct ones), so
results do not depend on batch size or device count.

Speed by design:

* The network below the ablated layer does not depend on the ablation: each
  batch runs it once and caches the layer's activation; every unit set is
  then evaluated on the part above only (:func:`jaxdissect.layers.run_from`),
  many sets per call (``vmap`` over a chunk of masks, ``lax.map`` over chunks).
* Fast path for VGG16 ``conv5_3`` (post-ReLU), followed by a 2x2 max pool, the
  adaptive average pool (both per channel) and the linear ``fc6``: zeroing
  unit ``u`` zeroes only unit ``u``'s 49 pooled values, so ``fc6``'s
  pre-activation changes by ``-pool5[:, u] @ W6[rows of u]``, a rank-49
  update. The clean pre-activation is computed once per batch; the 512
  single-unit sweeps cost one batched small matmul plus ``fc7``/``fc8`` on
  ``[512, B, 4096]``. Multi-unit sets (the per-class top-n rankings) use the
  same linearity: with every unit's contribution ``D [U, B, 4096]`` computed
  once per batch (one fc6 pass of work), a set's pre-activation is
  ``clean - mask @ D``, 1/49 of an fc6 pass per set. ``method='generic'``
  forces the path every layer of every model can use; all are tested to
  equal naive recomputation.

Data sources are the jaxdissect ones (``len``, ``get_batch(indices)`` giving
``image`` and ``label``, e.g. :class:`jaxdissect.data.places.PlacesFolder`) or
a pair ``(images NHWC, labels)`` of arrays. Items a source marks invalid
(unreadable files skipped on request) are left out of every count.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import layers as layer_api
from jaxdissect.interventions.common import InterventionError, lookup, unit_masks

log = logging.getLogger(__name__)

METRICS = ("precision", "recall", "accuracy", "true_negative_rate", "balanced_accuracy")
IMPORTANT_TOP = 4  # a unit is "important" for a class if among its 4 most damaging (spec 6)
_CHUNK_BYTES = 256 << 20  # activation bytes per vmapped chunk of unit sets


# --------------------------------------------------------------------------
# Counts and metrics


def perclass_counts(labels, predictions, num_classes: int, valid=None) -> dict:
    """Exact per-class counts from integer labels ``[N]`` and top-1 predictions ``[..., N]``.

    Returns ``{'total': N, 'true': [C], 'pred': [..., C], 'correct': [..., C]}``
    (int64); ``valid`` (bool ``[N]``) leaves items out.
    """
    labels = np.asarray(labels, np.int64)
    predictions = np.asarray(predictions, np.int64)
    keep = np.ones(labels.shape, bool) if valid is None else np.asarray(valid, bool)
    labels, predictions = labels[keep], predictions[..., keep]
    flat = predictions.reshape(-1, labels.shape[0])
    pred = np.stack([np.bincount(p, minlength=num_classes) for p in flat]) if flat.size else np.zeros(
        (flat.shape[0], num_classes), np.int64)
    correct = np.stack([np.bincount(labels[p == labels], minlength=num_classes) for p in flat]) if flat.size else (
        np.zeros((flat.shape[0], num_classes), np.int64))
    shape = predictions.shape[:-1] + (num_classes,)
    return {"total": int(labels.shape[0]), "true": np.bincount(labels, minlength=num_classes).astype(np.int64),
            "pred": pred.reshape(shape).astype(np.int64), "correct": correct.reshape(shape).astype(np.int64)}


def perclass_metrics(counts: dict) -> dict[str, np.ndarray]:
    """The five per-class metrics of spec 3.3 from :func:`perclass_counts`-style counts.

    ``TN = (N - true) - (pred - correct)``; precision = correct / pred; recall =
    correct / true; accuracy = (correct + TN) / N; true_negative_rate =
    TN / (N - true); balanced_accuracy = (recall + TNR) / 2. A ratio with a
    zero denominator is NaN (as in the original).
    """
    n = float(counts["total"])
    true = np.asarray(counts["true"], np.float64)
    pred = np.asarray(counts["pred"], np.float64)
    correct = np.asarray(counts["correct"], np.float64)
    tn = (n - true) - (pred - correct)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "precision": correct / pred,
            "recall": correct / true,
            "accuracy": (correct + tn) / n,
            "true_negative_rate": tn / (n - true),
        }
    out["balanced_accuracy"] = (out["recall"] + out["true_negative_rate"]) / 2
    return out


def _device_counts(logits, labels, valid, num_classes: int):
    """``pred``/``correct`` counts ``[E, C]`` (int32) of top-1 ``logits [E, B, C]``."""
    preds = jnp.argmax(logits, axis=-1)
    w = valid.astype(jnp.int32)
    rows = jnp.arange(preds.shape[0])[:, None]
    pred = jnp.zeros((preds.shape[0], num_classes), jnp.int32).at[rows, preds].add(w[None], mode="drop")
    hit = (preds == labels[None]).astype(jnp.int32) * w[None]
    correct = jnp.zeros((preds.shape[0], num_classes), jnp.int32).at[rows, labels[None]].add(hit, mode="drop")
    return pred, correct


# --------------------------------------------------------------------------
# Data


class ArraySource:
    """In-memory images ``[N, H, W, 3]`` (already preprocessed) and integer labels ``[N]`` as a data source."""

    def __init__(self, images, labels, classes: Sequence[str] | None = None):
        self.images = np.asarray(images, np.float32)
        self.labels = np.asarray(labels, np.int32)
        if self.images.ndim != 4 or self.labels.shape != (self.images.shape[0],):
            raise InterventionError(
                f"array data needs images [N, H, W, C] and labels [N], got {self.images.shape} and {self.labels.shape}"
            )
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def get_batch(self, indices) -> dict:
        idx = np.asarray(indices, np.int64)
        return {"image": self.images[idx], "label": self.labels[idx], "valid": np.ones(len(idx), bool)}

    def fingerprint(self) -> dict:
        h = hashlib.sha256(self.images.tobytes())
        h.update(self.labels.tobytes())
        return {"kind": "ArraySource", "count": len(self), "sha256": h.hexdigest()[:16]}


def as_source(data):
    """A data source from a source object or an ``(images, labels)`` pair."""
    if isinstance(data, tuple) and len(data) == 2:
        return ArraySource(*data)
    if hasattr(data, "get_batch") and hasattr(data, "__len__"):
        return data
    raise InterventionError(
        f"data must be a jaxdissect data source (e.g. jaxdissect.data.places.PlacesFolder) or a pair "
        f"(images, labels), got {type(data).__name__}"
    )


def _fingerprint(source) -> dict:
    fp = getattr(source, "fingerprint", None)
    return fp() if callable(fp) else {"kind": type(source).__name__, "count": len(source)}


def _batches(source, batch_size: int, num_items: int | None, start: int):
    from jaxdissect.data.loader import batches

    return batches(source, batch_size, num_items=num_items, start=start, keys=("image", "label"))


# --------------------------------------------------------------------------
# The evaluator: cached lower part, vmapped upper part


def _vgg_fast_path_ok(module, variables, layer: str, shapes: dict) -> bool:
    try:
        from jaxdissect.models.vgg16 import VGG16
    except ImportError:
        return False
    if not isinstance(module, VGG16) or layer.split(".")[-1] != "conv5_3" or "avgpool" not in shapes:
        return False
    kernel = variables.get("params", {}).get("fc6", {}).get("kernel")
    pooled = shapes["avgpool"]
    return kernel is not None and kernel.shape[0] == math.prod(pooled.shape[1:])


class _Evaluator:
    """Jitted pieces for one (model, layer, input shape): lower pass, generic and fast upper passes."""

    def __init__(self, module, variables, layer: str, x_like, method: str = "auto", apply_kwargs=None,
                 basis=None, basis_params=None):
        if method not in ("auto", "fast", "generic"):
            raise InterventionError(f"method must be 'auto', 'fast' or 'generic', got {method!r}")
        self.module, self.layer = module, layer
        apply_kwargs = dict(apply_kwargs or {})
        x_aval = jax.ShapeDtypeStruct(tuple(x_like.shape), jnp.dtype(x_like.dtype))
        shapes = layer_api.layer_shapes(module, variables, x_aval, **apply_kwargs)
        if layer not in shapes:
            valid = list(shapes)
            close = difflib.get_close_matches(layer, valid, n=5, cutoff=0.5)
            raise InterventionError(
                f"unknown layer {layer!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
                + f"; {type(module).__name__} has layers: {', '.join(valid)}"
            )
        act = shapes[layer]
        if isinstance(act, tuple) or not hasattr(act, "shape"):
            raise InterventionError(f"layer {layer!r} is called several times or returns no array; pick another layer")
        self.act_shape = tuple(act.shape)
        self.basis = basis
        if basis is not None:
            try:
                basis.check(basis_params, int(act.shape[-1]))
            except ValueError as e:
                raise InterventionError(f"layer {layer!r}: {e}") from None
        self.num_units = int(act.shape[-1]) if basis is None else basis.num_units(basis_params, int(act.shape[-1]))
        out = jax.eval_shape(lambda v, x: module.apply(v, x, **apply_kwargs), variables, x_aval)
        if not hasattr(out, "shape") or out.ndim != 2:
            raise InterventionError(f"{type(module).__name__} must return logits [N, classes], got {out}")
        self.num_classes = int(out.shape[-1])
        fast_ok = basis is None and _vgg_fast_path_ok(module, variables, layer, shapes)
        if method == "fast" and not fast_ok:
            raise InterventionError(
                f"the fast single-unit path needs jaxdissect's VGG16 and layer conv5_3; use method='generic' "
                f"for layer {layer!r} of {type(module).__name__}"
            )
        self.fast = fast_ok and method != "generic"
        self.fc6_width = int(variables["params"]["fc6"]["kernel"].shape[-1]) if self.fast else 0
        captured = (layer, "avgpool") if self.fast else (layer,)
        C, U = self.num_classes, self.num_units

        def lower(v, x, labels, valid):
            logits, acts = layer_api.capture(module, v, x, captured, **apply_kwargs)
            pred, correct = _device_counts(logits[None], labels, valid, C)
            return acts, pred[0], correct[0]

        def upper(v, act):
            return layer_api.run_from(module, v, layer, act, x_aval, **apply_kwargs)

        def ablate(mask, bp):
            """The edit removing the units (or, with a basis, the features) of ``mask`` (``bp``: its params)."""
            return layer_api.Ablate(mask) if basis is None else layer_api.FeatureEdit(basis, bp, layer_api.Ablate(mask))

        def generic_logits(v, act, masks, bp=None):
            """Logits ``[E, B, C]`` with each mask row ``[E, U]`` ablated, from the layer's activation."""
            return jax.vmap(lambda mask: upper(v, ablate(mask, bp)(act)))(masks)

        def feature_logits(v, act, ids, bp):
            """Logits ``[E, B, C]`` with each single feature ``ids [E]`` of the basis removed.

            ``FeatureEdit(basis, bp, Ablate([f]))`` gives ``a - decode(codes * e_f)``;
            ``decode`` is linear, so that is ``a - codes_f decode(e_f)``: the codes once
            per batch, one decoded direction per feature (not a full decode per feature).
            """
            codes = basis.encode(bp, act)
            directions = basis.decode(bp, jnp.eye(self.num_units, dtype=codes.dtype)[ids])     # [E, C]
            return jax.vmap(lambda d, c: upper(v, act - (c[..., None] * d).astype(act.dtype)),
                            in_axes=(0, -1))(directions, jnp.take(codes, ids, axis=-1))

        def fc6_parts(v, pooled):
            """Clean fc6 pre-activation ``[B, O]``, pooled units ``[B, P, U]``, fc6 rows per unit ``[P, U, O]``."""
            params = v["params"]["fc6"]
            kernel, bias = params["kernel"].astype(pooled.dtype), params["bias"].astype(pooled.dtype)
            b = pooled.shape[0]
            per_unit = pooled.reshape(b, -1, U)
            w = kernel.reshape(per_unit.shape[1], U, kernel.shape[-1])
            return pooled.reshape(b, -1) @ kernel + bias, per_unit, w

        def above_fc6(v, pre):
            """Logits ``[E, B, C]`` from fc6 pre-activations ``[E, B, O]`` (fc6's ReLU, then the model's own top)."""
            return jax.vmap(lambda h: layer_api.run_from(module, v, "fc6", h, x_aval, **apply_kwargs))(
                jax.nn.relu(pre))

        def unit_logits(v, parts, ids):
            clean, per_unit, w = parts
            return above_fc6(v, clean[None] - jnp.einsum("bpe,peo->ebo", per_unit[:, :, ids], w[:, ids, :]))

        def unit_deltas(parts):
            """``[U, B, O]``: what each unit adds to fc6's pre-activation (one fc6 pass of work)."""
            _, per_unit, w = parts
            return jnp.einsum("bpu,puo->ubo", per_unit, w)

        def mask_logits(v, parts, deltas, masks):
            return above_fc6(v, parts[0][None] - jnp.einsum("eu,ubo->ebo", masks.astype(deltas.dtype), deltas))

        def fast_logits(v, pooled, ids):
            """Logits ``[E, B, C]`` with each single unit ``ids [E]`` ablated, via the rank-49 fc6 update."""
            return unit_logits(v, fc6_parts(v, pooled), ids)

        def fast_mask_logits(v, pooled, masks):
            """Logits ``[E, B, C]`` for unit masks ``[E, U]``: fc6 minus the masked units' contributions."""
            parts = fc6_parts(v, pooled)
            return mask_logits(v, parts, unit_deltas(parts), masks)

        def counted(logits_fn):
            def run_chunks(v, act, sets, labels, valid, bp=None):
                """``sets [chunks, E, ...]`` -> counts ``[chunks * E, C]`` (``lax.map`` over chunks)."""
                pred, correct = jax.lax.map(
                    lambda s: _device_counts(logits_fn(v, act, s, bp), labels, valid, C), sets)
                return pred.reshape(-1, C), correct.reshape(-1, C)

            return jax.jit(run_chunks)

        def counted_fast(masks: bool):
            def run_chunks(v, pooled, sets, labels, valid):
                """Like ``counted``, with the clean fc6 pass (and unit contributions) computed once per batch."""
                parts = fc6_parts(v, pooled)
                if masks:
                    deltas = unit_deltas(parts)
                    fn = lambda s: mask_logits(v, parts, deltas, s)  # noqa: E731
                else:
                    fn = lambda s: unit_logits(v, parts, s)  # noqa: E731
                pred, correct = jax.lax.map(lambda s: _device_counts(fn(s), labels, valid, C), sets)
                return pred.reshape(-1, C), correct.reshape(-1, C)

            return jax.jit(run_chunks)

        self._lower = jax.jit(lower)
        self.generic_logits = jax.jit(generic_logits)
        self.fast_logits = jax.jit(fast_logits)
        self.fast_mask_logits = jax.jit(fast_mask_logits)
        self._generic = counted(generic_logits)
        self._features = counted(feature_logits)
        self._fast = counted_fast(masks=False)
        self._fast_masks = counted_fast(masks=True)
        self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

    def chunk_size(self, num_sets: int, batch_size: int, per_set_bytes: int) -> int:
        """Sets per vmapped call: within the memory budget, splitting ``num_sets`` into equal chunks."""
        most = max(1, min(256, _CHUNK_BYTES // max(1, batch_size * per_set_bytes)))
        return -(-num_sets // -(-num_sets // most)) if num_sets else 1


_EVALUATORS: dict = {}


def _evaluator(module, variables, layer, x_like, method, apply_kwargs, basis=None) -> _Evaluator:
    """A cached :class:`_Evaluator`, so repeated passes with one model reuse its compiled functions.

    ``basis``: ``(Basis, params)`` whose features the sets ablate (None: the layer's units).
    """
    b, bp = basis if basis is not None else (None, None)
    leaves, treedef = jax.tree.flatten((variables, bp))
    try:
        key = (module, layer, tuple(x_like.shape), str(x_like.dtype), method, treedef, b,
               tuple((tuple(np.shape(a)), str(np.asarray(a).dtype)) for a in leaves),
               tuple(sorted((apply_kwargs or {}).items())))
        hash(key)
    except TypeError:
        return _Evaluator(module, variables, layer, x_like, method, apply_kwargs, b, bp)
    if key not in _EVALUATORS:
        if len(_EVALUATORS) >= 8:
            _EVALUATORS.pop(next(iter(_EVALUATORS)))
        _EVALUATORS[key] = _Evaluator(module, variables, layer, x_like, method, apply_kwargs, b, bp)
    return _EVALUATORS[key]


def _pad_chunks(a: np.ndarray, chunk: int) -> tuple[np.ndarray, int]:
    n = a.shape[0]
    total = -(-n // chunk) * chunk
    if total > n:
        a = np.concatenate([a, np.repeat(a[-1:], total - n, axis=0)])
    return a.reshape((total // chunk, chunk) + a.shape[1:]), n


def evaluate_counts(
    module,
    variables,
    layer: str,
    data,
    *,
    masks: np.ndarray | None = None,
    single_units: np.ndarray | None = None,
    method: str = "auto",
    batch_size: int = 32,
    num_items: int | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 20,
    progress: Callable[[int, int], None] | None = None,
    apply_kwargs=None,
    basis=None,
) -> dict:
    """One pass over ``data``: clean counts plus counts for each mask row / single unit.

    Returns ``{'total', 'true' [C], 'clean_pred' [C], 'clean_correct' [C],
    'pred' [E, C], 'correct' [E, C]}`` (int64). With ``checkpoint`` (a work
    directory), the pass runs through :func:`jaxdissect.streaming.run_stream`:
    the counts are checkpointed every ``checkpoint_every`` batches and an
    interrupted pass resumes where it stopped; a checkpoint file of the older
    npz format is refused. ``basis``: ``(Basis, params)``
    (:mod:`jaxdissect.bases`): the masks and single units name the basis's
    features, each removed by :class:`jaxdissect.layers.FeatureEdit` (its
    decoded contribution subtracted, the reconstruction error kept).
    """
    source = as_source(data)
    total_items = len(source) if num_items is None else min(int(num_items), len(source))
    if total_items <= 0:
        raise InterventionError("the data has no items to evaluate")
    first = source.get_batch([0])
    x_like = np.zeros((batch_size,) + np.asarray(first["image"]).shape[1:], np.float32)
    ev = _evaluator(module, variables, layer, x_like, method, apply_kwargs, basis)
    basis_params = None if basis is None else jax.tree.map(jnp.asarray, dict(basis[1]))
    C, U = ev.num_classes, ev.num_units
    act_bytes = 4 * math.prod(ev.act_shape[1:])
    use_fast = ev.fast and (single_units is not None or masks is not None)
    features = basis is not None and single_units is not None   # one feature at a time: its decoded direction
    fast_bytes = 3 * 4 * ev.fc6_width if ev.fast else 0
    if single_units is not None:
        single_units = np.asarray(single_units, np.int32)
        unit_masks([[u] for u in single_units.tolist()], U)  # range check
        if not (use_fast or features):
            masks = np.zeros((len(single_units), U), bool)
            masks[np.arange(len(single_units)), single_units] = True
    if use_fast and single_units is not None:
        sets, num_sets = _pad_chunks(single_units, ev.chunk_size(len(single_units), batch_size, fast_bytes))
    elif features:
        sets, num_sets = _pad_chunks(single_units, ev.chunk_size(len(single_units), batch_size, act_bytes * 2))
    elif masks is not None:
        masks = unit_masks(masks, U)
        per_set = fast_bytes if use_fast else int(act_bytes * 2 * (1 + ev.num_units / ev.act_shape[-1]))
        sets, num_sets = _pad_chunks(masks, ev.chunk_size(len(masks), batch_size, per_set))
    else:
        sets, num_sets = None, 0

    num_batches = -(-total_items // batch_size)
    state = {"total": jnp.zeros((), jnp.int32), "true": jnp.zeros(C, jnp.int32),
             "clean_pred": jnp.zeros(C, jnp.int32), "clean_correct": jnp.zeros(C, jnp.int32),
             "pred": jnp.zeros((num_sets, C), jnp.int32), "correct": jnp.zeros((num_sets, C), jnp.int32)}
    key = _digest({"fp": _fingerprint(source), "n": total_items, "bs": batch_size, "layer": layer,
                   "sets": None if sets is None else hashlib.sha256(np.ascontiguousarray(sets).tobytes()).hexdigest(),
                   "fast": bool(use_fast), "model": type(module).__name__, "features": features,
                   **({} if basis is None else {"basis": basis[0].identity(basis[1])})})
    if checkpoint and os.path.isfile(checkpoint):
        raise InterventionError(
            f"{checkpoint} is a checkpoint file of an older version (the sweep now resumes through "
            "jaxdissect.streaming.run_stream in a directory); delete it to recompute")

    def batches(start):
        for b, batch in enumerate(_batches(source, batch_size, total_items, start), start=start):
            labels = np.asarray(batch["label"], np.int32)
            valid = np.asarray(batch["valid"], bool)
            bad = labels[valid & ((labels < 0) | (labels >= C))]
            if bad.size:
                raise InterventionError(f"labels {sorted(set(bad.tolist()))[:10]} are outside the model's {C} "
                                        "classes")
            yield jnp.asarray(batch["image"], jnp.float32), jnp.asarray(labels), jnp.asarray(valid), b

    def step(state, batch):
        x, labels_j, valid_j, b = batch
        acts, pred, correct = ev._lower(variables, x, labels_j, valid_j)
        counts = {"total": valid_j.sum(dtype=jnp.int32),
                  "true": jnp.zeros(C, jnp.int32).at[labels_j].add(valid_j.astype(jnp.int32), mode="drop"),
                  "clean_pred": pred, "clean_correct": correct, "pred": state["pred"] * 0,
                  "correct": state["correct"] * 0}
        if use_fast:
            fast = ev._fast if single_units is not None else ev._fast_masks
            counts["pred"], counts["correct"] = fast(variables, acts["avgpool"], jnp.asarray(sets), labels_j, valid_j)
        elif sets is not None:
            sweep = ev._features if features else ev._generic
            counts["pred"], counts["correct"] = sweep(variables, acts[layer], jnp.asarray(sets), labels_j, valid_j,
                                                      basis_params)
        if sets is not None:
            counts["pred"], counts["correct"] = counts["pred"][:num_sets], counts["correct"][:num_sets]
        state = ev._add(state, counts)
        if progress:
            progress(b + 1, num_batches)
        return state

    if checkpoint:
        from jaxdissect import streaming

        state = streaming.run_stream(step, state, batches, num_batches=num_batches, workdir=checkpoint,
                                     config={"key": key}, checkpoint_every=checkpoint_every,
                                     desc=f"ablation {layer}")
    else:
        for batch in batches(0):
            state = step(state, batch)
    out = {k: np.asarray(v).astype(np.int64) for k, v in jax.device_get(state).items()}
    out["total"] = int(out["total"])
    out["num_classes"] = C
    out["num_units"] = U
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def clean_counts(counts: dict) -> dict:
    """The clean model's counts ``[C]`` of an :func:`evaluate_counts` pass, as :func:`perclass_metrics` takes them."""
    return {"total": counts["total"], "true": counts["true"], "pred": counts["clean_pred"],
            "correct": counts["clean_correct"]}


def set_counts(counts: dict) -> dict:
    """The unit sets' counts ``[E, C]`` of an :func:`evaluate_counts` pass, as :func:`perclass_metrics` takes them."""
    return {"total": counts["total"], "true": counts["true"], "pred": counts["pred"], "correct": counts["correct"]}


def _with_metrics(counts: dict, which: str) -> dict:
    """Counts + metrics for the clean model (``which='clean'``) or the unit sets (``'sets'``)."""
    c = clean_counts(counts) if which == "clean" else set_counts(counts)
    return {**c, **perclass_metrics(c)}


# --------------------------------------------------------------------------
# Public API


def perclass_accuracy(module, variables, data, *, batch_size: int = 32, num_items: int | None = None,
                      **apply_kwargs) -> dict:
    """Per-class counts and the five metrics of the clean classifier on ``data``.

    Returns ``{'total', 'true', 'pred', 'correct'}`` (exact int64 counts, ``[C]``)
    plus ``precision``, ``recall``, ``accuracy``, ``true_negative_rate``,
    ``balanced_accuracy`` (``[C]`` float64).
    """
    source = as_source(data)
    layer = _any_layer(module, variables, source, apply_kwargs)
    counts = evaluate_counts(module, variables, layer, source, batch_size=batch_size, num_items=num_items,
                             apply_kwargs=apply_kwargs)
    return _with_metrics(counts, "clean")


def _any_layer(module, variables, source, apply_kwargs) -> str:
    x = np.zeros((1,) + np.asarray(source.get_batch([0])["image"]).shape[1:], np.float32)
    names = layer_api.layer_names(module, variables, x, **apply_kwargs)
    if not names:
        raise InterventionError(f"{type(module).__name__} has no submodules to treat as layers")
    return names[-1]


def ablate_units(module, variables, layer: str, units, data, *, batch_size: int = 32,
                 num_items: int | None = None, basis=None, **apply_kwargs) -> dict:
    """Per-class counts and metrics with ``units`` of ``layer`` zeroed together (one custom set).

    ``units``: unit indices or a bool mask (of ``basis``'s features when given,
    ``(Basis, params)``: see :func:`evaluate_counts`). Returns the same keys as
    :func:`perclass_accuracy`, plus ``baseline`` (the clean model's, from the
    same pass).
    """
    counts = evaluate_counts(module, variables, layer, data, masks=[units], batch_size=batch_size,
                             num_items=num_items, apply_kwargs=apply_kwargs, basis=basis)
    result = {k: v[0] if isinstance(v, np.ndarray) and v.ndim == 2 else v
              for k, v in _with_metrics(counts, "sets").items()}
    result["baseline"] = _with_metrics(counts, "clean")
    return result


def ablation_sweep(module, variables, layer: str, unit_sets, data, *, batch_size: int = 32,
                   num_items: int | None = None, checkpoint: str | None = None, checkpoint_every: int = 20,
                   progress: Callable[[int, int], None] | None = None, basis=None,
                   **apply_kwargs) -> tuple[dict, dict]:
    """Many ablations in one pass over ``data``: returns ``(baseline, sets)``.

    ``unit_sets``: a list of unit-index lists / masks, or bool masks ``[E, U]``
    (of ``basis``'s features when given, see :func:`evaluate_counts`).
    ``sets`` holds counts and metrics ``[E, C]``; ``baseline`` those of the
    clean model ``[C]``.
    """
    counts = evaluate_counts(module, variables, layer, data, masks=unit_sets, batch_size=batch_size,
                             num_items=num_items, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                             progress=progress, apply_kwargs=apply_kwargs, basis=basis)
    return _with_metrics(counts, "clean"), _with_metrics(counts, "sets")


def single_unit_sweep(module, variables, layer: str, data, *, units=None, method: str = "auto",
                      batch_size: int = 32, num_items: int | None = None, checkpoint: str | None = None,
                      checkpoint_every: int = 20, progress: Callable[[int, int], None] | None = None,
                      basis=None, **apply_kwargs) -> tuple[dict, dict]:
    """Ablate each unit of ``layer`` alone: returns ``(baseline, per_unit)``, metrics ``[len(units), C]``.

    ``units`` defaults to every unit. ``method``: ``'auto'`` (the rank-49 fc6
    update for VGG16 ``conv5_3``, else generic), ``'fast'`` or ``'generic'``.
    ``basis``: ``(Basis, params)``: each of its features is ablated instead
    (:func:`evaluate_counts`).
    """
    if units is None:
        x = np.zeros((1,) + np.asarray(as_source(data).get_batch([0])["image"]).shape[1:], np.float32)
        shape = layer_api.layer_shapes(module, variables, x, **apply_kwargs).get(layer)
        if shape is None or isinstance(shape, tuple):
            raise InterventionError(f"unknown layer {layer!r}; layers: {layer_api.layer_names(module, variables, x)}")
        channels = int(shape.shape[-1])
        units = np.arange(channels if basis is None else basis[0].num_units(basis[1], channels))
    units = np.asarray(units)
    if units.size == 0:
        raise InterventionError("units is empty; give at least one unit (default: every unit of the layer)")
    counts = evaluate_counts(module, variables, layer, data, single_units=units, method=method, batch_size=batch_size,
                             num_items=num_items, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                             progress=progress, apply_kwargs=apply_kwargs, basis=basis)
    return _with_metrics(counts, "clean"), _with_metrics(counts, "sets")


# --------------------------------------------------------------------------
# Ranking and importance (spec 3.3 steps 3-4)


def rank_units(single_ba: np.ndarray) -> np.ndarray:
    """``[C, U]``: per class, units ordered by ascending balanced accuracy after single-unit ablation.

    ``single_ba`` is ``[U, C]`` (most damaging first; ties by unit index; NaN last).
    """
    ba = np.asarray(single_ba, np.float64).T
    return np.argsort(np.where(np.isnan(ba), np.inf, ba), axis=1, kind="stable")


def unit_importance(order: np.ndarray, top: int = IMPORTANT_TOP) -> np.ndarray:
    """``[U]``: for how many classes each unit is among the ``top`` most damaging."""
    return np.bincount(order[:, :top].ravel(), minlength=order.shape[1])


def class_unit_masks(order: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ablate, keep)`` bool masks ``[C, U]``: the ``n`` most important units of each class, and all others."""
    c, u = order.shape
    if not 0 < n < u:
        raise InterventionError(f"n = {n} must be between 1 and {u - 1} for a layer of {u} units")
    top = np.zeros((c, u), bool)
    top[np.arange(c)[:, None], order[:, :n]] = True
    return top, ~top


def class_index(class_names: Sequence[str], name: str) -> int:
    """Index of class ``name``; unknown names raise, listing close matches."""
    return lookup(class_names, name, "class")


def importance_buckets(importance: np.ndarray, iou: np.ndarray | None = None, max_bucket: int = 7) -> dict:
    """Units per importance count ``0 .. max_bucket-1, >=max_bucket`` and their mean IoU (paper figure)."""
    names = [str(i) for i in range(max_bucket)] + [f">={max_bucket}"]
    bucket = np.minimum(importance, max_bucket)
    out = {"bucket": names, "units": [int((bucket == i).sum()) for i in range(max_bucket + 1)]}
    if iou is not None:
        out["mean_iou"] = [float(np.nanmean(iou[bucket == i])) if (bucket == i).any() else None
                           for i in range(max_bucket + 1)]
    return out
