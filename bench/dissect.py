"""Benchmark: the whole dissection pipeline against the sum of its parts, and many layers at once.

    python -m bench.dissect [--images=16] [--batch=8] [--layer_images=4] [--cache_images=8] \
        [--results=bench/RESULTS.md]

1. VGG16 (Places365 architecture, random weights) ``conv5_3`` over ``images``
   random 224x224 images, segmented by a random-weight UPP segmenter (setting
   ``netpq``; converted from the test helpers' PyTorch reference, so torch is
   needed; without it the images' own random labels are used and the
   segmenter part is 0). Measured in one run, all compiled beforehand:
   * the pipeline, ``jaxdissect.dissect`` end to end (three passes, unit
     strips, reports), warm (its jitted functions already compiled);
   * its parts, each alone: the model forward pass over the images (the
     pipeline runs it once per pass: three times, plus the top-5 images for
     the strips), the segmenter over the images (once), and the statistics
     alone (``jaxdissect.statistics.dissect_activations`` on the activations
     and segmentations held in memory).
2. All 13 VGG16 conv layers in one ``dissect`` call against 13 single-layer
   calls, over ``layer_images`` images with dataset labels (no reports), so
   the saving from sharing the forward passes shows.
3. The segmentation cache (``--cache_images``): a second dissection of
   another model (VGG16, other random weights) on the same images with the
   random-weight UPP segmenter, with a cache that a first dissection filled
   against the same dissection without it, side by side (both compiled
   beforehand); the difference is the segmenter time saved. Written to the
   ``## Segmentation cache (bench/dissect.py)`` section, with the load average.

Results go to the ``## Dissection pipeline (bench/dissect.py)`` section of the
results file.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from bench.results import load_note, write_section


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Dissection pipeline (bench/dissect.py)"
CACHE_SECTION = "## Segmentation cache (bench/dissect.py)"
CONV = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
        "conv4_3", "conv5_1", "conv5_2", "conv5_3")


class ArraySource:
    """Random smooth images held in memory (data-source contract), with random labels as ``seg``."""

    def __init__(self, n, size=224, num_labels=20, seed=0):
        rng = np.random.default_rng(seed)
        coarse = rng.integers(0, 256, (n, size // 16, size // 16, 3))
        self.display = coarse.repeat(16, 1).repeat(16, 2).astype(np.uint8)
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        self.image = ((self.display / 255.0 - mean) / std).astype(np.float32)
        self.seg = rng.integers(0, num_labels, (n, 2, size // 4, size // 4)).astype(np.int32)
        self.label_names = ["-"] + [f"l{i}" for i in range(1, num_labels)]
        self.label_categories = ["-"] + ["object"] * (num_labels - 1)
        self.categories = ["object"]
        self.name = "random"
        self.n = n

    def __len__(self):
        return self.n

    def fingerprint(self):
        return {"kind": "bench", "n": self.n}

    def get_batch(self, indices):
        idx = np.asarray(indices)
        return {"image": self.image[idx], "display": self.display[idx], "seg": self.seg[idx],
                "valid": np.ones(len(idx), bool)}


def random_vgg16(seed=0):
    import jax
    import jax.numpy as jnp

    from jaxdissect.models.vgg16 import VGG16

    module = VGG16()
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    rng = np.random.default_rng(seed)

    def init(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
        return (rng.standard_normal(s.shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
                if len(s.shape) > 1 else np.zeros(s.shape, np.float32))

    return module, jax.tree.map(init, shapes)


def random_segmenter(workdir):
    """A random-weight UPP segmenter (netpq) via the test helpers and the converter; None without torch."""
    try:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from torch_segmenter_reference import make_upp_checkpoint
    except ImportError as e:
        print(f"no segmenter ({e}); using the images' random labels", file=sys.stderr)
        return None
    from jaxdissect.convert import segmenter as seg_converter
    from jaxdissect.segmentation import load_segmenter

    out = os.path.join(workdir, "upp")
    if not os.path.exists(os.path.join(out, "model.json")):  # converted once per run, shared by the measurements
        paths = make_upp_checkpoint(os.path.join(workdir, "upp_pth"))
        seg_converter.convert(paths["encoder"], paths["decoder"], paths["labels"], out, kind="upp")
    return load_segmenter(out, None, setting="netpq")


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _block(tree):
    import jax

    return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def parts_vs_pipeline(n, batch, workdir):
    import jax.numpy as jnp

    from jaxdissect.pipelines.dissect import dissect, forward_fn, views_of
    from jaxdissect.segmentation import segment
    from jaxdissect.statistics import dissect_activations

    module, variables = random_vgg16()
    data = ArraySource(n)
    seg = random_segmenter(workdir)
    segmentation = seg if seg is not None else "dataset"
    kw = dict(quantile=0.01, topk=100, batch_size=batch, progress=False)
    # Cold run (compiles everything), then a warm run in a fresh directory.
    _, cold = _timed(lambda: dissect(module, variables, ["conv5_3"], data, segmentation,
                                     output_dir=os.path.join(workdir, "cold"), **kw))
    results, warm = _timed(lambda: dissect(module, variables, ["conv5_3"], data, segmentation,
                                           output_dir=os.path.join(workdir, "warm"), **kw))

    forward = forward_fn(module, views_of(["conv5_3"], None))
    batches = [data.get_batch(range(i, min(n, i + batch))) for i in range(0, n, batch)]
    _block(forward(variables, batches[0]["image"]))
    acts, t_forward = [], 0.0
    for b in batches:
        out, t = _timed(lambda x: _block(forward(variables, x)), b["image"])
        acts.append(np.asarray(out[1]["conv5_3"]))
        t_forward += t
    segs, t_segment = [], 0.0
    if seg is not None:
        _block(segment(*seg, jnp.asarray(batches[0]["display"], jnp.float32) / 127.5 - 1.0))
        for b in batches:
            zc = jnp.asarray(b["display"], jnp.float32) / 127.5 - 1.0
            labels, t = _timed(lambda x: _block(segment(*seg, x)[0]), zc)
            segs.append(np.asarray(labels))
            t_segment += t
        num_labels = len(seg[0].label_names)
    else:
        segs = [b["seg"] for b in batches]
        num_labels = len(data.label_names)
    stats_args = (lambda: zip(acts, segs), num_labels, 0.01, (56, 56))
    dissect_activations(*stats_args, topk=100)
    _, t_stats = _timed(lambda: dissect_activations(*stats_args, topk=100))
    top5 = len({int(i) for i in np.asarray(results["conv5_3"].top_index)[:, :5].ravel() if i >= 0})
    t_strip_forward = t_forward * top5 / n
    return {"images": n, "batch": batch, "segmenter": "UPP netpq (random weights)" if seg is not None
            else "dataset labels", "cold": cold, "warm": warm, "forward": t_forward, "segment": t_segment,
            "stats": t_stats, "top5_images": top5, "strip_forward": t_strip_forward,
            "parts": t_forward + t_segment + t_stats + t_strip_forward}


def layers_at_once(n, batch):
    from jaxdissect.pipelines.dissect import dissect

    module, variables = random_vgg16()
    data = ArraySource(n, seed=1)
    kw = dict(quantile=0.01, topk=10, batch_size=batch, progress=False)
    dissect(module, variables, list(CONV), data, "dataset", **kw)          # compile
    _, together = _timed(lambda: dissect(module, variables, list(CONV), data, "dataset", **kw))
    for layer in CONV:                                                     # compile
        dissect(module, variables, [layer], data, "dataset", **kw)
    separate = 0.0
    for layer in CONV:
        _, t = _timed(lambda: dissect(module, variables, [layer], data, "dataset", **kw))
        separate += t
    return {"images": n, "batch": batch, "together": together, "separate": separate}


def segmentation_cache_saving(n, batch, workdir):
    """Seconds of a second dissection of another model with and without the segmentation cache."""
    from jaxdissect.pipelines.dissect import dissect

    seg = random_segmenter(workdir)
    if seg is None:
        return None
    data = ArraySource(n, seed=2)
    first, second = random_vgg16(0), random_vgg16(1)
    cache = os.path.join(workdir, "segcache")
    kw = dict(quantile=0.01, topk=10, batch_size=batch, progress=False)
    load = [os.getloadavg()[0]]
    _, fill = _timed(lambda: dissect(*first, ["conv5_3"], data, seg, segmentation_cache=cache, **kw))
    dissect(*second, ["conv5_3"], data, seg, **kw)  # compile for the second model's variables
    times = {"without": [], "with": []}
    for _ in range(2):  # alternate, so a change in the machine's load hits both alike
        times["without"].append(_timed(lambda: dissect(*second, ["conv5_3"], data, seg, **kw))[1])
        times["with"].append(_timed(lambda: dissect(*second, ["conv5_3"], data, seg, segmentation_cache=cache,
                                                    **kw))[1])
    load.append(os.getloadavg()[0])
    return {"images": n, "batch": batch, "fill": fill, "without": min(times["without"]),
            "with": min(times["with"]), "load": load}


def _command() -> str:
    """The command line of this run, as the sections quote it."""
    return " ".join(["python -m bench.dissect"] + sys.argv[1:])


def cache_report(c) -> str:
    import jax

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        CACHE_SECTION, "",
        f"Measured {now} on {platform.machine()} with {os.cpu_count()} CPU cores, JAX {jax.__version__} "
        f"({jax.default_backend()}), in one run (`{_command()}`); load average {c['load'][0]:.1f} at the "
        f"start, {c['load'][1]:.1f} at the end ({load_note(*c['load'])}).", "",
        f"VGG16 `conv5_3`, {c['images']} images of 224x224, batch {c['batch']}, random-weight UPP segmenter "
        "(netpq). A first dissection (model A) fills the cache; then a second model B (other weights) is "
        "dissected without and with it, alternately twice, fastest of each:", "",
        "| what | seconds |",
        "|---|---|",
        f"| model A, filling the cache (includes compiling) | {c['fill']:.1f} |",
        f"| model B, no segmentation cache (segments every image) | {c['without']:.1f} |",
        f"| model B, labels read from the cache (segments none) | {c['with']:.1f} |",
        "",
        f"Segmenter time saved: {c['without'] - c['with']:.1f} s of {c['without']:.1f} s "
        f"({c['without'] / c['with']:.2f}x faster).", ""])


def report(a, b) -> str:
    import jax

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [SECTION, "",
             f"Measured {now} on {platform.machine()} with {os.cpu_count()} CPU cores, JAX {jax.__version__} "
             f"({jax.default_backend()}), in one run (`{_command()}`); load average "
             f"{os.getloadavg()[0]:.1f} (1-minute) at the end.", ""]
    if a:
        lines += [
            f"VGG16 `conv5_3`, {a['images']} images of 224x224, batch {a['batch']}, segmentation: {a['segmenter']}.",
            "",
            "| what | seconds |",
            "|---|---|",
            f"| pipeline, cold (compiling) | {a['cold']:.1f} |",
            f"| pipeline, warm (3 passes + strips + reports) | {a['warm']:.1f} |",
            f"| model forward over the images, once | {a['forward']:.1f} |",
            f"| segmenter over the images, once | {a['segment']:.1f} |",
            f"| statistics alone (`dissect_activations`, 3 passes, in memory) | {a['stats']:.1f} |",
            f"| forward of the {a['top5_images']} top-5 images (strips) | {a['strip_forward']:.1f} |",
            f"| sum of parts: forward once (activations kept between passes) + segmenter + statistics + strip forward | {a['parts']:.1f} |",
            "",
            f"Pipeline / sum of parts = {a['warm'] / a['parts']:.2f} (the rest is data handling, checkpoints, "
            "thumbnails and report files).", ""]
    if b:
        lines += [
            f"All 13 conv layers of VGG16, {b['images']} images, batch {b['batch']}, dataset labels, no reports: "
            f"one `dissect` call {b['together']:.1f} s, 13 single-layer calls {b['separate']:.1f} s "
            f"(ratio {b['separate'] / b['together']:.1f}x).", ""]
    return "\n".join(lines)


FLAGS = flags.FLAGS


def main(argv):
    del argv
    from jaxdissect.models import set_cpu_xla_flags

    set_cpu_xla_flags()  # as the launchers do, before JAX's first computation
    workdir = tempfile.mkdtemp(prefix="bench-dissect-")
    try:
        a = parts_vs_pipeline(FLAGS.images, FLAGS.batch, workdir) if FLAGS.images else None
        b = layers_at_once(FLAGS.layer_images, FLAGS.layer_images) if FLAGS.layer_images else None
        c = segmentation_cache_saving(FLAGS.cache_images, FLAGS.batch, workdir) if FLAGS.cache_images else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if a or b:
        body = report(a, b)
        print(body)
        if FLAGS.results:
            write_section(FLAGS.results, SECTION, body)
    if c:
        body = cache_report(c)
        print(body)
        if FLAGS.results:
            write_section(FLAGS.results, CACHE_SECTION, body)


def define_flags() -> None:
    flags.DEFINE_integer("images", 16, "Images for the pipeline-vs-parts measurement (0 = skip it).")
    flags.DEFINE_integer("batch", 8, "Images per batch.")
    flags.DEFINE_integer("layer_images", 4, "Images for the 13-layers-at-once measurement (0 = skip it).")
    flags.DEFINE_integer("cache_images", 8, "Images for the segmentation-cache measurement (0 = skip it).")
    flags.DEFINE_string("results", os.path.join(REPO, "bench", "RESULTS.md"), "Results file to update ('' = none).")


if __name__ == "__main__":
    define_flags()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)
