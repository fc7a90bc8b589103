"""Adversarial attacks on any classifier, as jit-compiled JAX functions (PNAS 2020, Fig. 7).

``logits_fn(images) -> logits`` is any JAX function of NHWC images in the
model's ``[0, 1]`` pixel box (the model's own normalisation belongs inside
it). Every image carries its own state (its step, its Adam moments, its
binary-search constant), so the attacks batch, ``vmap``, ``jit`` and shard
over the batch axis; the loops are ``jax.lax`` loops and compile once per
shape. ``logits_fn`` is a static argument: pass the same function object to
reuse the compiled attack.

* :func:`pgd`: projected gradient descent, targeted or untargeted, L-inf or L2.
* :func:`carlini_wagner_l2`: the targeted Carlini-Wagner L2 attack as foolbox
  2.x ran it for the paper (tanh reparametrisation of the box, Adam, per-image
  binary search on the loss constant, best successful image kept).
* :func:`class_indices`: class names -> indices, unknown names listing close matches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from jaxdissect.interventions.common import InterventionError, lookup

__all__ = ["AttackError", "carlini_wagner_l2", "class_indices", "pgd"]


class AttackError(InterventionError):
    """Bad attack arguments: eps, step size, images outside the box, unknown or out-of-range classes."""


def class_indices(classes: Sequence[str], wanted) -> np.ndarray:
    """Class names (or indices) -> ``int32`` indices into ``classes``; unknown names list close matches."""
    if isinstance(wanted, (str, int, np.integer)):
        wanted = [wanted]
    out = []
    for w in wanted:
        if isinstance(w, (int, np.integer)):
            if not 0 <= int(w) < len(classes):
                raise AttackError(f"class index {int(w)} out of range; the model has classes 0..{len(classes) - 1}")
            out.append(int(w))
        else:
            out.append(lookup(classes, str(w), "class"))
    return np.asarray(out, np.int32)


# --------------------------------------------------------------------------
# Input checks (on concrete arrays only: traced calls are the caller's business)


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_images(images, what: str):
    if images.ndim != 4:
        raise AttackError(f"{what}: images must be NHWC [N, H, W, C], got shape {tuple(images.shape)}")
    if _concrete(images):
        lo, hi = float(jnp.min(images)), float(jnp.max(images))
        if lo < 0.0 or hi > 1.0:
            raise AttackError(
                f"{what}: images must lie in the pixel box [0, 1], found values in [{lo:.4g}, {hi:.4g}]; "
                "pass unnormalised pixels and put the model's normalisation inside logits_fn"
            )


def _check_classes(logits_fn, images, classes, name: str, what: str):
    if classes is None:
        return None
    classes = jnp.asarray(classes)
    if classes.shape != images.shape[:1] or not jnp.issubdtype(classes.dtype, jnp.integer):
        raise AttackError(
            f"{what}: {name} must be {images.shape[0]} integer class indices (one per image), "
            f"got {classes.dtype} of shape {tuple(classes.shape)}; class names go through class_indices()"
        )
    n_classes = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(images.shape, images.dtype)).shape[-1]
    if _concrete(classes):
        c = np.asarray(classes)
        bad = c[(c < 0) | (c >= n_classes)]
        if bad.size:
            raise AttackError(f"{what}: {name} {bad[:10].tolist()} out of range; the model has classes 0..{n_classes - 1}")
    return classes


def _per_image_norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


# --------------------------------------------------------------------------
# PGD


def _cross_entropy_sum(logits_fn, x, classes):
    logits = logits_fn(x).astype(jnp.float32)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, classes))


_CPU_UNROLL_MAX = 64


def _project(x, original, eps, norm):
    delta = x - original
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        n = _per_image_norm(delta)
        delta = delta * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
    return jnp.clip(original + delta, 0.0, 1.0)


def _as_partial(logits_fn):
    """``logits_fn`` as a pytree: parameters inside a ``Partial`` stay traced arguments of the jitted attack."""
    if not callable(logits_fn):
        raise AttackError(f"logits_fn must be a function images -> logits, got {type(logits_fn).__name__}")
    return logits_fn if isinstance(logits_fn, Partial) else Partial(logits_fn)


@partial(jax.jit, static_argnames=("steps", "norm", "targeted"))
def _pgd(logits_fn, images, classes, eps, step_size, start, *, steps, norm, targeted):
    grad_fn = jax.grad(lambda x: _cross_entropy_sum(logits_fn, x, classes))
    direction = -1.0 if targeted else 1.0

    def step(_, x):
        g = grad_fn(x)
        if norm == "linf":
            move = jnp.sign(g)
        else:
            move = g / jnp.maximum(_per_image_norm(g), 1e-12)
        return _project(x + direction * step_size * move, images, eps, norm)

    # XLA:CPU runs a while-loop body several times slower than the same ops outside a loop (measured on
    # VGG16: 3.5 vs 1.0 CPU-s per PGD step), so short attacks are unrolled there; GPUs keep the loop.
    unroll = steps <= _CPU_UNROLL_MAX and jax.default_backend() == "cpu"
    return jax.lax.fori_loop(0, steps, step, _project(start, images, eps, norm), unroll=bool(unroll) or None)


def pgd(
    logits_fn: Callable,
    images,
    targets,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = False,
    key=None,
    labels=None,
):
    """Projected gradient descent; returns the adversarial images (same shape and dtype as ``images``).

    Targeted (``targets``: one class index per image): each step lowers the
    cross-entropy of the target class. Untargeted (``targets=None``, true
    classes as ``labels``): each step raises the cross-entropy of the label.
    The move is ``step_size * sign(grad)`` (``norm="linf"``) or
    ``step_size * grad / ||grad||`` per image (``norm="l2"``); after it the
    image is projected onto the ``eps``-ball around the original, then onto
    ``[0, 1]``. ``random_start`` starts from a uniform point of the L-inf box
    (or a uniformly random direction at a uniform radius for L2), drawn with
    ``key``.
    """
    if norm not in ("linf", "l2"):
        raise AttackError(f"pgd: norm must be 'linf' or 'l2', got {norm!r}")
    logits_fn = _as_partial(logits_fn)
    images = jnp.asarray(images)
    _check_images(images, "pgd")
    if _concrete(eps, step_size):
        if not 0.0 < float(eps) <= (1.0 if norm == "linf" else float(np.sqrt(np.prod(images.shape[1:])))):
            raise AttackError(
                f"pgd: eps={float(eps)} out of range; eps is in [0, 1] pixel units and must be > 0 "
                + ("and <= 1 for the L-inf norm" if norm == "linf" else "and at most the box diagonal for L2")
            )
        if not float(step_size) > 0.0:
            raise AttackError(f"pgd: step_size={float(step_size)} must be > 0")
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise AttackError(f"pgd: steps must be a non-negative integer, got {steps!r}")
    if targets is None:
        if labels is None:
            raise AttackError("pgd: give targets (targeted attack) or labels= (untargeted attack on the true class)")
        classes, targeted = _check_classes(logits_fn, images, labels, "labels", "pgd"), False
    else:
        if labels is not None:
            raise AttackError("pgd: give either targets (targeted) or labels (untargeted), not both")
        classes, targeted = _check_classes(logits_fn, images, targets, "targets", "pgd"), True
    start = images
    if random_start:
        if key is None:
            raise AttackError("pgd: random_start=True needs key=jax.random.key(seed)")
        if norm == "linf":
            noise = jax.random.uniform(key, images.shape, images.dtype, -1.0, 1.0) * eps
        else:
            k1, k2 = jax.random.split(key)
            d = jax.random.normal(k1, images.shape, images.dtype)
            r = jax.random.uniform(k2, (images.shape[0],) + (1,) * (images.ndim - 1), images.dtype)
            noise = d / jnp.maximum(_per_image_norm(d), 1e-12) * r * eps
        start = images + noise
    out = _pgd(logits_fn, images, classes, jnp.asarray(eps, images.dtype),
               jnp.asarray(step_size, images.dtype), start, steps=int(steps), norm=norm, targeted=targeted)
    return out.astype(images.dtype)


# --------------------------------------------------------------------------
# Carlini-Wagner L2

_TANH_SHRINK = 0.999999  # foolbox 2.x: keeps arctanh of the box edges finite


def _best_other(logits, target):
    masked = jnp.where(jax.nn.one_hot(target, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return jnp.max(masked, axis=-1)


def _adam(learning_rate):
    return optax.adam(learning_rate)  # beta1 0.9, beta2 0.999, eps 1e-8 outside the root: foolbox's Adam


def _cw_step(logits_fn, w0, recon, targets, const, confidence, learning_rate, carry, *, check_every, abort_early):
    """One Adam step of every still-active image; inactive images keep their state (a no-op for them)."""
    it, pert, opt_state, found, prev_loss, active, best_x, best_dist = carry
    n = w0.shape[0]
    axes = tuple(range(1, w0.ndim))
    bcast = (n,) + (1,) * (w0.ndim - 1)

    def losses(pert):
        x = (jnp.tanh(w0 + pert) + 1.0) / 2.0
        logits = logits_fn(x).astype(jnp.float32)
        target_logit = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
        adv_loss = jnp.maximum(_best_other(logits, targets) - target_logit + confidence, 0.0)
        dist = jnp.sum(jnp.square(x - recon), axis=axes)
        total = dist + const * adv_loss
        return jnp.sum(total), (total, x, logits, dist)

    grad, (total, x, logits, dist) = jax.grad(losses, has_aux=True)(pert)
    is_adv = jnp.argmax(logits, axis=-1) == targets
    better = active & is_adv & (dist < best_dist)
    best_x = jnp.where(better.reshape(bcast), x, best_x)
    best_dist = jnp.where(better, dist, best_dist)
    found = found | (active & is_adv)
    updates, new_state = _adam(learning_rate).update(grad, opt_state, pert)
    pert = jnp.where(active.reshape(bcast), pert + updates, pert)
    opt_state = jax.tree.map(
        lambda new, old: jnp.where(active.reshape((n,) + (1,) * (new.ndim - 1)), new, old)
        if new.ndim and new.shape[0] == n else new,
        new_state, opt_state,
    )
    if abort_early:  # foolbox: every tenth of the steps, stop an image whose loss fell by less than 0.01%
        checkpoint = it % check_every == 0
        stalled = checkpoint & ~(total <= 0.9999 * prev_loss)
        active = active & ~stalled
        prev_loss = jnp.where(checkpoint, total, prev_loss)
    return it + 1, pert, opt_state, found, prev_loss, active, best_x, best_dist


def _cw_round_init(images, learning_rate, best_x, best_dist):
    """The state of one binary-search round: zero perturbation, fresh Adam moments, every image active."""
    n = images.shape[0]
    pert = jnp.zeros_like(images)
    return (jnp.int32(0), pert, _adam(learning_rate).init(pert), jnp.zeros((n,), bool),
            jnp.full((n,), jnp.inf, jnp.float32), jnp.ones((n,), bool), best_x, best_dist)


def _cw_bisect(found, const, lower, upper):
    """After a round: x10 until an adversarial is found, then bisect between the bounds."""
    upper = jnp.where(found, const, upper)
    lower = jnp.where(found, lower, const)
    return jnp.where(jnp.isinf(upper), const * 10.0, (lower + upper) / 2.0), lower, upper


def _cw_round_const(b, binary_search_steps, const, upper):
    if binary_search_steps >= 10:  # foolbox: the last step of a long search uses the upper bound
        const = jnp.where(b == binary_search_steps - 1, jnp.minimum(1e10, upper), const)
    return const


def _cw_box(images):
    w0 = jnp.arctanh((images * 2.0 - 1.0) * _TANH_SHRINK)  # box [0, 1] -> attack space
    return w0, (jnp.tanh(w0) + 1.0) / 2.0


# XLA:CPU runs a while-loop body several times slower than the same ops outside a loop (see _pgd), so on CPU
# the attack runs in jitted chunks of this many unrolled steps, driven from the host; other backends run a
# tenth of the steps per chunk in a rolled loop.
_CW_CPU_CHUNK = 10


@partial(jax.jit, static_argnames=("k", "check_every", "abort_early", "unroll"))
def _cw_chunk(logits_fn, w0, recon, targets, const, confidence, learning_rate, carry, *, k, check_every,
              abort_early, unroll):
    """``k`` CW steps of one binary-search round: a pure function of arrays, the unit the host driver repeats."""
    step = partial(_cw_step, logits_fn, w0, recon, targets, const, confidence, learning_rate,
                   check_every=check_every, abort_early=abort_early)
    return jax.lax.fori_loop(0, k, lambda _, c: step(c), carry, unroll=True if unroll else None)


@jax.jit
def _cw_start(images, learning_rate, best_x, best_dist):
    return _cw_box(images) + (_cw_round_init(images, learning_rate, best_x, best_dist),)


_cw_bisect_jit = jax.jit(_cw_bisect)


def _cw_host(logits_fn, images, targets, confidence, learning_rate, initial_const, *, binary_search_steps, steps,
             abort_early):
    """The host driver: jitted chunks, the abort-early test (one scalar to the host) between chunks."""
    n = images.shape[0]
    check_every = int(np.ceil(steps / 10))
    cpu = jax.default_backend() == "cpu"
    chunk = min(steps, _CW_CPU_CHUNK) if cpu else check_every
    const = jnp.full((n,), initial_const, jnp.float32)
    lower, upper = jnp.zeros((n,), jnp.float32), jnp.full((n,), jnp.inf, jnp.float32)
    best_x, best_dist = images, jnp.full((n,), jnp.inf, jnp.float32)
    for b in range(binary_search_steps):
        const = _cw_round_const(b, binary_search_steps, const, upper)
        w0, recon, carry = _cw_start(images, learning_rate, best_x, best_dist)
        done = 0
        while done < steps:
            k = min(chunk, steps - done)
            carry = _cw_chunk(logits_fn, w0, recon, targets, const, confidence, learning_rate, carry, k=k,
                              check_every=check_every, abort_early=abort_early, unroll=cpu)
            done += k
            # Steps after every image has stopped change nothing, so stopping here equals the per-step test.
            if abort_early and done < steps and not bool(jnp.any(carry[5])):
                break
        found, best_x, best_dist = carry[3], carry[6], carry[7]
        const, lower, upper = _cw_bisect_jit(found, const, lower, upper)
    return best_x, jnp.isfinite(best_dist)


@partial(jax.jit, static_argnames=("binary_search_steps", "steps", "abort_early"))
def _cw_traced(logits_fn, images, targets, confidence, learning_rate, initial_const, *, binary_search_steps, steps,
               abort_early):
    """The same attack as one ``lax`` program, for calls under the caller's ``jit``/``vmap`` (no host loop)."""
    n = images.shape[0]
    w0, recon = _cw_box(images)
    check_every = int(np.ceil(steps / 10))

    def search_step(b, carry):
        const, lower, upper, best_x, best_dist = carry
        const = _cw_round_const(b, binary_search_steps, const, upper)
        step = partial(_cw_step, logits_fn, w0, recon, targets, const, confidence, learning_rate,
                       check_every=check_every, abort_early=abort_early)
        state = jax.lax.while_loop(lambda c: (c[0] < steps) & jnp.any(c[5]), step,
                                   _cw_round_init(images, learning_rate, best_x, best_dist))
        found, best_x, best_dist = state[3], state[6], state[7]
        return _cw_bisect(found, const, lower, upper) + (best_x, best_dist)

    init = (jnp.full((n,), initial_const, jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.full((n,), jnp.inf, jnp.float32), images, jnp.full((n,), jnp.inf, jnp.float32))
    _, _, _, best_x, best_dist = jax.lax.fori_loop(0, binary_search_steps, search_step, init)
    return best_x, jnp.isfinite(best_dist)


def carlini_wagner_l2(
    logits_fn: Callable,
    images,
    targets,
    *,
    binary_search_steps: int = 5,
    steps: int = 1000,
    confidence: float = 0.0,
    learning_rate: float = 5e-3,
    initial_const: float = 1e-2,
    abort_early: bool = True,
):
    """Targeted Carlini-Wagner L2 attack; returns ``(adversarial, success)``.

    Per image, as foolbox 2.x: the image is optimised in ``w`` space, ``x =
    (tanh(w) + 1) / 2`` (so it never leaves the box), minimising ``||x -
    x0||^2 + c * max(max_{j != t} z_j - z_t + confidence, 0)`` with Adam for
    up to ``steps`` steps (``abort_early``: stop an image when its loss has
    not fallen by 0.01% over a tenth of the steps). ``c`` starts at
    ``initial_const`` and is searched per image over ``binary_search_steps``
    rounds: x10 until an adversarial is found, then bisected. The image kept
    is the closest one classified as the target seen at any step;
    ``success[i]`` is False (and ``adversarial[i]`` the original) when none was.
    """
    logits_fn = _as_partial(logits_fn)
    images = jnp.asarray(images)
    _check_images(images, "carlini_wagner_l2")
    if targets is None:
        raise AttackError("carlini_wagner_l2: targets are required (this is the targeted attack)")
    targets = _check_classes(logits_fn, images, targets, "targets", "carlini_wagner_l2")
    for name, v in (("binary_search_steps", binary_search_steps), ("steps", steps)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise AttackError(f"carlini_wagner_l2: {name} must be a positive integer, got {v!r}")
    if _concrete(learning_rate, initial_const, confidence):
        if not float(learning_rate) > 0 or not float(initial_const) > 0 or not float(confidence) >= 0:
            raise AttackError(
                "carlini_wagner_l2: learning_rate and initial_const must be > 0 and confidence >= 0, got "
                f"{float(learning_rate)}, {float(initial_const)}, {float(confidence)}"
            )
    # Concrete inputs: the host drives jitted chunks (fast on CPU, abort-early between chunks); under the
    # caller's jit/vmap the whole attack is one lax program with the same steps.
    attack = _cw_host if _concrete(images, targets, *jax.tree.leaves(logits_fn)) else _cw_traced
    adv, success = attack(logits_fn, images, targets, jnp.float32(confidence), jnp.float32(learning_rate),
                          jnp.float32(initial_const), binary_search_steps=int(binary_search_steps),
                          steps=int(steps), abort_early=bool(abort_early))
    return adv.astype(images.dtype), success
