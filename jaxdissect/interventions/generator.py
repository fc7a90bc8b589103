"""Generator interventions: remove objects by ablating units, insert them by switching units on.

The experiments of the PNAS paper's section on generators (spec 3.4), as
functions of a Flax generator, a layer name and a segmentation function:

* :func:`ablation_segstats`: how much of each label the segmenter finds in
  generated images when sets of units are zeroed (single units, the top ``n``
  units for a concept), with the per-image change against the clean image.
* :func:`insertion_context`: set a concept's units to high values inside one
  feature-map cell at every location, and measure how much of the concept
  appears, conditioned on what was at that location before (the context
  experiment).

Speed by design: the generator below the edited layer does not depend on the
edit, so each batch runs it once, caches the layer's activation, and evaluates
only the part above (:func:`jaxdissect.layers.run_from`) for every unit set or
location, many per call (``jax.lax.map`` over vmapped chunks). The segmenter
is any function ``images [N, H, W, 3] in [-1, 1] -> labels [N, K, S, S]``;
:func:`segmenter_fn` adapts a loaded jaxdissect segmenter.

Accumulation is on the host in float64 (one small transfer per batch), so
10,000-image means do not lose precision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import layers as layer_api
from jaxdissect.interventions.common import InterventionError, lookup, unit_masks


# --------------------------------------------------------------------------
# Choosing units


def find_label(label_names: Sequence[str], concept: str) -> int:
    """Index of ``concept`` in ``label_names``; an unknown name lists the close matches."""
    return lookup(label_names, concept, "concept")


def top_units(iou: np.ndarray, label_names: Sequence[str], concept: str, n: int) -> np.ndarray:
    """The ``n`` units with the highest IoU for ``concept`` (``iou`` is ``[U, L]``), best first."""
    iou = np.asarray(iou)
    if iou.ndim != 2 or iou.shape[1] != len(label_names):
        raise InterventionError(
            f"iou has shape {iou.shape}; expected [units, {len(label_names)}] to match the label names"
        )
    if not 1 <= n <= iou.shape[0]:
        raise InterventionError(f"asked for the top {n} units of a layer with {iou.shape[0]} units")
    column = iou[:, find_label(label_names, concept)]
    return np.argsort(-column, kind="stable")[:n]


# --------------------------------------------------------------------------
# Segmentation summaries


def label_counts(seg: jax.Array, num_labels: int) -> jax.Array:
    """``[B, K, S, S]`` labels -> ``[B, L]`` counts of (pixel, channel) entries equal to each label."""
    flat = seg.reshape(seg.shape[0], -1)
    return jax.vmap(lambda s: jnp.zeros((num_labels,), jnp.int32).at[s].add(1, mode="drop"))(flat)


def segmenter_fn(segmenter, variables, downsample: int = 4) -> Callable:
    """Wrap a loaded jaxdissect segmenter (``jaxdissect.load_segmenter``) as ``images -> labels``.

    The wrapper traces inside the interventions' jitted steps, so it calls the
    segmenter module directly (``jaxdissect.segment`` validates concrete inputs).
    """

    def fn(images):
        return segmenter.apply(variables, images, downsample)

    return fn


@dataclasses.dataclass
class Moments:
    """Running count, sum and sum of squares (float64, host) of vectors; mean, variance, sem."""

    count: np.ndarray
    total: np.ndarray
    squares: np.ndarray

    @classmethod
    def zeros(cls, shape) -> Moments:
        shape = tuple(shape)
        return cls(np.zeros(shape[:-1]), np.zeros(shape), np.zeros(shape))

    def add(self, values: np.ndarray) -> None:
        """Add samples ``values [..., n, L]`` (the leading axes match the moments' own)."""
        values = np.asarray(values, np.float64)
        self.count += values.shape[-2]
        self.total += values.sum(-2)
        self.squares += (values * values).sum(-2)

    def add_conditional(self, values: np.ndarray, conditions: np.ndarray) -> None:
        """Add samples ``values [n, L]`` to every condition row they carry (``conditions [n, C]``, 0/1)."""
        values = np.asarray(values, np.float64)
        cond = np.asarray(conditions, np.float64)
        self.count += cond.sum(0)
        self.total += cond.T @ values
        self.squares += cond.T @ (values * values)

    @property
    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.total / self.count[..., None]

    @property
    def variance(self) -> np.ndarray:
        """Unbiased variance (n - 1), NaN with fewer than two samples."""
        with np.errstate(invalid="ignore", divide="ignore"):
            n = self.count[..., None]
            return np.maximum(self.squares - self.total * self.total / n, 0.0) / (n - 1)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}count": self.count, f"{prefix}mean": self.mean, f"{prefix}variance": self.variance}


