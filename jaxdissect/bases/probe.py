"""Concept probes: per-concept linear directions learned from segmentation labels (Net2Vec, Fong & Vedaldi 2018).

For each concept ``c`` a weight ``w_c [C]`` and bias ``b_c`` over the layer's
channels predict the concept's mask at every pixel of the label grid,
``sigmoid(w_c . a(p) + b_c)``, with ``a`` the activations upsampled to the
label resolution (the dissection's geometry). Training minimises Net2Vec's
class-balanced per-pixel loss::

    - mean_p [ alpha_c M_c(p) log s_c(p) + (1 - alpha_c) (1 - M_c(p)) log (1 - s_c(p)) ]

with ``alpha_c = 1 - (fraction of training pixels labelled c)``, all concepts
at once (a ``[pixels, C] x [C, concepts]`` product), Adam on each batch for
``steps_per_batch`` steps inside one jitted ``lax`` loop, ``epochs`` passes
over the data. Every ``holdout_every``-th image is held out; the report
gives each concept's set IoU of ``s_c > 0.5`` on them (Net2Vec's measure).

:class:`Probe` is the resulting basis: units are the concepts,
``encode(a) = W a`` (the bias only shifts levels, which dissection sets by
quantile), ``decode`` uses the pseudo-inverse of ``W``, so removing a
concept removes its component in the span of the directions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.bases import BasisError, Linear
from jaxdissect.kernels import upsample as upsample_k


@dataclasses.dataclass(frozen=True)
class Probe(Linear):
    """Concept directions ``params = {"matrix": W [K, C], "bias": b [K], "decoder": pinv(W)^T [K, C]}``."""

    kind = "probe"
    label: str = "probe:net2vec"
    concepts: tuple = ()

    def check(self, params, channels):
        super().check(params, channels)
        if tuple(np.shape(params.get("decoder", ()))) != tuple(np.shape(params["matrix"])):
            raise BasisError(f"{self.label}: the decoder must have the matrix's shape {np.shape(params['matrix'])}")

    def decode(self, params, codes):
        return codes @ jnp.asarray(params["decoder"], codes.dtype)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Training settings of a Net2Vec probe (JSON-able; part of the cache key)."""

    epochs: int = 10
    steps_per_batch: int = 8
    learning_rate: float = 0.05
    holdout_every: int = 5
    geometry: str = "original"


def _unpack(batch, index):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise BasisError(f"probe: batch {index} must be (acts [B, h, w, C], seg [B, K, S, S])")
    acts, seg = np.asarray(batch[0], np.float32), np.asarray(batch[1])
    seg = seg[:, None] if seg.ndim == 3 else seg
    if acts.ndim != 4 or seg.ndim != 4 or len(seg) != len(acts):
        raise BasisError(f"probe: batch {index} has activations {acts.shape} and labels {seg.shape}; give "
                         "[B, h, w, C] and [B, K, S, S] (or [B, S, S])")
    return acts, seg.astype(np.int32)


@functools.lru_cache(maxsize=16)
def _fns(source_hw, resolution, geometry, steps, learning_rate):
    """Jitted statistics, training and evaluation steps for one geometry (compiled once per batch shape)."""
    import optax

    taps = upsample_k.make_taps(source_hw, resolution, geometry)
    tx = optax.adam(learning_rate)

    def pixels(acts, seg, labels, images):
        """Upsampled activations ``[P, C]``, concept masks ``[P, K]`` and the pixels of ``images [B]`` ``[P]``."""
        a = upsample_k.apply_taps(acts, *taps).reshape(-1, acts.shape[-1])
        masks = (seg[:, :, :, :, None] == labels).any(1).reshape(-1, labels.shape[0])
        return a, masks, jnp.repeat(images, resolution[0] * resolution[1])

    def stats(carry, acts, seg, labels, train):
        a, masks, use = pixels(acts, seg, labels, train)
        sq, pos, n = carry
        return (sq + jnp.where(use[:, None], a * a, 0).sum(0), pos + (masks & use[:, None]).sum(0, dtype=jnp.int32),
                n + use.sum(dtype=jnp.int32))

    def loss_fn(params, a, masks, use, alpha):
        z = a @ params["w"].T + params["b"]
        per = alpha * masks * jax.nn.log_sigmoid(z) + (1 - alpha) * (~masks) * jax.nn.log_sigmoid(-z)
        return -jnp.sum(jnp.where(use[:, None], per, 0)) / jnp.maximum(use.sum(), 1)

    def fit(params, opt, acts, seg, labels, train, alpha, scale):
        a, masks, use = pixels(acts, seg, labels, train)
        a = a / scale

        def body(_, carry):
            params, opt, _ = carry
            loss, g = jax.value_and_grad(loss_fn)(params, a, masks, use, alpha)
            updates, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, updates), opt, loss

        return jax.lax.fori_loop(0, steps, body, (params, opt, jnp.zeros((), jnp.float32)))

    def evaluate(counts, params, acts, seg, labels, held, scale):
        a, masks, use = pixels(acts, seg, labels, held)
        pred = ((a / scale) @ params["w"].T + params["b"]) > 0
        inter, union = counts
        return (inter + (pred & masks & use[:, None]).sum(0, dtype=jnp.int32),
                union + ((pred | masks) & use[:, None]).sum(0, dtype=jnp.int32))

    return jax.jit(stats), jax.jit(fit, donate_argnums=(0, 1)), jax.jit(evaluate), tx


