"""TopK sparse autoencoders over a layer's channels (Gao et al. 2024), as a :class:`~jaxdissect.bases.Basis`.

At every position of the feature map, with ``a [C]`` the layer's channels::

    pre  = (a - b_dec) W_enc + b_enc              W_enc [C, U], b_enc [U]
    z    = TopK_k(ReLU(pre))                       the k largest, the rest 0
    a^   = z W_dec + b_dec                         W_dec [U, C], rows of unit norm

``encode`` is ``z`` (the units dissected), ``decode(z) = z W_dec`` (the
features' contribution; ``b_dec`` and the reconstruction error stay in the
layer when features are removed).

Training (:func:`train`) streams batches of activations (positions of the
feature maps are the samples) through one jitted step per batch shape: a
``lax.scan`` of Adam steps over shuffled minibatches of the batch, on the
normalised reconstruction error (fraction of variance unexplained, FVU) plus
the AuxK loss: the ``aux_k`` largest pre-activations of *dead* features
(none fired in the last ``dead_after`` samples) reconstruct the residual,
weighted ``aux_coef``. The decoder's gradient along its rows is removed and
its rows renormalised after each step; the encoder starts as the decoder's
transpose and ``b_dec`` at the mean of the first batch. The run is resumable
(:func:`jaxdissect.streaming.run_stream`): killed, the same call continues
from its last checkpoint to the same parameters; the training curve (loss,
FVU, dead features per batch) is part of the checkpointed state.
:func:`train_or_load` keeps the result in the per-user cache, keyed by the
model, layer and data the caller names and the settings.
:func:`activation_batches` streams a layer's activations from a model and a
data source.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.bases import Basis, BasisError

PARAMS = ("w_enc", "b_enc", "w_dec", "b_dec")


def topk_relu(pre, k: int):
    """``ReLU`` then keep the ``k`` largest of the last axis (the rest 0); ``pre [..., U]``."""
    shape = pre.shape
    flat = pre.reshape(-1, shape[-1])
    values, index = jax.lax.top_k(flat, k)
    rows = jnp.arange(flat.shape[0])[:, None]
    return jnp.zeros_like(flat).at[rows, index].set(jax.nn.relu(values)).reshape(shape)


@dataclasses.dataclass(frozen=True)
class TopKSAE(Basis):
    """A TopK sparse autoencoder; ``params`` holds ``w_enc [C, U]``, ``b_enc [U]``, ``w_dec [U, C]``, ``b_dec [C]``."""

    kind = "sae"
    k: int = 32
    label: str = "sae"

    def num_units(self, params, channels):
        return int(np.shape(params["w_dec"])[0])

    def check(self, params, channels):
        missing = [n for n in PARAMS if n not in params]
        if missing:
            raise BasisError(f"{self.label}: parameters {missing} are missing; an SAE needs {', '.join(PARAMS)}")
        u = int(np.shape(params["w_dec"])[0])
        want = {"w_enc": (channels, u), "b_enc": (u,), "w_dec": (u, channels), "b_dec": (channels,)}
        bad = [f"{n} {tuple(np.shape(params[n]))} (need {want[n]})" for n in PARAMS
               if tuple(np.shape(params[n])) != want[n]]
        if bad:
            raise BasisError(f"{self.label} cannot act on a layer with {channels} channels: " + ", ".join(bad))
        if not 1 <= self.k <= u:
            raise BasisError(f"{self.label}: k = {self.k} active features of {u}; give 1 <= k <= {u}")

    def pre_activations(self, params, acts):
        acts = jnp.asarray(acts, jnp.float32)
        return (acts - params["b_dec"]) @ jnp.asarray(params["w_enc"], jnp.float32) + params["b_enc"]

    def encode(self, params, acts):
        return topk_relu(self.pre_activations(params, acts), self.k)

    def codes(self, params, acts):
        """:meth:`encode` as :class:`~jaxdissect.kernels.codes.SparseCodes`: the ``k`` features kept at each
        position and their values (what the statistics read, without the dense ``[..., U]`` map)."""
        from jaxdissect.kernels.codes import SparseCodes

        pre = self.pre_activations(params, acts)
        values, index = jax.lax.top_k(pre, self.k)
        return SparseCodes(index.astype(jnp.int32), jax.nn.relu(values), pre.shape[-1])

    def decode(self, params, codes):
        return codes @ jnp.asarray(params["w_dec"], codes.dtype)

    def reconstruct(self, params, acts):
        """``a^ = decode(encode(a)) + b_dec``."""
        return self.decode(params, self.encode(params, acts)) + params["b_dec"]

    def describe(self):
        return self.label


@dataclasses.dataclass(frozen=True)
class Settings:
    """What determines a trained SAE besides its data (JSON-able; part of the cache key)."""

    expansion: float = 8.0
    k: int = 32
    num_batches: int = 200
    learning_rate: float = 1e-3
    minibatch: int = 4096
    aux_k: int | None = None            # default min(units // 2, 512)
    aux_coef: float = 1 / 32
    dead_after: int | None = None       # samples; default min(10M, a tenth of the training samples)
    seed: int = 0

    def __post_init__(self):  # one spelling per value, so equal settings give one cache key
        for name, kind in (("expansion", float), ("k", int), ("num_batches", int), ("learning_rate", float),
                           ("minibatch", int), ("aux_coef", float), ("seed", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    def units(self, channels: int) -> int:
        return max(1, int(round(self.expansion * channels)))


def geometric_median(x, iterations: int = 50) -> np.ndarray:
    """The point minimising the summed distances to the rows of ``x [n, C]`` (Weiszfeld's iteration, float64)."""
    x = np.asarray(x, np.float64)
    y = x.mean(0)
    for _ in range(iterations):
        w = 1.0 / np.maximum(np.linalg.norm(x - y, axis=1), 1e-12)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


def init_params(channels: int, units: int, first_batch, seed: int) -> dict:
    """Unit-norm random decoder rows, encoder = decoder transpose, ``b_enc = 0``, ``b_dec`` = the geometric
    median of (up to 4096 samples of) the first batch, as Gao et al. initialise ``b_pre``."""
    w = jax.random.normal(jax.random.PRNGKey(seed), (units, channels), jnp.float32)
    w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    x = np.asarray(first_batch, np.float32).reshape(-1, channels)
    x = x[np.linspace(0, len(x) - 1, min(len(x), 4096)).astype(int)]
    median = jnp.asarray(geometric_median(x), jnp.float32)
    return {"w_enc": w.T, "b_enc": jnp.zeros((units,), jnp.float32), "w_dec": w, "b_dec": median}


def _losses(params, x, dead, k, aux_k, aux_coef):
    """``(loss, (fvu, fired))`` of one minibatch ``x [m, C]``; ``dead [U]`` marks the features the AuxK loss uses."""
    pre = (x - params["b_dec"]) @ params["w_enc"] + params["b_enc"]
    codes = topk_relu(pre, k)
    recon = codes @ params["w_dec"] + params["b_dec"]
    err = x - recon
    variance = jnp.maximum(jnp.sum((x - x.mean(0)) ** 2), 1e-30)
    fvu = jnp.sum(err ** 2) / variance
    aux_codes = topk_relu(jnp.where(dead, pre, -jnp.inf), aux_k)
    residual = jax.lax.stop_gradient(err)
    aux = jnp.sum((residual - aux_codes @ params["w_dec"]) ** 2) / jnp.maximum(jnp.sum(residual ** 2), 1e-30)
    loss = fvu + jnp.where(dead.any(), aux_coef * aux, 0.0)
    return loss, (fvu, (codes > 0).any(0))


@functools.lru_cache(maxsize=16)
def _step(k: int, aux_k: int, aux_coef: float, minibatch: int, dead_after: int, learning_rate: float):
    """The jitted training step ``(state, batch) -> state`` for these settings (compiled once per batch shape)."""
    import optax

    tx = _optimizer(learning_rate)
    grad = jax.value_and_grad(_losses, has_aux=True)

    def step(state, batch):
        x = jnp.asarray(batch, jnp.float32).reshape(-1, state["params"]["b_dec"].shape[0])
        n = x.shape[0]
        m = min(minibatch, n)
        order = jax.random.permutation(jax.random.fold_in(state["key"], state["index"]), n)
        order = order[:(n // m) * m].reshape(n // m, m)

        def body(carry, idx):
            params, opt, since = carry
            (loss, (fvu, fired)), g = grad(params, x[idx], since >= dead_after, k, aux_k, aux_coef)
            w = params["w_dec"]
            g = {**g, "w_dec": g["w_dec"] - jnp.sum(g["w_dec"] * w, 1, keepdims=True) * w}   # keep rows unit norm
            updates, opt = tx.update(g, opt, params)
            params = optax.apply_updates(params, updates)
            params = {**params, "w_dec": params["w_dec"] / jnp.linalg.norm(params["w_dec"], axis=1, keepdims=True)}
            since = jnp.where(fired, 0, jnp.minimum(since + m, dead_after))
            return (params, opt, since), (loss, fvu)

        (params, opt, since), (loss, fvu) = jax.lax.scan(body, (state["params"], state["opt"], state["since"]), order)
        i = state["index"]
        curve = {"loss": state["curve"]["loss"].at[i].set(loss.mean()),
                 "fvu": state["curve"]["fvu"].at[i].set(fvu.mean()),
                 "dead": state["curve"]["dead"].at[i].set((since >= dead_after).sum(dtype=jnp.int32))}
        return {**state, "params": params, "opt": opt, "since": since, "index": i + 1, "curve": curve}

    return jax.jit(step, donate_argnums=0)


def _optimizer(learning_rate: float):
    import optax

    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


def train(batches: Callable[[int], Iterable], channels: int, settings: Settings = Settings(), *, workdir=None,
          checkpoint_every: int = 20, progress: bool | None = None, config: Mapping[str, Any] | None = None):
    """Train a TopK SAE on ``settings.num_batches`` batches; returns ``(TopKSAE, params, curve)``.

    ``batches(start)`` returns an iterator over the activation batches from
    batch ``start`` on, each ``[B, h, w, C]`` or ``[N, C]`` (the same data on
    every call: the step must be deterministic to resume). With ``workdir``
    the run checkpoints every ``checkpoint_every`` batches and resumes there
    (``config``, JSON-able, is what the caller adds to the stream's identity).
    ``curve`` holds per batch ``loss``, ``fvu`` and ``dead`` (features that
    fired in none of the last ``dead_after`` samples).
    """
    from jaxdissect import streaming

    s = settings
    units = s.units(channels)
    if not 1 <= s.k <= units:
        raise BasisError(f"sae: k = {s.k} active features of {units} ({s.expansion} x {channels} channels); "
                         f"give 1 <= k <= {units}")
    first = next(iter(batches(0)), None)
    if first is None:
        raise BasisError("sae: the activation stream yielded no batch; nothing to train on")
    first = np.asarray(first)
    if first.shape[-1] != channels:
        raise BasisError(f"sae: activations have {first.shape[-1]} channels, expected {channels}")
    samples = int(np.prod(first.shape[:-1]))
    aux_k = min(units // 2, 512) if s.aux_k is None else int(s.aux_k)
    dead_after = (min(10_000_000, max(1, samples * s.num_batches // 10)) if s.dead_after is None
                  else int(s.dead_after))
    params = init_params(channels, units, first, s.seed)
    state = {"params": params, "opt": _optimizer(s.learning_rate).init(params),
             "since": jnp.zeros((units,), jnp.int32), "key": jax.random.PRNGKey(s.seed + 1),
             "index": jnp.zeros((), jnp.int32),
             "curve": {"loss": jnp.zeros((s.num_batches,), jnp.float32),
                       "fvu": jnp.zeros((s.num_batches,), jnp.float32),
                       "dead": jnp.zeros((s.num_batches,), jnp.int32)}}
    step = _step(s.k, max(1, aux_k), float(s.aux_coef), int(s.minibatch), dead_after, float(s.learning_rate))
    desc = f"train sae:{s.expansion:g},k={s.k}"
    if workdir is not None:
        state = streaming.run_stream(step, state, batches, num_batches=s.num_batches, workdir=workdir,
                                     config={"sae": dataclasses.asdict(s), "channels": channels,
                                             **dict(config or {})},
                                     checkpoint_every=checkpoint_every, desc=desc, progress=progress)
    else:
        from jaxdissect.progress import progress as bar

        for b in bar(batches(0), total=s.num_batches, desc=desc, unit="batch", enabled=progress):
            state = step(state, b)
    done = int(state["index"])
    if done != s.num_batches:
        raise BasisError(f"sae: the activation stream ended after {done} of {s.num_batches} batches; give "
                         "num_batches the stream can feed")
    curve = {n: np.asarray(v).tolist() for n, v in state["curve"].items()}
    basis = TopKSAE(k=s.k, label=f"sae:{s.expansion:g},k={s.k}")
    return basis, jax.tree.map(np.asarray, state["params"]), dict(curve, dead_after=dead_after, aux_k=aux_k)


def train_or_load(cache_dir: str, identity: Mapping[str, Any], batches: Callable[[int], Iterable], channels: int,
                  settings: Settings = Settings(), *, progress: bool | None = None, log=None):
    """The SAE of ``identity`` (JSON-able: model, layer, data) and ``settings``: ``(TopKSAE, params, info)``.

    Trained once per user (:func:`jaxdissect.bases.cache.cached`), resumable
    after a kill; ``info`` has the settings, the identity, the training curve
    and ``path``. Two processes asking for the same SAE train it once.
    """
    from jaxdissect.bases import cache

    settings_json = dataclasses.asdict(settings)
    identity = dict(identity)

    def build(tmp, workdir):
        _, params, curve = train(batches, channels, settings, workdir=workdir, progress=progress,
                                 config={"identity": identity})
        cache.save(tmp, params, {"format": "jaxdissect-sae", "settings": settings_json, "identity": identity,
                                 "channels": channels, "units": settings.units(channels), "curve": curve,
                                 "final_fvu": curve["fvu"][-1], "dead": curve["dead"][-1]})

    path = cache.cached(cache_dir, "sae", identity, {**settings_json, "channels": channels}, build, log=log)
    return load(path)


def load(path: str):
    """``(TopKSAE, params, info)`` of an SAE folder written by :func:`train_or_load`."""
    from jaxdissect.bases import cache

    params, info = cache.load(path)
    s = info["settings"]
    return TopKSAE(k=int(s["k"]), label=f"sae:{s['expansion']:g},k={s['k']}"), params, dict(info, path=path)


def activation_batches(module, variables, layer: str, source, *, batch_size: int, num_batches: int,
                       input_key: str | None = None, seed: int = 0, memory_mb: float = 0):
    """``batches(start)`` over ``layer``'s activations on ``source`` (``get_batch(indices)``, ``len``).

    Batch ``i`` holds images ``i * batch_size ...`` of the epochs' orders
    concatenated (epoch ``e`` is ``numpy.random.RandomState(seed + e)``'s
    permutation), so the stream is the same on every call and from any
    start. ``input_key`` is the model input's key in a batch (default
    ``'image'``, else ``'z'``). The model runs jitted with its weights as an
    argument. With ``memory_mb``, when every image's activations fit in that
    many MiB they are computed once (on the first batch asked for, in order,
    ``batch_size`` at a time) and the batches gathered from them: the model
    then runs once per image, not once per image and epoch.
    """
    from jaxdissect.layers import capture

    n = len(source)
    if n < 1 or batch_size < 1:
        raise BasisError(f"activation_batches: need a non-empty source and batch_size >= 1 (got {n}, {batch_size})")
    forward = jax.jit(lambda v, x: capture(module, v, x, [layer])[1][layer])
    held: list = []

    def run(index):
        batch = source.get_batch(index)
        key = input_key or ("image" if "image" in batch else "z")
        return np.asarray(forward(variables, jnp.asarray(batch[key])), np.float32)

    def all_images():
        """Every image's activations, or None when they do not fit ``memory_mb``."""
        if not held and memory_mb > 0:
            first = run(np.arange(min(batch_size, n)))
            if first.nbytes / len(first) * n > memory_mb * 2**20:
                held.append(None)
            else:
                held.append(np.concatenate([first] + [run(np.arange(i, min(i + batch_size, n)))
                                                      for i in range(batch_size, n, batch_size)]))
        return held[0] if held else None

    def indices(i):
        pos = np.arange(i * batch_size, (i + 1) * batch_size)
        epochs = pos // n
        out = np.empty(batch_size, np.int64)
        for e in np.unique(epochs):
            at = epochs == e
            out[at] = np.random.RandomState(seed + int(e)).permutation(n)[pos[at] % n]
        return out

    def batches(start: int = 0):
        for i in range(start, num_batches):
            every = all_images()
            yield run(indices(i)) if every is None else every[indices(i)]

    return batches