# --------------------------------------------------------------------------
# Ablation


@dataclasses.dataclass
class AblationStats:
    """Label fractions (share of the ``S * S`` pixels, summed over channels) per unit set.

    ``baseline``: clean images, vectors of length L. ``ablated`` and ``delta``:
    ``[M, L]`` per unit set; ``delta`` is the per-image change against the
    same image generated clean, so its variance measures the effect, not the
    spread of scenes.
    """

    baseline: Moments
    ablated: Moments
    delta: Moments

    def removed_fraction(self, label: int) -> np.ndarray:
        """Share of ``label``'s pixels removed by each unit set: ``-mean delta / baseline mean``."""
        return -self.delta.mean[:, label] / self.baseline.mean[label]

    def arrays(self) -> dict[str, np.ndarray]:
        return {**self.baseline.arrays("baseline_"), **self.ablated.arrays("ablated_"), **self.delta.arrays("delta_")}


def _layer_shape(module, variables, layer: str, z_like, basis=None) -> tuple[int, ...]:
    """The layer's NHWC shape; with ``basis`` (``(Basis, params)``), its last axis counts the basis's features."""
    shapes = layer_api.layer_shapes(module, variables, z_like)
    if layer not in shapes:
        raise InterventionError(
            f"unknown layer {layer!r}; the generator's layers are: {', '.join(sorted(shapes))}"
        )
    shape = shapes[layer].shape
    if len(shape) != 4:
        raise InterventionError(f"layer {layer!r} has output shape {shape}; interventions need an NHWC feature map")
    if basis is None:
        return tuple(shape)
    b, params = basis
    try:
        b.check(params, int(shape[-1]))
    except ValueError as e:
        raise InterventionError(f"layer {layer!r}: {e}") from None
    return tuple(shape[:-1]) + (b.num_units(params, int(shape[-1])),)


def _basis_args(basis):
    """``(static basis or None, params as arrays)``: params travel to jit as arguments."""
    if basis is None:
        return None, {}
    return basis[0], jax.tree.map(jnp.asarray, dict(basis[1]))


def _edited(basis, params, edit, acts):
    """``edit`` of the layer's units, or with a basis of its features (:class:`jaxdissect.layers.FeatureEdit`)."""
    return edit(acts) if basis is None else layer_api.FeatureEdit(basis, params, edit)(acts)


