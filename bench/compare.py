"""Benchmark: K models dissected together (``launch.compare``'s one shared run) against K single runs.

    python -m bench.compare [--models=4] [--images=32] [--size=112] [--batch=16] [--powers=5] [--repeats=2]
                            [--seg_images=0] [--seg_size=64] [--seg_batch=4] [--seg_only]
                            [--activation_cache_mb=64] [--results=bench/RESULTS.md]

A Broden-format folder of ``images`` random images (``size`` pixels, label
maps at ``size / 2`` as broden1_224: colour, object, part and material PNGs,
scene and texture integers) is written to a temporary directory. ``models``
random-weight SmallCNNs (the demo's architecture, different seeds) are
dissected at ``conv4`` with the 2017 method:

* together: one ``jaxdissect.pipelines.compare.compare`` call (every image and
  label map decoded once per pass, all models in one jitted step);
* one by one: ``models`` calls of ``jaxdissect.dissect``.

Then ``powers`` rotation powers of one model's ``conv4`` in one call against
one call per power, and (``seg_images`` > 0, needs torch for the random
weights) the same K models with the PNAS method on random images segmented
by a random-weight UPP segmenter (setting ``netpq``), which the shared run
applies once per image instead of K times (``--seg_only``: only this one,
written to its own subsection). Every configuration is run once first to compile, then
timed warm ``repeats`` times, alternating with its counterpart (minimum
kept), without report files (the passes only). Results go to the
``## Comparisons (bench/compare.py)`` section of the results file.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from bench.results import write_section

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Comparisons (bench/compare.py)"
SEG_SECTION = "### K models with a segmenter (bench/compare.py --seg_images)"
CATS = ["color", "object", "part", "material", "scene", "texture"]


def write_broden(root, n, size, seed=0):
    """A Broden-format folder with random images and random label maps (for timing only)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"))
    labels = {"color": range(1, 12), "object": range(12, 40), "part": range(40, 50), "material": range(50, 56),
              "scene": range(56, 70), "texture": range(70, 80)}
    s = size // 2
    rows = []
    for i in range(n):
        coarse = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.uint8)
        Image.fromarray(coarse.repeat(8, 0).repeat(8, 1)).save(os.path.join(root, "images", f"{i}.jpg"))
        cells = {}
        for cat in ("color", "object", "part", "material"):
            lab = rng.choice(np.array([0] + list(labels[cat])), size=(s // 4, s // 4)).repeat(4, 0).repeat(4, 1)
            rgb = np.zeros((s, s, 3), np.uint8)
            rgb[..., 0] = lab % 256
            Image.fromarray(rgb).save(os.path.join(root, "images", f"{i}_{cat}.png"))
            cells[cat] = f"{i}_{cat}.png"
        cells["scene"] = str(rng.choice(list(labels["scene"])))
        cells["texture"] = str(rng.choice(list(labels["texture"]))) if i % 2 else ""
        rows.append(f"{i}.jpg,val,{size},{size},{s},{s}," + ",".join(cells[c] for c in CATS))
    with open(os.path.join(root, "index.csv"), "w") as f:
        f.write("image,split,ih,iw,sh,sw," + ",".join(CATS) + "\n" + "\n".join(rows) + "\n")
    with open(os.path.join(root, "category.csv"), "w") as f:
        f.write("name,first,last,count,frequency\n" + "".join(f"{c},0,0,0,0\n" for c in CATS))
    with open(os.path.join(root, "label.csv"), "w") as f:
        f.write("number,name,category,frequency,coverage,syns\n0,-,-,0,0,\n")
        f.writelines(f"{k},{c}{k},{c}(1),1,1.0,\n" for c in CATS for k in labels[c])
    for c in CATS:
        with open(os.path.join(root, f"c_{c}.csv"), "w") as f:
            f.write("code,number,name,frequency,coverage\n")
            f.writelines(f"{j + 1},{k},{c}{k},1,1.0\n" for j, k in enumerate(labels[c]))


def random_models(k):
    import jax
    import jax.numpy as jnp

    from jaxdissect.models.small_cnn import SmallCNN

    module = SmallCNN(widths=(32, 64, 64, 64))
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    out = []
    for seed in range(k):
        rng = np.random.default_rng(seed)
        out.append((module, jax.tree.map(
            lambda s: (rng.standard_normal(s.shape) * np.sqrt(2.0 / max(1, np.prod(s.shape[:-1]))))
            .astype(s.dtype), shapes)))
    return out


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _pair(out, name_a, fa, name_b, fb, repeats):
    """Compile both, then time them alternately ``repeats`` times; the minimum of each (busy machine)."""
    fa()
    fb()
    times = {name_a: [], name_b: []}
    for _ in range(repeats):
        times[name_a].append(_timed(fa))
        times[name_b].append(_timed(fb))
    for k, v in times.items():
        out[k] = min(v)
        out[k + "_all"] = v


def measure(k, n, size, batch, powers, repeats, workdir, cache_mb=64):
    from jaxdissect.data.broden import BrodenSource, imagenet_normalize
    from jaxdissect.pipelines.compare import Member, compare
    from jaxdissect.pipelines.dissect import dissect
    from jaxdissect.rotation import random_rotation_powers

    root = os.path.join(workdir, "broden")
    write_broden(root, n, size)
    data = BrodenSource(root, preprocess=imagenet_normalize)
    models = random_models(k)
    kw = dict(method="netdissect2017", batch_size=batch, topk=10, progress=False, activation_cache_mb=cache_mb)
    members = [Member(f"m{i}", mod, var, ["conv4"]) for i, (mod, var) in enumerate(models)]

    def together():
        compare(members, data, **kw)

    def one_by_one():
        for mod, var in models:
            dissect(mod, var, ["conv4"], data, "dataset", **kw)

    alphas = list(np.linspace(0, 1, powers))
    mats = random_rotation_powers(64, alphas, 1)
    mod, var = models[0]

    def powers_together():
        dissect(mod, var, [], data, "dataset", views={f"conv4@{a:g}": ("conv4", m) for a, m in zip(alphas, mats)},
                **kw)

    def powers_one_by_one():
        for m in mats:
            dissect(mod, var, [], data, "dataset", views={"conv4": ("conv4", m)}, **kw)

    out = {"models": k, "images": n, "size": size, "batch": batch, "powers": powers,
           "load_before": os.getloadavg()}
    _pair(out, "together", together, "one_by_one", one_by_one, repeats)
    _pair(out, "powers_together", powers_together, "powers_one_by_one", powers_one_by_one, repeats)
    out["load_after"] = os.getloadavg()
    return out


def measure_segmenter(k, n, size, batch, repeats, workdir, cache_mb=64):
    """K models against a segmenter: compare() vs K dissect() calls (PNAS method).

    Small on purpose (few small images, small batches, a small activation
    cache): UPP runs a ResNet-50 at 256 pixels whatever the image size.
    """
    from bench.dissect import ArraySource, random_segmenter
    from jaxdissect.pipelines.compare import Member, compare
    from jaxdissect.pipelines.dissect import dissect

    seg = random_segmenter(workdir)
    if seg is None:
        return None
    data = ArraySource(n, size=size)
    models = random_models(k)
    kw = dict(method="pnas", batch_size=batch, topk=10, progress=False, activation_cache_mb=cache_mb)
    members = [Member(f"m{i}", mod, var, ["conv4"]) for i, (mod, var) in enumerate(models)]
    out = {"models": k, "images": n, "size": size, "batch": batch, "cache_mb": cache_mb,
           "load_before": os.getloadavg()}
    _pair(out, "together", lambda: compare(members, data, seg, **kw),
          "one_by_one", lambda: [dissect(mod, var, ["conv4"], data, seg, **kw) for mod, var in models], repeats)
    out["load_after"] = os.getloadavg()
    return out


def report(r, s=None) -> str:
    import jax

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    k, p = r["models"], r["powers"]
    load = f"{r['load_before'][0]:.1f} before / {r['load_after'][0]:.1f} after"
    return "\n".join([
        SECTION, "",
        f"Measured {now} on {platform.machine()} with {os.cpu_count()} CPU cores, JAX {jax.__version__} "
        f"({jax.default_backend()}), in one run (`python -m bench.compare`); 1-minute load average {load} "
        "(the machine was shared with other jobs: absolute times are noisy, the ratios less so).", "",
        f"{r['images']} Broden-format images of {r['size']}x{r['size']} (label maps {r['size'] // 2}, four pixel "
        f"categories as PNGs, scene and texture as integers), batch {r['batch']}, 2017 method, warm (compiled), "
        f"passes only (no report files); each configuration timed {len(r['together_all'])} times alternately, "
        "the minimum shown.", "",
        "| what | one run | one by one | ratio |",
        "|---|---|---|---|",
        f"| {k} random SmallCNNs (32-64-64-64), `conv4` | {r['together']:.1f} s | {r['one_by_one']:.1f} s "
        f"| {r['one_by_one'] / r['together']:.2f}x |",
        f"| {p} rotation powers of one `conv4` (64 units) | {r['powers_together']:.1f} s "
        f"| {r['powers_one_by_one']:.1f} s | {r['powers_one_by_one'] / r['powers_together']:.2f}x |", "",
        f"{k} models in one run cost {r['together'] / r['one_by_one'] * k:.2f} single runs (goal: well under {k}; "
        f"{'reached' if r['together'] / r['one_by_one'] * k < 0.75 * k else 'not reached here'}). The shared run "
        "reads and decodes every image and label map once per pass for all models, but each model's forward "
        "passes and statistics are its own, and with Broden's stored label maps as the segmentation they are "
        "most of a single run's time on this CPU; rotation powers also share the forward pass. The saving "
        "grows with the data side's cost: a segmenter, applied once per image for all models (`--seg_images`), "
        "or slow storage.", ""] + ([segmenter_report(s)] if s else []))


def segmenter_report(s) -> str:
    import jax

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    k = s["models"]
    single = s["together"] / s["one_by_one"] * k
    return "\n".join([
        SEG_SECTION, "",
        f"Measured {now} on {platform.machine()} with {os.cpu_count()} CPU cores, JAX {jax.__version__} "
        f"({jax.default_backend()}); 1-minute load average {s['load_before'][0]:.1f} before / "
        f"{s['load_after'][0]:.1f} after (shared machine: absolute times are noisy).", "",
        f"{k} random SmallCNNs (`conv4`, PNAS method) on {s['images']} random {s['size']}x{s['size']} images "
        f"segmented by a random-weight UPP segmenter (setting netpq: ResNet-50 + UPerNet at 256 pixels), batch "
        f"{s['batch']}, activation cache {s['cache_mb']} MiB (the segmenter runs once per image per run); warm, "
        f"passes only, each timed {len(s['together_all'])} times alternately, the minimum shown.", "",
        "| what | one run (`compare`) | one by one (K `dissect`) | ratio |",
        "|---|---|---|---|",
        f"| {k} models + UPP | {s['together']:.1f} s | {s['one_by_one']:.1f} s "
        f"| {s['one_by_one'] / s['together']:.2f}x |", "",
        f"{k} models in one run cost {single:.2f} single runs (goal: well under {k}; "
        f"{'reached' if single < 0.75 * k else 'not reached here'}): the shared run segments every image once "
        f"for all models, the single runs segment it {k} times. All times: one run "
        f"{', '.join(f'{t:.1f}' for t in s['together_all'])} s, one by one "
        f"{', '.join(f'{t:.1f}' for t in s['one_by_one_all'])} s.", ""])


FLAGS = flags.FLAGS


def main(argv):
    del argv
    from jaxdissect.models import set_cpu_xla_flags

    set_cpu_xla_flags()
    logging.set_verbosity(logging.WARNING)  # the passes' orbax checkpoints log every save at INFO
    workdir = tempfile.mkdtemp(prefix="bench-compare-")
    try:
        if FLAGS.seg_only and not FLAGS.seg_images:
            raise app.UsageError("--seg_only needs --seg_images=N (N > 0)")
        r = None if FLAGS.seg_only else measure(FLAGS.models, FLAGS.images, FLAGS.size, FLAGS.batch, FLAGS.powers,
                                                FLAGS.repeats, workdir, FLAGS.activation_cache_mb)
        s = (measure_segmenter(FLAGS.models, FLAGS.seg_images, FLAGS.seg_size, FLAGS.seg_batch, FLAGS.repeats,
                               workdir, FLAGS.activation_cache_mb) if FLAGS.seg_images else None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if r is None and s is None:
        return  # no segmenter (torch missing): measure_segmenter said so
    body = report(r, s) if r is not None else segmenter_report(s)
    print(body)
    if FLAGS.results:
        write_section(FLAGS.results, SECTION if r is not None else SEG_SECTION, body)


def define_flags() -> None:
    flags.DEFINE_integer("models", 4, "Models compared in one run.")
    flags.DEFINE_integer("images", 32, "Broden-format images.")
    flags.DEFINE_integer("repeats", 2, "Timed repetitions of each configuration, alternating (minimum kept).")
    flags.DEFINE_integer("size", 112, "Image size (label maps are half).")
    flags.DEFINE_integer("batch", 16, "Images per batch.")
    flags.DEFINE_integer("powers", 5, "Rotation powers (0..1) of one layer.")
    flags.DEFINE_integer("seg_images", 0, "Images for the segmenter measurement (0 = skip it, the default).")
    flags.DEFINE_integer("seg_size", 64, "Image size for the segmenter measurement.")
    flags.DEFINE_integer("seg_batch", 4, "Images per batch for the segmenter measurement.")
    flags.DEFINE_bool("seg_only", False, "Only the segmenter measurement, written to its own subsection.")
    flags.DEFINE_integer("activation_cache_mb", 64, "Host memory for activations between passes in every run.")
    flags.DEFINE_string("results", os.path.join(REPO, "bench", "RESULTS.md"), "Results file to update ('' = none).")


if __name__ == "__main__":
    define_flags()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)
