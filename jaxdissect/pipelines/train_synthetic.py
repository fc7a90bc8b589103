"""Train (or load the cached) small classifier on the synthetic scenes.

This is the model dissected when no ``--model`` is given: it trains with
optax's Adam on two CPU cores in well under two minutes, and is cached as a
jaxdissect model directory keyed by its settings, so later runs load it.
Training runs through ``jaxdissect.streaming.run_stream`` (progress bar with
rate and ETA, checkpoints): interrupted, it resumes where it stopped. The saved
``model.json`` records the model's ``preprocessing`` and ``classes``, so
launchers read its images as it was trained. The
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
import time

import numpy as np

from jaxdissect.data.synthetic import VERSION as DATA_VERSION
from jaxdissect.data.synthetic import SyntheticScenes

TRAIN_SEED = 1000
TEST_SEED = 2000
MODEL_VERSION = 3


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


def _module(num_classes: int, widths, global_pool: str):
    from jaxdissect.models.small_cnn import SmallCNN

    return SmallCNN(num_classes=num_classes, widths=tuple(widths), global_pool=global_pool)


def _train_defaults() -> dict:
    return {k: p.default for k, p in inspect.signature(train).parameters.items()
            if k not in ("log", "workdir", "progress")}


def abstract_model(widths: tuple[int, ...] | None = None, global_pool: str | None = None,
                   image_size: int | None = None, **_):
    """``(module, variable shapes)`` of the model :func:`train` builds: layer names are known before training."""
    import jax
    import jax.numpy as jnp

    d = _train_defaults()
    module = _module(len(SyntheticScenes.class_names), widths or d["widths"], global_pool or d["global_pool"])
    size = image_size or d["image_size"]
    return module, jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))


def preprocessing(image_size: int | None = None, **_) -> dict:
    """The demo model's input pipeline, as recorded in its ``model.json``: bytes -> [-1, 1] (``zc``)."""
    size = int(image_size or _train_defaults()["image_size"])
    return {"normalization": "zc", "resize": size, "crop": size}


def train(num_train: int = 2048, num_test: int = 512, steps: int = 300, batch_size: int = 64,
          learning_rate: float = 3e-3, seed: int = 0, widths: tuple[int, ...] = (16, 32, 64, 64),
          global_pool: str = "max", image_size: int = 64, log=print, workdir: str | None = None,
          progress: bool | None = None):
    """Train a :class:`~jaxdissect.models.small_cnn.SmallCNN`; returns ``(module, variables, info)``.

    With ``workdir`` the optimisation is checkpointed there every 50 steps and
    resumes after an interruption (bit-identical to an uninterrupted run).
    """
    import jax
    import optax

    from jaxdissect import streaming

    start = time.time()
    train_x, train_y = _arrays(SyntheticScenes(num_train, seed=TRAIN_SEED + seed, size=image_size))
    test_x, test_y = _arrays(SyntheticScenes(num_test, seed=TEST_SEED + seed, size=image_size))
    module = _module(len(SyntheticScenes.class_names), widths, global_pool)
    params = init_params(module, train_x.shape[1:], seed)
    schedule = optax.cosine_decay_schedule(learning_rate, steps)
    tx = optax.adam(schedule)
    settings = dict(num_train=num_train, num_test=num_test, steps=steps, batch_size=batch_size,
                    learning_rate=learning_rate, seed=seed, widths=list(widths), global_pool=global_pool,
                    image_size=image_size)

    def loss_fn(p, x, y):
        logits = module.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def update(state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], x, y)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "loss": loss}

    # Every step's examples are fixed up front, so a resumed run sees the same batches.
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // num_train)
    order = np.concatenate([rng.permutation(num_train) for _ in range(epochs)])[:steps * batch_size]
    order = order.reshape(steps, batch_size)

    def batches(first):
        for i in range(first, steps):
            yield train_x[order[i]], train_y[order[i]]

    state = {"params": params, "opt": tx.init(params), "loss": np.float32(np.nan)}
    step = lambda st, b: update(st, *b)  # noqa: E731
    if workdir is not None:
        state = streaming.run_stream(step, state, batches, num_batches=steps, workdir=workdir,
                                     config={"train_synthetic": settings, "model_version": MODEL_VERSION,
                                             "data_version": DATA_VERSION},
                                     checkpoint_every=50, desc="train demo model", progress=progress)
    else:
        from jaxdissect.progress import progress as bar

        for b in bar(batches(0), total=steps, desc="train demo model", unit="step", enabled=progress):
            state = step(state, b)
    loss = float(state["loss"])
    if log:
        log(f"train_synthetic: {steps} steps, final loss {loss:.4f}")
    if not np.isfinite(loss):
        raise FloatingPointError(f"training diverged (loss {loss}); lower learning_rate (now {learning_rate})")
    predict = jax.jit(module.apply)
    variables = {"params": jax.tree.map(np.asarray, state["params"])}
    info = dict(
        model="demo",
        train_accuracy=_accuracy(predict, variables, train_x, train_y),
        test_accuracy=_accuracy(predict, variables, test_x, test_y),
        final_loss=loss,
        seconds=round(time.time() - start, 2),
        settings=settings,
        train_seed=TRAIN_SEED + seed, test_seed=TEST_SEED + seed,
        class_names=list(SyntheticScenes.class_names),
        classes=list(SyntheticScenes.class_names),
        chance=1.0 / len(SyntheticScenes.class_names),
        preprocessing=preprocessing(image_size),
        input={"layout": "NHWC", "shape": [None, image_size, image_size, 3], "dtype": "float32"},
    )
    return module, variables, info