def train(batches: Callable[[], Iterable], num_labels: int, *, label_names: Sequence[str] | None = None,
          settings: Settings = Settings(), progress: bool | None = None):
    """Train Net2Vec directions on ``batches()`` (fresh iterators of ``(acts, seg)``); ``(Probe, params, info)``.

    ``seg`` holds labels in ``[0, num_labels)`` (0 = none), ``[B, K, S, S]``
    or ``[B, S, S]``. Units are the labels with training pixels. ``info``
    has ``labels`` (label ids), ``concepts`` (names), ``alpha``,
    ``heldout_iou`` per concept, ``heldout_images`` and the loss per epoch.
    """
    from jaxdissect.progress import progress as bar

    s = settings
    if s.holdout_every < 2:
        raise BasisError(f"probe: holdout_every must be >= 2 (every n-th image held out), got {s.holdout_every}")
    first = next(iter(batches()), None)
    if first is None:
        raise BasisError("probe: batches() yielded no batch; nothing to train on")
    acts, seg = _unpack(first, 0)
    source_hw, resolution, channels = acts.shape[1:3], seg.shape[2:], acts.shape[-1]
    stats, fit, evaluate, tx = _fns(tuple(source_hw), tuple(resolution), s.geometry, int(s.steps_per_batch),
                                    float(s.learning_rate))
    all_labels = jnp.arange(1, num_labels, dtype=jnp.int32)

    def stream():
        start = 0
        for i, batch in enumerate(batches()):
            acts, seg = _unpack(batch, i)
            if acts.shape[1:] != (*source_hw, channels) or seg.shape[2:] != tuple(resolution):
                raise BasisError(f"probe: batch {i} has activations {acts.shape} and labels {seg.shape}, unlike "
                                 "the first batch's; every batch must come from the same layer and labels")
            if seg.size and (seg.min() < 0 or seg.max() >= num_labels):
                raise BasisError(f"probe: batch {i} has labels outside [0, {num_labels}); pass the right num_labels")
            held = (np.arange(start, start + len(acts)) % s.holdout_every) == s.holdout_every - 1
            start += len(acts)
            yield acts, seg, held

    zeros = (jnp.zeros((channels,), jnp.float32), jnp.zeros((num_labels - 1,), jnp.int32), jnp.zeros((), jnp.int32))
    carry = zeros
    for acts, seg, held in stream():
        carry = stats(carry, acts, seg, all_labels, ~held)
    sq, pos, n = (np.asarray(x) for x in carry)
    if n == 0:
        raise BasisError(f"probe: no training images (every {s.holdout_every}-th is held out); give more data")
    keep = np.flatnonzero(pos > 0)
    if not keep.size:
        raise BasisError("probe: no label has a training pixel; check the segmentations")
    labels = jnp.asarray(keep + 1, jnp.int32)
    alpha = jnp.asarray(1.0 - pos[keep] / float(n), jnp.float32)
    scale = jnp.asarray(np.sqrt(np.maximum(sq / float(n), 1e-12)), jnp.float32)
    params = {"w": jnp.zeros((len(keep), channels), jnp.float32), "b": jnp.zeros((len(keep),), jnp.float32)}
    opt = tx.init(params)
    losses = []
    for _ in bar(range(s.epochs), desc="train probe:net2vec", unit="epoch", enabled=progress):
        total, count = 0.0, 0
        for acts, seg, held in stream():
            params, opt, loss = fit(params, opt, acts, seg, labels, ~held, alpha, scale)
            total, count = total + float(loss), count + 1
        losses.append(total / count)
    counts = (jnp.zeros((len(keep),), jnp.int32), jnp.zeros((len(keep),), jnp.int32))
    held_images = 0
    for acts, seg, held in stream():
        counts = evaluate(counts, params, acts, seg, labels, held, scale)
        held_images += int(held.sum())
    inter, union = (np.asarray(x, np.int64) for x in counts)
    matrix = np.asarray(params["w"] / scale, np.float32)
    names = [str(label_names[i]) if label_names is not None else str(i) for i in keep + 1]
    out = {"matrix": matrix, "bias": np.asarray(params["b"], np.float32),
           "decoder": np.linalg.pinv(matrix.astype(np.float64)).T.astype(np.float32)}
    info = {"labels": (keep + 1).tolist(), "concepts": names, "alpha": np.asarray(alpha).tolist(),
            "heldout_iou": np.where(union > 0, inter / np.maximum(union, 1), 0.0).tolist(),
            "heldout_images": held_images, "loss": losses}
    return Probe(concepts=tuple(names)), out, info


def train_or_load(cache_dir: str, identity: Mapping[str, Any], batches: Callable[[], Iterable], num_labels: int, *,
                  label_names: Sequence[str] | None = None, settings: Settings = Settings(),
                  progress: bool | None = None, log=None):
    """The probe of ``identity`` (model, layer, data, labels) and ``settings``, trained once per user:
    ``(Probe, params, info)``."""
    from jaxdissect.bases import cache

    settings_json = dataclasses.asdict(settings)

    def build(tmp, _workdir):
        _, params, info = train(batches, num_labels, label_names=label_names, settings=settings, progress=progress)
        cache.save(tmp, params, {"format": "jaxdissect-probe", "method": "net2vec", "settings": settings_json,
                                 "identity": dict(identity), **info})

    path = cache.cached(cache_dir, "probe", dict(identity), {**settings_json, "num_labels": num_labels}, build,
                        log=log)
    return load(path)


def load(path: str):
    """``(Probe, params, info)`` of a probe folder written by :func:`train_or_load`."""
    from jaxdissect.bases import cache

    params, info = cache.load(path)
    return Probe(concepts=tuple(info["concepts"])), params, dict(info, path=path)
