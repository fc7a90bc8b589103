"""Train (or load the cached) small classifier on the synthetic scenes.

This is the model dissected when no ``--model`` is given: it trains with
optax's Adam on two CPU cores in well under two minutes, and is cached as a
jaxdissect model directory keyed by its settings, so later runs load it. The
scene classes depend only on which objects are present, so its upper layers
grow object detectors, which dissection against the synthetic labels finds.

Training and test images use seeds ``TRAIN_SEED + seed`` and ``TEST_SEED +
seed``, disjoint from the dissection default (``SyntheticScenes(n, seed=0)``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time

import numpy as np

from jaxdissect.data.synthetic import VERSION as DATA_VERSION
from jaxdissect.data.synthetic import SyntheticScenes

TRAIN_SEED = 1000
TEST_SEED = 2000
MODEL_VERSION = 2


def settings_key(settings: dict) -> str:
    """Short hash naming the cache directory of a training configuration."""
    text = json.dumps(dict(settings, data_version=DATA_VERSION, model_version=MODEL_VERSION), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _arrays(source: SyntheticScenes, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for start in range(0, len(source), chunk):
        batch = source.get_batch(range(start, min(start + chunk, len(source))))
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images), np.concatenate(labels)


def _accuracy(predict, variables, images, labels, chunk: int = 512) -> float:
    correct = 0
    for start in range(0, len(images), chunk):
        logits = np.asarray(predict(variables, images[start:start + chunk]))
        correct += int((logits.argmax(-1) == labels[start:start + chunk]).sum())
    return correct / max(len(images), 1)


def init_params(module, image_shape, seed: int) -> dict:
    """LeCun-normal kernels and zero biases drawn with NumPy for ``module``'s parameter shapes.

    Same distribution as Flax's defaults (without truncation), but XLA compiles
    its random-number kernels slowly on CPU, which would dominate short runs.
    """
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(image_shape), jnp.float32))
    rng = np.random.default_rng([seed, 7])

    def draw(path, leaf):
        if path[-1].key == "bias":
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return rng.normal(0.0, 1.0 / np.sqrt(fan_in), leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def train(num_train: int = 2048, num_test: int = 512, steps: int = 300, batch_size: int = 64,
          learning_rate: float = 3e-3, seed: int = 0, widths: tuple[int, ...] = (16, 32, 64, 64),
          global_pool: str = "max", image_size: int = 64, log=print):
    """Train a :class:`~jaxdissect.models.small_cnn.SmallCNN`; returns ``(module, variables, info)``."""
    import jax
    import optax

    from jaxdissect.models.small_cnn import SmallCNN

    start = time.time()
    train_x, train_y = _arrays(SyntheticScenes(num_train, seed=TRAIN_SEED + seed, size=image_size))
    test_x, test_y = _arrays(SyntheticScenes(num_test, seed=TEST_SEED + seed, size=image_size))
    module = SmallCNN(num_classes=len(SyntheticScenes.class_names), widths=tuple(widths), global_pool=global_pool)
    params = init_params(module, train_x.shape[1:], seed)
    schedule = optax.cosine_decay_schedule(learning_rate, steps)
    tx = optax.adam(schedule)
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        logits = module.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    predict = jax.jit(module.apply)
    rng = np.random.default_rng(seed)
    order = np.zeros((0,), np.int64)
    loss = float("nan")
    for i in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(num_train)])
        idx, order = order[:batch_size], order[batch_size:]
        params, opt_state, loss = step(params, opt_state, train_x[idx], train_y[idx])
        if log and (i + 1) % max(steps // 4, 1) == 0:
            log(f"train_synthetic: step {i + 1}/{steps} loss {float(loss):.4f}")
    loss = float(loss)
    if not np.isfinite(loss):
        raise FloatingPointError(f"training diverged (loss {loss}); lower learning_rate (now {learning_rate})")
    variables = {"params": jax.tree.map(np.asarray, params)}
    info = dict(
        train_accuracy=_accuracy(predict, variables, train_x, train_y),
        test_accuracy=_accuracy(predict, variables, test_x, test_y),
        final_loss=loss,
        seconds=round(time.time() - start, 2),
        settings=dict(num_train=num_train, num_test=num_test, steps=steps, batch_size=batch_size,
                      learning_rate=learning_rate, seed=seed, widths=list(widths), global_pool=global_pool,
                      image_size=image_size),
        train_seed=TRAIN_SEED + seed, test_seed=TEST_SEED + seed,
        class_names=list(SyntheticScenes.class_names),
        chance=1.0 / len(SyntheticScenes.class_names),
        preprocess="synthetic: bytes / 127.5 - 1",
    )
    return module, variables, info


def train_or_load(cache_dir: str, num_train: int = 2048, steps: int = 300, seed: int = 0, log=print, **kwargs):
    """The synthetic default model: ``(module, variables, info)``, trained once per settings.

    The model directory ``cache_dir/small_cnn-<hash of settings>`` is written
    atomically (a finished directory is complete), and a later call with the
    same settings loads it; ``info['cached']`` says which happened. Extra
    keyword arguments go to :func:`train` and are part of the key.
    """
    from jaxdissect.checkpoint import load_metadata, load_model, save_model

    defaults = {k: p.default for k, p in inspect.signature(train).parameters.items() if k != "log"}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"train_or_load got unknown settings {unknown}; known: {sorted(defaults)}")
    settings = dict(defaults, num_train=num_train, steps=steps, seed=seed, **kwargs)
    settings["widths"] = list(settings["widths"])
    path = os.path.join(cache_dir, f"small_cnn-{settings_key(settings)}")
    if os.path.exists(os.path.join(path, "model.json")):
        module, variables = load_model(path)
        info = dict(load_metadata(path), cached=True, path=path)
        if log:
            log(f"train_synthetic: loaded {path} (test accuracy {info['test_accuracy']:.3f})")
        return module, variables, info
    if os.path.exists(path):
        raise RuntimeError(f"{path} exists but holds no model.json (not a finished model); remove it and run again")
    module, variables, info = train(**settings, log=log)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".small_cnn-", dir=cache_dir)
    try:
        save_model(os.path.join(tmp, "model"), module, variables, metadata=info)
        if os.path.exists(os.path.join(path, "model.json")):  # another process finished it first
            shutil.rmtree(tmp)
        else:
            os.replace(os.path.join(tmp, "model"), path)
            os.rmdir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"train_synthetic: train accuracy {info['train_accuracy']:.3f}, test accuracy "
            f"{info['test_accuracy']:.3f} in {info['seconds']} s; saved {path}")
    return module, variables, dict(info, cached=False, path=path)
