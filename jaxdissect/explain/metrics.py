"""How well does a concept describe a unit? Label metrics and NeuronEval's sanity checks.

Each metric compares a unit's activations ``act [..., n]`` with a concept's
labels ``concept [..., n]`` (0/1, or probabilities) over the same n samples:
pixels (pixel level) or images (image level, :func:`image_level`). Binary
metrics use the unit's mask ``act > threshold``:

* ``iou``: ``|A & C| / |A | C|``; ``f1``: ``2 |A & C| / (|A| + |C|)``;
* ``auprc``: average precision of the activations ranking the concept's
  positives (ties in activation grouped, as a step precision-recall curve);
* ``pearson``: correlation; ``cosine``: cosine similarity;
* ``recall``: ``|A & C| / |A|``, the fraction of the unit's active samples that
  carry the concept, and ``precision``: ``|A & C| / |C|``. Both are kept to
  show what the sanity checks catch.

Sanity checks (Oikarinen et al., ICML 2025): for a unit whose activations
match a concept, a sound metric must score the true labels strictly higher
than labels with positives removed (:func:`missing_labels_check`) and than
labels with extra positives added (:func:`extra_labels_check`).
:func:`sanity_report` runs both on any metric and flags those that fail
(recall fails the extra-labels check; precision the missing-labels check).
All metrics are jit-friendly JAX functions over the last axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _mask(act, threshold):
    return jnp.asarray(act) > threshold


def _counts(act, concept, threshold):
    a = _mask(act, threshold)
    c = jnp.asarray(concept) > 0.5
    inter = (a & c).sum(-1).astype(jnp.float32)
    return inter, a.sum(-1).astype(jnp.float32), c.sum(-1).astype(jnp.float32)


def _ratio(num, den):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


@jax.jit
def iou(act, concept, threshold=0.0):
    """``|A & C| / |A | C|`` with ``A = act > threshold`` and ``C = concept > 0.5``."""
    i, a, c = _counts(act, concept, threshold)
    return _ratio(i, a + c - i)


@jax.jit
def f1(act, concept, threshold=0.0):
    """``2 |A & C| / (|A| + |C|)``."""
    i, a, c = _counts(act, concept, threshold)
    return _ratio(2 * i, a + c)


@jax.jit
def recall(act, concept, threshold=0.0):
    """``|A & C| / |A|``: the fraction of the unit's active samples carrying the concept."""
    i, a, _ = _counts(act, concept, threshold)
    return _ratio(i, a)


@jax.jit
def precision(act, concept, threshold=0.0):
    """``|A & C| / |C|``: the fraction of the concept's samples where the unit is active."""
    i, _, c = _counts(act, concept, threshold)
    return _ratio(i, c)


@jax.jit
def auprc(act, concept, threshold=None):
    """Average precision of ``act`` ranking ``concept > 0.5`` (tied activations form one step)."""
    del threshold
    act = jnp.asarray(act, jnp.float32)
    y = (jnp.asarray(concept) > 0.5).astype(jnp.float32)

    def one(a, t):
        order = jnp.argsort(-a, stable=True)
        a, t = a[order], t[order]
        tp = jnp.cumsum(t)
        k = jnp.arange(1, a.shape[0] + 1, dtype=jnp.float32)
        end = jnp.concatenate([a[1:] != a[:-1], jnp.ones((1,), bool)])
        tp_end = jnp.where(end, tp, 0.0)
        prev = jnp.concatenate([jnp.zeros((1,)), jax.lax.cummax(tp_end)[:-1]])
        gain = jnp.where(end, tp - prev, 0.0)
        return _ratio((gain * tp / k).sum(), tp[-1])

    flat_a = act.reshape(-1, act.shape[-1])
    flat_y = jnp.broadcast_to(y, act.shape).reshape(flat_a.shape)
    return jax.vmap(one)(flat_a, flat_y).reshape(act.shape[:-1])


@jax.jit
def pearson(act, concept, threshold=None):
    """Pearson correlation (0 when either side is constant)."""
    del threshold
    a = jnp.asarray(act, jnp.float32)
    c = jnp.asarray(concept, jnp.float32)
    a = a - a.mean(-1, keepdims=True)
    c = c - c.mean(-1, keepdims=True)
    return _ratio((a * c).sum(-1), jnp.sqrt((a * a).sum(-1) * (c * c).sum(-1)))