def _z_batches(z: np.ndarray, batch_size: int):
    z = np.asarray(z, np.float32)
    if z.ndim < 2 or len(z) == 0:
        raise InterventionError(f"z must be a non-empty [N, latent] array, got shape {z.shape}")
    if batch_size < 1:
        raise InterventionError(f"batch_size must be positive, got {batch_size}")
    num_batches = -(-len(z) // batch_size)
    return num_batches, lambda start: (z[i * batch_size:(i + 1) * batch_size] for i in range(start, num_batches))


def _fold(step, state: dict, z, batch_size, workdir, config, desc) -> dict:
    """Fold ``step`` over the batches of ``z``; with a ``workdir``, resumably (jaxdissect.streaming)."""
    num_batches, batches = _z_batches(z, batch_size)
    if workdir is None:
        for batch in batches(0):
            state = step(state, batch)
        return state
    from jaxdissect import streaming

    return streaming.run_stream(step, state, batches, num_batches=num_batches, workdir=workdir,
                                config=config, checkpoint_every=20, desc=desc)


def _moments_state(prefix: str, shape) -> dict:
    return {f"{prefix}count": np.zeros(shape[:-1]), f"{prefix}total": np.zeros(shape),
            f"{prefix}squares": np.zeros(shape)}


def _moments(state: dict, prefix: str) -> Moments:
    return Moments(*(np.array(state[f"{prefix}{k}"]) for k in ("count", "total", "squares")))


def _store(state: dict, prefix: str, moments: Moments) -> None:
    state.update({f"{prefix}count": moments.count, f"{prefix}total": moments.total,
                  f"{prefix}squares": moments.squares})


def ablation_segstats(
    module,
    variables,
    layer: str,
    unit_sets: Iterable[Sequence[int]],
    z: np.ndarray,
    segment: Callable,
    num_labels: int,
    *,
    batch_size: int = 25,
    chunk: int = 8,
    workdir: str | None = None,
    basis=None,
) -> AblationStats:
    """Segmentation statistics of generated images with each set of ``layer``'s units zeroed.

    ``z`` holds the latent samples ``[N, latent]``; ``segment`` maps images in
    [-1, 1] to labels ``[N, K, S, S]``. The lower network runs once per batch;
    the unit sets are evaluated ``chunk`` at a time on the upper network only.
    With ``workdir`` the sweep checkpoints and resumes after an interruption.
    ``basis``: ``(Basis, params)`` (:mod:`jaxdissect.bases`): the sets name
    its features, each removed by :class:`jaxdissect.layers.FeatureEdit`
    (decoded contribution subtracted, reconstruction error kept).
    """
    shape = _layer_shape(module, variables, layer, jnp.asarray(np.asarray(z)[:1]), basis)
    masks = unit_masks(unit_sets, shape[-1])
    static, params = _basis_args(basis)
    device_step = _ablation_step(module, layer, segment, num_labels, chunk, static)
    m = masks.shape[0]

    def step(state, batch):
        base, ablated = jax.device_get(device_step(variables, jnp.asarray(batch), jnp.asarray(masks), params))
        state = dict(state)
        for prefix, values in (("baseline_", base), ("ablated_", ablated), ("delta_", ablated - base[None])):
            moments = _moments(state, prefix)
            moments.add(values)
            _store(state, prefix, moments)
        return state

    state = {**_moments_state("baseline_", (num_labels,)), **_moments_state("ablated_", (m, num_labels)),
             **_moments_state("delta_", (m, num_labels))}
    config = {"experiment": "ablation", "layer": layer, "unit_sets": masks.astype(int).tolist(),
              "num_samples": len(z), "batch_size": batch_size, "num_labels": num_labels,
              **({} if basis is None else {"basis": basis[0].identity(basis[1])})}
    state = _fold(step, state, z, batch_size, workdir, config, f"ablating {m} unit sets of {layer}")
    return AblationStats(_moments(state, "baseline_"), _moments(state, "ablated_"), _moments(state, "delta_"))


def _ablation_step(module, layer, segment, num_labels, chunk, basis=None):
    def counts(images):
        seg = segment(images)
        return label_counts(seg, num_labels).astype(jnp.float32) / (seg.shape[-1] * seg.shape[-2])

    @jax.jit
    def step(variables, z, masks, params):
        images, acts = layer_api.capture(module, variables, z, [layer])
        acts = acts[layer]

        def ablated(mask):
            if basis is None:
                edited = jnp.where(mask, jnp.zeros((), acts.dtype), acts)
            else:
                edited = _edited(basis, params, layer_api.Ablate(mask), acts)
            out = layer_api.run_from(module, variables, layer, edited, z)
            return counts(out)

        return counts(images), jax.lax.map(ablated, masks, batch_size=chunk)

    return step


# --------------------------------------------------------------------------
# Insertion and context


@dataclasses.dataclass
class ContextStats:
    """Change in label counts when units are switched on at a location, by what was there before.

    ``delta``: moments over (image, location) samples of the per-image change
    in (pixel, channel) counts of every label, ``[L_condition, L]``; the
    condition is every nonzero label the clean segmentation has, in any
    channel, at the centre of the edited cell. ``baseline``: clean counts.
    """

    delta: Moments
    baseline: Moments

    def added(self, label: int, min_samples: int = 1) -> dict[int, tuple[float, float, int]]:
        """``{condition: (mean added count of label, its std, samples)}`` for conditions seen often enough."""
        mean, var = self.delta.mean[:, label], self.delta.variance[:, label]
        keep = np.nonzero(self.delta.count >= min_samples)[0]
        return {int(c): (float(mean[c]), float(np.sqrt(var[c])), int(self.delta.count[c])) for c in keep}

    def arrays(self) -> dict[str, np.ndarray]:
        return {**self.delta.arrays("delta_"), **self.baseline.arrays("baseline_")}


def insertion_context(
    module,
    variables,
    layer: str,
    units: Sequence[int],
    values,
    z: np.ndarray,
    segment: Callable,
    num_labels: int,
    *,
    cells: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 20,
    chunk: int = 8,
    workdir: str | None = None,
    basis=None,
) -> ContextStats:
    """Set ``units`` to ``values`` inside one cell of ``layer`` at each of ``cells`` (default: all).

    For every image and cell, the change in label counts is accumulated under
    each label found at the cell's centre in the clean segmentation (spec
    3.4's context experiment; 20 'door' units at their 0.995 quantile in the
    paper). Locations are evaluated ``chunk`` at a time on the upper network.
    ``basis``: ``(Basis, params)``: ``units`` are its features, whose codes
    are set and the change decoded (:class:`jaxdissect.layers.FeatureEdit`).
    """
    h, w, n_units = _layer_shape(module, variables, layer, jnp.asarray(np.asarray(z)[:1]), basis)[1:]
    mask = unit_masks([units], n_units)[0]
    full_values = np.zeros(n_units, np.float32)
    full_values[np.asarray(units)] = np.broadcast_to(np.asarray(values, np.float32), (len(units),))
    cells = [(y, x) for y in range(h) for x in range(w)] if cells is None else [tuple(c) for c in cells]
    for y, x in cells:
        if not (0 <= y < h and 0 <= x < w):
            raise InterventionError(f"cell {(y, x)} is outside the {h}x{w} feature map of {layer!r}")
    regions = np.zeros((len(cells), h, w), np.float32)
    for i, (y, x) in enumerate(cells):
        regions[i, y, x] = 1
    static, params = _basis_args(basis)
    device_step = _insertion_step(module, layer, segment, num_labels, chunk, (h, w), np.asarray(cells), static)
    args = (jnp.asarray(mask), jnp.asarray(full_values), jnp.asarray(regions), params)

    def step(state, batch):
        base, delta, cond = jax.device_get(device_step(variables, jnp.asarray(batch), *args))
        state = dict(state)
        baseline = _moments(state, "baseline_")
        baseline.add(base)
        _store(state, "baseline_", baseline)
        moments = _moments(state, "delta_")
        moments.add_conditional(delta.reshape(-1, num_labels), cond.reshape(-1, num_labels))
        _store(state, "delta_", moments)
        return state

    state = {**_moments_state("baseline_", (num_labels,)), **_moments_state("delta_", (num_labels, num_labels))}
    config = {"experiment": "insertion", "layer": layer, "units": [int(u) for u in units],
              "values": full_values.tolist(), "cells": [list(c) for c in cells], "num_samples": len(z),
              "batch_size": batch_size, "num_labels": num_labels,
              **({} if basis is None else {"basis": basis[0].identity(basis[1])})}
    state = _fold(step, state, z, batch_size, workdir, config, f"inserting at {len(cells)} cells of {layer}")
    return ContextStats(_moments(state, "delta_"), _moments(state, "baseline_"))


def _insertion_step(module, layer, segment, num_labels, chunk, hw, cells, basis=None):
    h, w = hw

    @jax.jit
    def step(variables, z, mask, values, regions, params):
        images, acts = layer_api.capture(module, variables, z, [layer])
        seg = segment(images)
        base = label_counts(seg, num_labels)
        s_h, s_w = seg.shape[-2:]
        cy = cells[:, 0] * (s_h // h) + s_h // (2 * h)
        cx = cells[:, 1] * (s_w // w) + s_w // (2 * w)
        centre = jnp.moveaxis(seg[:, :, cy, cx], 1, 2)  # [B, C, K]
        present = lambda labels: jnp.zeros((num_labels,), jnp.int32).at[labels].max(1, mode="drop")  # noqa: E731
        cond = jax.vmap(jax.vmap(present))(centre)  # [B, C, L]
        cond = cond.at[..., 0].set(0)

        def inserted(region):
            edited = _edited(basis, params, layer_api.SetUnits(mask, values, region), acts[layer])
            out = layer_api.run_from(module, variables, layer, edited, z)
            return label_counts(segment(out), num_labels) - base

        delta = jax.lax.map(inserted, regions, batch_size=chunk)  # [C, B, L]
        return base, jnp.swapaxes(delta, 0, 1), cond

    return step
