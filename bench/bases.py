"""Benchmark: dissecting 4,096 SAE features against 512 neurons on the same data, and SAE training throughput.

    python -m bench.bases [--images=16] [--batch=8] [--train_batches=6] [--expansion=8] [--k=32] [--rounds=3] \
        [--results=bench/RESULTS.md]

The neurons are :mod:`bench.stats`' ``blobs`` data shaped like VGG16
``conv5_3`` (512 post-ReLU units, 14x14 -> 56x56, 1,801 labels in 6
segmentation channels). A TopK SAE (``expansion`` x 512 features, ``k``
active per position) is trained on them with
:func:`jaxdissect.bases.sae.train` (throughput in samples, i.e. positions,
per second: the second of two identical runs, so compilation is left out),
and its codes of the same images are dissected with
:func:`jaxdissect.dissect_activations` exactly as the neurons are: as
:class:`~jaxdissect.kernels.codes.SparseCodes` (what a dissection with an
SAE basis reads) and, for comparison, as the same codes' dense map. Each
dissection runs twice and the second is timed (compiled steps are cached).
Exactness: every neuron's and 256 features' levels are compared with
``numpy.quantile`` of :mod:`bench.stats`' NumPy upsample, and their active
pixel counts with NumPy's. Memory: the per-unit state of pass 1 and of pass
2 (rows only for units whose level lies inside a bucket) against the
former 65,536-bucket histograms (256 KiB and 512 KiB per unit). The load
average is printed; the figures go to the ``## Bases (bench/bases.py)``
section of the results file.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
from absl import app, flags

from bench.results import load_note, write_section
from bench.stats import NUM_LABELS, make_blobs, upsample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Bases (bench/bases.py)"
QUANTILE, SIZE = 0.01, 56
FLAGS = flags.FLAGS


def _dissect(acts, seg, batch):
    """``acts``: one array of every image, or a list of per-batch :class:`SparseCodes`."""
    from jaxdissect import dissect_activations

    def batches():
        if isinstance(acts, list):
            return ((a, seg[i * batch:(i + 1) * batch]) for i, a in enumerate(acts))
        return ((acts[i:i + batch], seg[i:i + batch]) for i in range(0, len(acts), batch))

    return dissect_activations(batches, NUM_LABELS, QUANTILE, SIZE, topk=10, num_batches=len(seg) // batch,
                               progress=False)


def _timed(fn, *args):
    fn(*args)                                               # compiles; the second run is the timed one
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _rounds(runs: dict, rounds: int) -> dict:
    """``{name: (result, median seconds)}`` of ``rounds`` rounds that run every ``runs[name]()`` in turn after
    one untimed run each (compiled steps cached), so a change in the machine's load hits all alike."""
    results = {name: fn() for name, fn in runs.items()}
    seconds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: (results[name], float(np.median(seconds[name]))) for name in runs}


def _exact(result, acts, units) -> bool:
    """Levels equal ``numpy.quantile`` of the NumPy upsample, and active counts NumPy's, for ``units``."""
    up = upsample(acts[..., units], SIZE).reshape(-1, len(units))
    levels = np.quantile(up, 1 - QUANTILE, axis=0).astype(np.float32)
    return (levels.view(np.uint32) == result.thresholds[units].view(np.uint32)).all() and (
        (up > levels).sum(0) == result.active[units]).all()


def _state_kib(acts, seg, batch) -> tuple[float, float]:
    """Pass-1 and pass-2 state per unit (KiB) of the sparse kernels on this data."""
    import jax

    from jaxdissect import statistics

    n, h, _, u = acts.shape
    plan = statistics.Plan(num_units=u, num_labels=NUM_LABELS, source_hw=(h, h), resolution=(SIZE, SIZE),
                           quantile=QUANTILE, topk=10)
    state = plan.pass1_init(n)
    for i in range(0, n, batch):
        state = statistics.pass1_update(plan, state, acts[i:i + batch], np.ones(batch, bool),
                                        np.arange(i, i + batch, dtype=np.int32), np.zeros(batch, np.int32))
    selection, _ = plan.pass1_finish(jax.tree.map(lambda x: np.asarray(x)[None], state))

    def kib(tree):
        return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)) / u / 1024

    return kib(state["quantile"]), kib(plan.pass2_init(selection))