@jax.jit
def cosine(act, concept, threshold=None):
    """Cosine similarity (0 when either side is all zero)."""
    del threshold
    a = jnp.asarray(act, jnp.float32)
    c = jnp.asarray(concept, jnp.float32)
    return _ratio((a * c).sum(-1), jnp.sqrt((a * a).sum(-1) * (c * c).sum(-1)))


METRICS = {"iou": iou, "f1": f1, "auprc": auprc, "pearson": pearson, "cosine": cosine,
           "recall": recall, "precision": precision}


def image_level(act, concept, num_images: int, reduce: str = "max"):
    """Pixel-level ``[..., P]`` -> image-level ``[..., N]``: the unit's max (or mean) per image, concept present."""
    act = jnp.asarray(act, jnp.float32)
    concept = jnp.asarray(concept, jnp.float32)
    if act.shape[-1] % num_images or concept.shape[-1] % num_images:
        raise ValueError(f"{act.shape[-1]} pixels are not a multiple of num_images={num_images}")
    a = act.reshape(act.shape[:-1] + (num_images, -1))
    a = a.max(-1) if reduce == "max" else a.mean(-1) if reduce == "mean" else None
    if a is None:
        raise ValueError(f"unknown reduce {reduce!r}; use 'max' or 'mean'")
    c = concept.reshape(concept.shape[:-1] + (num_images, -1)).max(-1)
    return a, c


def label_metrics(act, concept, num_images: int | None = None, threshold: float = 0.0,
                  metrics=("iou", "f1", "auprc", "pearson", "cosine")) -> dict:
    """Every metric at pixel level and (with ``num_images``) image level: ``{'pixel_iou': ..., 'image_iou': ...}``."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {sorted(METRICS)}")
    out = {f"pixel_{m}": np.asarray(METRICS[m](act, concept, threshold)) for m in metrics}
    if num_images is not None:
        a, c = image_level(act, concept, num_images)
        out.update({f"image_{m}": np.asarray(METRICS[m](a, c, threshold)) for m in metrics})
    return out


def _perturb(concept, rng, fraction, extra):
    c = np.asarray(concept, np.float32).copy()
    pos = np.nonzero(c > 0.5)[0]
    k = max(1, int(round(fraction * len(pos))))
    if extra:
        neg = np.nonzero(c <= 0.5)[0]
        c[rng.choice(neg, min(k, len(neg)), replace=False)] = 1.0
    else:
        c[rng.choice(pos, k, replace=False)] = 0.0
    return c


def _check(metric, act, concept, fraction, trials, seed, extra, threshold):
    rng = np.random.default_rng(seed)
    act = np.asarray(act, np.float32)
    concept = np.asarray(concept, np.float32)
    if act.ndim != 1 or act.shape != concept.shape:
        raise ValueError(f"sanity checks take one unit's activations and one concept of the same length, "
                         f"got {act.shape} and {concept.shape}")
    true = float(metric(act, concept, threshold))
    worse = [_perturb(concept, rng, fraction, extra) for _ in range(trials)]
    scores = np.asarray(metric(np.broadcast_to(act, (trials,) + act.shape), np.stack(worse), threshold))
    return bool((scores < true).all())


def missing_labels_check(metric, act, concept, *, fraction=0.5, trials=5, seed=0, threshold=0.0) -> bool:
    """True when removing ``fraction`` of the positive labels strictly lowers the score in every trial."""
    return _check(metric, act, concept, fraction, trials, seed, False, threshold)


def extra_labels_check(metric, act, concept, *, fraction=0.5, trials=5, seed=0, threshold=0.0) -> bool:
    """True when adding positives (``fraction`` of their number) strictly lowers the score in every trial."""
    return _check(metric, act, concept, fraction, trials, seed, True, threshold)


def sanity_report(metrics=None, *, samples=2000, density=0.1, seed=0) -> dict:
    """Both checks for each metric on a simulated unit equal to a concept (plus small positive noise).

    Returns ``{name: {'missing_labels': bool, 'extra_labels': bool, 'sound': bool}}``;
    ``sound`` is False for a metric that fails either check.
    """
    metrics = METRICS if metrics is None else metrics
    rng = np.random.default_rng(seed)
    concept = (rng.random(samples) < density).astype(np.float32)
    act = concept + 0.01 * rng.random(samples).astype(np.float32)
    out = {}
    for name, fn in metrics.items():
        miss = missing_labels_check(fn, act, concept, seed=seed, threshold=0.5)
        extra = extra_labels_check(fn, act, concept, seed=seed, threshold=0.5)
        out[name] = {"missing_labels": miss, "extra_labels": extra, "sound": miss and extra}
    return out
