"""The optimisation loop shared by inversion and adaptation: optax steps in jitted ``lax.scan`` chunks.

A loop of ``steps`` steps runs as ``ceil(steps / chunk)`` calls of one jitted
function that scans ``chunk`` steps (a last shorter chunk compiles once
more), so the progress bar (``jaxdissect.progress``) moves between chunks and
nothing returns to the host inside a chunk.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdissect.progress import progress as progress_bar


def adam(lr: float, milestones=(), gamma: float = 0.5) -> optax.GradientTransformation:
    """Adam with PyTorch's ``MultiStepLR`` stepped every iteration: ``lr * gamma ** #(milestones <= step)``."""
    if not milestones:
        return optax.adam(lr)
    return optax.adam(optax.piecewise_constant_schedule(lr, {int(m): gamma for m in milestones}))


@functools.lru_cache(maxsize=64)
def _chunk_fn(loss_fn: Callable, opt_config: tuple, size: int):
    """Jitted ``(params, opt_state, data) -> ((params, opt_state), per-item losses [size, N])``."""
    optimizer = adam(*opt_config)
    grad = jax.value_and_grad(loss_fn, has_aux=True)

    @jax.jit
    def chunk(params, state, data):
        def one(carry, _):
            p, s = carry
            (_, per_item), g = grad(p, data)
            updates, s = optimizer.update(g, s, p)
            return (optax.apply_updates(p, updates), s), per_item

        return jax.lax.scan(one, (params, state), None, length=size)

    return chunk


def run_steps(loss_fn: Callable, params, data, opt_config: tuple, steps: int, *, chunk: int = 100,
              desc: str = "optimise", show: bool | None = None):
    """Minimise ``loss_fn(params, data) -> (scalar, per_item [N])`` with :func:`adam` ``(*opt_config)``.

    ``loss_fn`` should be a long-lived function (not a new closure per call) so
    the compiled chunks are reused: one compile per (loss, optimiser, chunk
    size, shapes). Returns ``(params, losses [steps, N])``, each item's loss
    before each step.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    state = adam(*opt_config).init(params)
    losses = []
    chunk = max(1, min(int(chunk), steps or 1))
    bar = progress_bar(total=steps, desc=desc, unit="step", enabled=show)
    done = 0
    while done < steps:
        size = min(chunk, steps - done)
        (params, state), per = _chunk_fn(loss_fn, opt_config, size)(params, state, data)
        per = np.asarray(per)
        losses.append(per)
        done += size
        bar.update(size)
        bar.set_postfix(loss=f"{float(per[-1].mean()):.4f}")
    bar.close()
    out = np.concatenate(losses, axis=0) if losses else np.zeros((0, 0), np.float32)
    return params, out


def psnr(a, b, data_range: float = 2.0) -> np.ndarray:
    """Per-image PSNR in dB of images in [-1, 1] (``data_range`` 2, i.e. the usual PSNR of [0, 1] images)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(data_range ** 2 / np.maximum(mse, 1e-20))


def as_images(images, what: str = "images") -> jnp.ndarray:
    """Check NHWC RGB images in [-1, 1] (a little overshoot allowed) and return them as float32."""
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{what} must be NHWC RGB [N, H, W, 3] in [-1, 1], got shape {x.shape}")
    if not np.all(np.isfinite(x)) or x.min() < -1.5 or x.max() > 1.5:
        raise ValueError(f"{what} must lie in [-1, 1] (got {x.min():.3g}..{x.max():.3g}); map uint8 pixels "
                         "with p / 127.5 - 1")
    return jnp.asarray(x)