def run(images: int, batch: int, train_batches: int, expansion: float, k: int, rounds: int = 3) -> dict:
    import jax

    from jaxdissect.bases import sae

    load0 = os.getloadavg()[0]
    parts = [make_blobs("conv5_3", i, batch) for i in range(images // batch)]
    neurons = np.concatenate([p[0] for p in parts])
    seg = np.concatenate([p[1] for p in parts])
    channels = neurons.shape[-1]

    settings = sae.Settings(expansion=expansion, k=k, num_batches=train_batches, minibatch=4096)

    train = [make_blobs("conv5_3", 1000 + i, batch)[0] for i in range(train_batches)]
    (basis, params, curve), train_s = _timed(lambda: sae.train(lambda s=0: iter(train[s:]), channels, settings,
                                                               progress=False))
    samples = train_batches * batch * neurons.shape[1] * neurons.shape[2]
    encode, listed = jax.jit(basis.encode), jax.jit(basis.codes)
    codes = np.concatenate([np.asarray(encode(params, neurons[i:i + batch])) for i in range(0, images, batch)])
    sparse = [jax.tree.map(np.asarray, listed(params, neurons[i:i + batch])) for i in range(0, images, batch)]

    timed = _rounds({"neurons": lambda: _dissect(neurons, seg, batch), "codes": lambda: _dissect(sparse, seg, batch),
                     "dense": lambda: _dissect(codes, seg, batch)}, rounds)
    (r_neurons, t_neurons), (r_codes, t_codes), (r_dense, t_dense) = timed["neurons"], timed["codes"], timed["dense"]
    sample = np.linspace(0, codes.shape[-1] - 1, 256).astype(int)
    out = {
        "images": images, "batch": batch, "rounds": rounds, "units": [channels, codes.shape[-1]], "k": k,
        "seconds": [t_neurons, t_codes], "ratio": t_codes / t_neurons, "dense_seconds": t_dense,
        "exact": [bool(_exact(r_neurons, neurons, np.arange(channels))), bool(_exact(r_codes, codes, sample))],
        "same_as_dense": all(np.asarray(getattr(r_dense, f)).tobytes() == np.asarray(getattr(r_codes, f)).tobytes()
                             for f in ("thresholds", "active", "intersection", "top_values", "top_index",
                                       "act_mean", "act_max")),
        "nonzero": [float((neurons > 0).mean()), float((codes > 0).mean())],
        "state_kib": [_state_kib(neurons, seg, batch), _state_kib(codes, seg, batch)],
        "train_samples_per_s": samples / train_s, "train_samples": samples,
        "fvu": [curve["fvu"][0], curve["fvu"][-1]], "dead": curve["dead"][-1],
        "load": (load0, os.getloadavg()[0]),
    }
    return out


def report(r: dict) -> str:
    (n_u, c_u), (t_n, t_c) = r["units"], r["seconds"]
    (p1n, p2n), (p1c, p2c) = r["state_kib"]
    lines = [
        SECTION, "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} CPUs; load average {r['load'][0]:.1f} before / {r['load'][1]:.1f} after "
        f"({load_note(*r['load'])}). {r['images']} images in batches of {r['batch']}, VGG16 `conv5_3` shape "
        f"(14x14 -> 56x56), {NUM_LABELS} labels, top {QUANTILE:g} quantile; the median of {r['rounds']} rounds that "
        "run each dissection in turn (after one untimed run each: compiled steps cached).", "",
        "| units | nonzero | dissection s | s per 1k units | pass-1 state KiB/unit | pass-2 state KiB/unit | exact |",
        "|---|---|---|---|---|---|---|",
        f"| {n_u} neurons | {r['nonzero'][0]:.1%} | {t_n:.2f} | {t_n / n_u * 1000:.2f} | {p1n:.1f} | {p2n:.1f} | "
        f"{'yes' if r['exact'][0] else 'NO'} |",
        f"| {c_u} SAE features (k={r['k']}), sparse codes | {r['nonzero'][1]:.2%} | {t_c:.2f} | "
        f"{t_c / c_u * 1000:.2f} | {p1c:.1f} | {p2c:.1f} | {'yes' if r['exact'][1] else 'NO'} (256 sampled) |",
        f"| {c_u} SAE features, the same codes as a dense map | | {r['dense_seconds']:.2f} | "
        f"{r['dense_seconds'] / c_u * 1000:.2f} | | | {'identical' if r['same_as_dense'] else 'DIFFERENT'} |",
        "| (former kernels, any data) | | | | 256 | 512 | |", "",
        f"{c_u} features / {n_u} neurons: {r['ratio']:.2f}x the time (goal: at most 3x; as a dense map "
        f"{r['dense_seconds'] / t_n:.2f}x). Exact: levels equal `numpy.quantile` of NumPy-upsampled values bit for "
        "bit, active counts equal NumPy's; every result array of the sparse codes equals the dense map's.", "",
        f"SAE training (TopK, {c_u} features, k={r['k']}, minibatch 4096): {r['train_samples_per_s']:,.0f} samples "
        f"(positions) per second over {r['train_samples']:,} samples; FVU {r['fvu'][0]:.3f} on the first batch, "
        f"{r['fvu'][1]:.3f} on the last; {r['dead']} dead features (a throughput run: a "
        "few batches, not a trained SAE).",
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    from jaxdissect.models import set_cpu_xla_flags

    set_cpu_xla_flags()
    if FLAGS.images % FLAGS.batch:
        raise app.UsageError("--images must be a multiple of --batch")
    r = run(FLAGS.images, FLAGS.batch, FLAGS.train_batches, FLAGS.expansion, FLAGS.k, FLAGS.rounds)
    body = report(r)
    print(body)
    if FLAGS.results:
        write_section(FLAGS.results, SECTION, body)


if __name__ == "__main__":
    flags.DEFINE_integer("images", 16, "Images dissected (a multiple of --batch).")
    flags.DEFINE_integer("batch", 8, "Images per batch.")
    flags.DEFINE_integer("train_batches", 6, "Batches of the SAE training run.")
    flags.DEFINE_float("expansion", 8.0, "SAE features per channel (8: 4,096 features on 512 channels).")
    flags.DEFINE_integer("k", 32, "Active SAE features per position.")
    flags.DEFINE_integer("rounds", 3, "Timed rounds (the median is reported).")
    flags.DEFINE_string("results", "", "Results file to update ('' = print only), e.g. bench/RESULTS.md.")
    app.run(main)
