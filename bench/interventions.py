"""Benchmark: intervention costs: the classifier single-unit sweep against one clean pass; generator ablation throughput.

    python -m bench.interventions [--images=4] [--repeats=5] [--generic_units=16] [--set_masks=64] \\
        [--generator_samples=2] [--generator_sets=4]

VGG16 (365 classes, random He-normal weights) on ``--images`` random 224x224
inputs, float32, CPU. Measured side by side in one process, alternating, the
fastest of ``--repeats`` warm runs (interference from other
jobs only adds time), in CPU seconds of the process (all
threads), which other jobs on a shared machine disturb far less than wall time:

* clean pass: the jitted forward pass plus the per-class counts;
* fast sweep: all 512 single-unit ablations of ``conv5_3`` by the rank-49
  ``fc6`` update (the lower network once, then ``fc7``/``fc8`` on
  ``[512, B, 4096]``), including its own lower pass and the clean counts;
* generic sweep: cached ``conv5_3`` activations and ``run_from`` with vmapped
  ``Ablate`` for ``--generic_units`` units, scaled linearly to 512;
* ranking sets (spec 3.3 step 4: per class, the top-20 units ablated, and all
  but them): ``--set_masks`` random 20-unit sets and their complements through
  the fast mask path (``clean fc6 - mask @ D``) and ``--generic_units`` of them
  through the generic path, both scaled to the 730 sets of one ``n``.

Generator: ProGAN (the LSUN layout, random weights), ``--generator_sets``
single-unit ablations of ``layer4`` on ``--generator_samples`` z samples,
as :func:`jaxdissect.interventions.generator.ablation_segstats` runs them
(``layer1..layer4`` once, the rest per set through ``run_from``) against a
full forward pass per set; throughput in ablated images per CPU-second and
per wall-second (segmentation excluded: ``bench/segment.py`` measures it).

The goal (issue 6): the full 512-unit sweep costs at most 2x one clean pass.
Figures go to the ``## Interventions (bench/interventions.py)`` section of the
results file (replaced on each run, other sections left alone).
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.results import write_section
from jaxdissect import layers as layer_api
from jaxdissect.interventions import classifier as ci
from jaxdissect.models.proggan import ProgressiveGenerator
from jaxdissect.models.vgg16 import VGG16


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Interventions (bench/interventions.py)"


def random_vgg16(x):
    model = VGG16()
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = jax.tree.map(
        lambda a: (rng.standard_normal(size=a.shape, dtype=np.float32)
                   * np.float32(np.sqrt(2 / np.prod(a.shape[:-1])) if a.ndim > 1 else 0.05)), shapes)
    return model, jax.device_put(variables)


def run(images: int, repeats: int, generic_units: int, set_masks: int) -> dict:
    load = os.getloadavg()[0]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(images, 224, 224, 3)).astype(np.float32))
    model, variables = random_vgg16(x)
    labels = jnp.asarray(np.arange(images) % 365, jnp.int32)
    valid = jnp.ones(images, bool)
    ev = ci._Evaluator(model, variables, "conv5_3", x, "fast")

    @jax.jit
    def clean(v, x):
        return ci._device_counts(model.apply(v, x)[None], labels, valid, 365)

    all_units = np.arange(512, dtype=np.int32)
    chunk = ev.chunk_size(512, images, 4 * 4096 * 3)
    unit_batches = jnp.asarray(ci._pad_chunks(all_units, chunk)[0])
    masks = np.arange(512)[None, :] == all_units[:generic_units, None]
    unit_masks = jnp.asarray(ci._pad_chunks(masks, ev.chunk_size(generic_units, images, 2 * 4 * 14 * 14 * 512))[0])

    top20 = np.zeros((set_masks, 512), bool)
    rng = np.random.default_rng(2)
    for i in range(set_masks // 2):
        top20[i, rng.permutation(512)[:20]] = True
    top20[set_masks // 2:] = ~top20[: set_masks - set_masks // 2]
    fast_set_batches = jnp.asarray(ci._pad_chunks(top20, ev.chunk_size(set_masks, images, 3 * 4 * 4096))[0])
    generic_set_batches = jnp.asarray(
        ci._pad_chunks(top20[:generic_units], ev.chunk_size(generic_units, images, 2 * 4 * 14 * 14 * 512))[0])

    def fast_sets():
        acts, pred, correct = ev._lower(variables, x, labels, valid)
        return pred, ev._fast_masks(variables, acts["avgpool"], fast_set_batches, labels, valid)

    def generic_sets():
        acts, pred, correct = ev._lower(variables, x, labels, valid)
        return pred, ev._generic(variables, acts["conv5_3"], generic_set_batches, labels, valid)

    def fast_sweep():
        acts, pred, correct = ev._lower(variables, x, labels, valid)
        return pred, ev._fast(variables, acts["avgpool"], unit_batches, labels, valid)

    def generic_sweep():
        acts, pred, correct = ev._lower(variables, x, labels, valid)
        return pred, ev._generic(variables, acts["conv5_3"], unit_masks, labels, valid)

    def timed(fn):
        """CPU seconds of this process (all threads): robust to other jobs sharing the machine."""
        t = time.process_time()
        jax.block_until_ready(fn())
        return time.process_time() - t

    t0 = time.perf_counter()
    for fn in (lambda: clean(variables, x), fast_sweep, generic_sweep, fast_sets, generic_sets):
        timed(fn)  # compile + warm-up
    compile_s = time.perf_counter() - t0
    times = {"clean": [], "lower": [], "fast": [], "generic": [], "fast_sets": [], "generic_sets": []}
    for _ in range(repeats):
        times["clean"].append(timed(lambda: clean(variables, x)))
        times["lower"].append(timed(lambda: ev._lower(variables, x, labels, valid)))
        times["fast"].append(timed(fast_sweep))
        times["generic"].append(timed(generic_sweep))
        times["fast_sets"].append(timed(fast_sets))
        times["generic_sets"].append(timed(generic_sets))
    med = {k: min(v) for k, v in times.items()}
    # Same predictions from both paths on the units they share.
    _, (fast_pred, _) = fast_sweep()
    _, (gen_pred, _) = generic_sweep()
    agree = bool(np.array_equal(np.asarray(fast_pred)[:generic_units], np.asarray(gen_pred)[:generic_units]))
    generic_512 = med["lower"] + (med["generic"] - med["lower"]) * 512 / generic_units
    per_set_fast = (med["fast_sets"] - med["lower"]) / set_masks
    per_set_generic = (med["generic_sets"] - med["lower"]) / generic_units
    _, (fs_pred, _) = fast_sets()
    _, (gs_pred, _) = generic_sets()
    agree = agree and bool(np.array_equal(np.asarray(fs_pred)[:generic_units], np.asarray(gs_pred)[:generic_units]))
    return dict(images=images, repeats=repeats, load=load, compile_s=compile_s, generic_units=generic_units,
                clean_s=med["clean"], lower_s=med["lower"], fast_s=med["fast"], generic_s=med["generic"],
                generic_512_s=generic_512, agree=agree, set_masks=set_masks,
                sets_fast_730_s=med["lower"] + 730 * per_set_fast,
                sets_generic_730_s=med["lower"] + 730 * per_set_generic)


def run_generator(samples: int, sets: int, repeats: int) -> dict:
    z = jnp.asarray(np.random.RandomState(1).standard_normal((samples, 512)).astype(np.float32))
    model = ProgressiveGenerator()
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), z)
    variables = jax.device_put(jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), shapes))
    masks = jnp.asarray(np.eye(512, dtype=bool)[:sets])

    @jax.jit
    def cached(v, z, masks):
        _, acts = layer_api.capture(model, v, z, ["layer4"])
        a = acts["layer4"]
        return jax.lax.map(lambda m: layer_api.run_from(model, v, "layer4", jnp.where(m, 0.0, a), z), masks)

    @jax.jit
    def full(v, z, mask):
        return layer_api.run(model, v, z, edits={"layer4": layer_api.Ablate(mask)})

    def naive():
        return [full(variables, z, m) for m in masks]

    def timed(fn):
        t, w = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn())
        return time.process_time() - t, time.perf_counter() - w

    timed(lambda: cached(variables, z, masks))
    timed(naive)
    runs = {"cached": [], "naive": []}
    for _ in range(repeats):
        runs["cached"].append(timed(lambda: cached(variables, z, masks)))
        runs["naive"].append(timed(naive))
    best = {k: (min(c for c, _ in v), min(w for _, w in v)) for k, v in runs.items()}
    same = np.allclose(np.asarray(cached(variables, z, masks)), np.stack([np.asarray(a) for a in naive()]),
                       rtol=1e-4, atol=1e-4)
    return dict(samples=samples, sets=sets, repeats=repeats, best=best, same=bool(same))


def report_generator(g: dict) -> str:
    n = g["samples"] * g["sets"]
    rows = [f"| {name} | {n / cpu:.2f} | {n / wall:.2f} |" for name, (cpu, wall) in
            (("lower generator once, layer5..output per set (run_from, lax.map)", g["best"]["cached"]),
             ("full forward pass per set (naive)", g["best"]["naive"]))]
    return "\n".join([
        "",
        f"Generator ablation throughput: ProGAN 256x256 (LSUN widths, random weights), {g['sets']} single-unit "
        f"ablations of layer4 on {g['samples']} z samples ({n} ablated images per run), float32, fastest of "
        f"{g['repeats']} warm runs, segmentation excluded.",
        "",
        "| computation | ablated images per CPU-s | ablated images/s (wall) |",
        "|---|---|---|",
        *rows,
        "",
        f"Both give the same images: {'yes' if g['same'] else 'NO'}. At layer4 (8x8) the part below the edit "
        "is a small share of the generator's cost, so caching it saves little here; the saving grows for "
        "edits higher up.",
        "",
    ])


def report(r: dict) -> str:
    base = min(r["clean_s"], r["lower_s"])  # the cheaper clean pass: the conservative ratio
    ratio = r["fast_s"] / base
    return "\n".join([
        SECTION,
        "",
        f"Classifier single-unit ablation sweep, VGG16 conv5_3 (512 units), {r['images']} random 224x224 images, "
        f"365 classes, random He-normal weights, float32, fastest of {r['repeats']} warm runs, measured side by "
        f"side in one process ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}; load average {r['load']:.1f} at the start). Times are CPU seconds of the "
        "process, all threads.",
        "",
        "| computation | CPU seconds | x clean pass |",
        "|---|---|---|",
        f"| clean evaluation pass, plain jitted apply + per-class counts | {r['clean_s']:.2f} | "
        f"{r['clean_s'] / base:.2f} |",
        f"| clean evaluation pass as perclass_accuracy runs it (forward capturing conv5_3 + counts) | "
        f"{r['lower_s']:.2f} | {r['lower_s'] / base:.2f} |",
        f"| all 512 single-unit ablations, fast path (rank-49 fc6 update; includes its lower pass) | "
        f"{r['fast_s']:.2f} | {ratio:.2f} |",
        f"| all 512, generic path (cached conv5_3 + run_from + vmapped Ablate; {r['generic_units']} units "
        f"timed, scaled) | {r['generic_512_s']:.2f} | {r['generic_512_s'] / base:.2f} |",
        "| all 512, naive (a full forward pass per unit) | | 512 |",
        f"| 730 ranking sets of one n (365 x top-20 removed / kept), fast mask path ({r['set_masks']} timed, "
        "scaled with the once-per-batch contribution matrix counted per set: an upper bound) | "
        f"{r['sets_fast_730_s']:.2f} | {r['sets_fast_730_s'] / base:.2f} |",
        f"| 730 ranking sets, generic path ({r['generic_units']} timed, scaled) | {r['sets_generic_730_s']:.2f} | "
        f"{r['sets_generic_730_s'] / base:.2f} |",
        "",
        f"Goal: the 512-unit sweep costs at most 2x one clean pass: {'met' if ratio <= 2 else 'NOT met'} "
        f"({ratio:.2f}x). Fast and generic paths give identical predictions on the {r['generic_units']} shared "
        f"units and sets: {'yes' if r['agree'] else 'NO'}. Compile + first runs: {r['compile_s']:.1f} s. Ratios are "
        "against the cheaper of the two clean passes (same FLOPs; XLA compiles them differently, and "
        "which one is faster has changed with XLA's CPU flags).",
        "",
    ])


FLAGS = flags.FLAGS


def main(argv):
    del argv
    from jaxdissect.models import set_cpu_xla_flags

    set_cpu_xla_flags()
    r = run(FLAGS.images, FLAGS.repeats, FLAGS.generic_units, FLAGS.set_masks)
    g = run_generator(FLAGS.generator_samples, FLAGS.generator_sets, max(1, FLAGS.repeats // 2))
    body = report(r) + report_generator(g)
    print(body)
    if FLAGS.results:
        write_section(FLAGS.results, SECTION, body)


def define_flags() -> None:
    flags.DEFINE_integer("images", 4, "Images per pass (one batch).")
    flags.DEFINE_integer("repeats", 5, "Timed runs of each computation (after one warm-up).")
    flags.DEFINE_integer("generic_units", 16, "Units timed on the generic path (scaled to 512).")
    flags.DEFINE_integer("set_masks", 64, "Ranking-style unit sets timed on the fast mask path (scaled to 730).")
    flags.DEFINE_integer("generator_samples", 2, "z samples per generator ablation run.")
    flags.DEFINE_integer("generator_sets", 4, "Single-unit ablations of ProGAN layer4 per run.")
    flags.DEFINE_string("results", os.path.join(REPO, "bench", "RESULTS.md"), "Results file to update ('' = none).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