def model_path(cache_dir: str, num_train: int = 2048, steps: int = 300, seed: int = 0, **kwargs) -> str:
    """The cache directory ``cache_dir/small_cnn-<hash of settings>`` of :func:`train_or_load`'s model."""
    defaults = _train_defaults()
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"train_or_load got unknown settings {unknown}; known: {sorted(defaults)}")
    settings = dict(defaults, num_train=num_train, steps=steps, seed=seed, **kwargs)
    settings["widths"] = list(settings["widths"])
    return os.path.join(cache_dir, f"small_cnn-{settings_key(settings)}")


def train_or_load(cache_dir: str, num_train: int = 2048, steps: int = 300, seed: int = 0, log=print,
                  progress: bool | None = None, **kwargs):
    """The synthetic default model: ``(module, variables, info)``, trained once per settings.

    The model directory :func:`model_path` is built once across processes
    (``jaxdissect.fileio.build_once``): a second process started meanwhile
    waits for the first (saying so, up to ``$JAXDISSECT_LOCK_TIMEOUT``) and
    loads what it made. A later call with the same settings loads it;
    ``info['cached']`` says which happened. Extra keyword arguments go to
    :func:`train` and are part of the key. Training checkpoints to
    ``cache_dir/.small_cnn-<hash>.train`` and resumes from there.
    """
    from jaxdissect import fileio
    from jaxdissect.checkpoint import load_metadata, load_model, save_model

    path = model_path(cache_dir, num_train=num_train, steps=steps, seed=seed, **kwargs)
    settings = dict(_train_defaults(), num_train=num_train, steps=steps, seed=seed, **kwargs)
    settings["widths"] = list(settings["widths"])
    trained = {}

    def build(tmp: str) -> None:
        workdir = os.path.join(cache_dir, f".{os.path.basename(path)}.train")
        module, variables, info = train(**settings, log=log, workdir=workdir, progress=progress)
        save_model(tmp, module, variables, metadata=info)
        shutil.rmtree(workdir, ignore_errors=True)
        trained.update(module=module, variables=variables, info=info)

    if not os.path.exists(path):
        fileio.build_once(path, build, what=f"the demo model {path} (trained once, in about two minutes)",
                          log=log or (lambda message: None))
    if trained:
        info = trained["info"]
        if log:
            log(f"train_synthetic: train accuracy {info['train_accuracy']:.3f}, test accuracy "
                f"{info['test_accuracy']:.3f} in {info['seconds']} s; saved {path}")
        return trained["module"], trained["variables"], dict(info, cached=False, path=path)
    if not os.path.exists(os.path.join(path, "model.json")):
        raise fileio.FileIOError(f"{path} exists but holds no model.json (not a finished model); remove it and "
                                 "run again")
    module, variables = load_model(path)
    info = dict(load_metadata(path), cached=True, path=path)
    if log:
        log(f"train_synthetic: loaded {path} (test accuracy {info['test_accuracy']:.3f})")
    return module, variables, info
