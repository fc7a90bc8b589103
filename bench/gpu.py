"""Accelerator figures in one script: every GPU/TPU number the README and bench/RESULTS.md promise.

    python -m bench.gpu [--sections=dissect_vgg16,progan_layer4,classifier_sweep,ganpaint_edit,photo_editing,attacks] \
        [--dtypes=float32,bfloat16] [--results=bench/RESULTS.md]
    python -m bench.gpu --smoke --results=      # tiny sizes, any backend (what the tests run)

Sections live in ``SECTIONS`` (name -> function); another benchmark adds its
own with the ``@section("name")`` decorator. A section gets a
:class:`Context` (sizes, dtype, a scratch directory, ``ctx.timed``) and
returns rows ``{"what", "value", "unit", "goal"}``; a section that fails
records its one-line error instead of stopping the others. Full sizes
(meant to fit in 8 minutes on one H200): VGG16 ``conv5_3`` dissection of
36,500 synthetic 224x224 images with a random-weight unified-parsing
segmenter (goal under 60 s), ProGAN ``layer4`` dissection of 10,000
samples (goal under 30 s), the 512-unit single-unit ablation sweep of VGG16
``conv5_3``; each in float32 and bfloat16; and, registered from the other
benchmarks (float32 only), GANPaint edit latency through the app's API
(bench/app.py), photo-editing inversion/adaptation step times
(bench/editing.py) and PGD/CW attack throughput on VGG16 (bench/attacks.py). Times are warm (a small run
compiles first). ``--smoke`` runs the same code at tiny sizes with dataset
labels instead of the segmenter, on any backend; its figures mean nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
import traceback
from typing import Callable

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Accelerator figures (bench/gpu.py)"
SECTIONS: dict[str, Callable] = {}


def section(name: str):
    """Register ``fn(ctx) -> rows`` as a section of this script."""
    def register(fn):
        SECTIONS[name] = fn
        return fn
    return register


@dataclasses.dataclass
class Context:
    smoke: bool
    dtype: str
    workdir: str

    def n(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full

    def jnp_dtype(self):
        import jax.numpy as jnp

        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[self.dtype]

    @staticmethod
    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start


def _vgg(ctx, size):
    import jax
    import jax.numpy as jnp

    from bench.dissect import random_vgg16

    module, variables = random_vgg16()
    module = module.clone(dtype=ctx.jnp_dtype())
    return module, jax.tree.map(jnp.asarray, variables), size


@section("dissect_vgg16")
def dissect_vgg16(ctx: Context) -> list[dict]:
    """VGG16 conv5_3 dissection at Places365 scale (synthetic images, random UPP segmenter)."""
    from bench.dissect import ArraySource, random_segmenter
    from jaxdissect.pipelines.dissect import dissect

    size = ctx.n(224, 64)
    n = ctx.n(36500, 8)
    module, variables, _ = _vgg(ctx, size)
    segmentation = "dataset" if ctx.smoke else (random_segmenter(ctx.workdir) or "dataset")
    kw = dict(quantile=0.01, topk=100, batch_size=ctx.n(256, 4), progress=False)
    dissect(module, variables, ["conv5_3"], ArraySource(ctx.n(512, 4), size), segmentation, **kw)  # compile
    _, seconds = ctx.timed(lambda: dissect(module, variables, ["conv5_3"], ArraySource(n, size), segmentation,
                                           **kw))
    seg = "UPP segmenter" if segmentation != "dataset" else "dataset labels"
    return [{"what": f"VGG16 conv5_3 dissection, {n} images {size}x{size}, {seg}", "value": n / seconds,
             "unit": "images/s", "goal": f"{n} images in 60 s" if not ctx.smoke else ""},
            {"what": "  same, total time", "value": seconds, "unit": "s", "goal": ""}]


class _LabelledLatents:
    """Smoke mode: z samples with random label maps, so no segmenter is needed."""

    label_names = ["-", "a", "b"]
    label_categories = ["-", "object", "object"]
    categories = ["object"]

    def __init__(self, n, depth, size):
        from jaxdissect.data.folders import LatentSource

        self.z, self.size, self.name = LatentSource(n, depth=depth), size, "smoke latents"

    def __len__(self):
        return len(self.z)

    def fingerprint(self):
        return {"smoke": self.z.fingerprint()}

    def get_batch(self, indices):
        batch = dict(self.z.get_batch(indices))
        rng = np.random.default_rng(len(indices))
        batch["seg"] = rng.integers(0, 3, (len(indices), 1, self.size, self.size)).astype(np.int32)
        return batch


@section("progan_layer4")
def progan_layer4(ctx: Context) -> list[dict]:
    """ProGAN layer4 dissection of generated samples, segmented by a random UPP segmenter."""
    import jax
    import jax.numpy as jnp

    from jaxdissect.data.folders import LatentSource
    from jaxdissect.models.proggan import LSUN_SIZES, ProgressiveGenerator, resolution
    from jaxdissect.pipelines.dissect import dissect

    sizes = LSUN_SIZES if not ctx.smoke else (64, 32, 32, 16, 16)
    module = ProgressiveGenerator(sizes=sizes, dtype=ctx.jnp_dtype())
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, sizes[0])))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32)), shapes)
    if ctx.smoke:
        segmentation = "dataset"

        def source(n):
            return _LabelledLatents(n, sizes[0], resolution(sizes) // 4)
    else:
        from bench.dissect import random_segmenter

        segmentation = random_segmenter(ctx.workdir)

        def source(n):
            return LatentSource(n, depth=sizes[0])
    n = ctx.n(10000, 8)
    kw = dict(quantile=0.01, topk=100, batch_size=ctx.n(250, 4), progress=False)
    dissect(module, variables, ["layer4"], source(ctx.n(500, 4)), segmentation, **kw)  # compile
    _, seconds = ctx.timed(lambda: dissect(module, variables, ["layer4"], source(n), segmentation, **kw))
    return [{"what": f"ProGAN layer4 dissection, {n} samples", "value": n / seconds, "unit": "samples/s",
             "goal": "10,000 in 30 s" if not ctx.smoke else ""},
            {"what": "  same, total time", "value": seconds, "unit": "s", "goal": ""}]


@section("classifier_sweep")
def classifier_sweep(ctx: Context) -> list[dict]:
    """All 512 single-unit ablations of VGG16 conv5_3 against one clean pass."""
    from jaxdissect.interventions import classifier as ci

    size = ctx.n(224, 64)
    module, variables, _ = _vgg(ctx, size)
    n = ctx.n(1024, 4)
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((n, size, size, 3)).astype(np.float32), rng.integers(0, 365, n).astype(np.int32))
    units = None if not ctx.smoke else np.arange(8)
    ci.perclass_accuracy(module, variables, data, batch_size=ctx.n(128, 4))
    _, clean = ctx.timed(lambda: ci.perclass_accuracy(module, variables, data, batch_size=ctx.n(128, 4)))
    ci.single_unit_sweep(module, variables, "conv5_3", data, units=units, batch_size=ctx.n(128, 4))
    _, sweep = ctx.timed(lambda: ci.single_unit_sweep(module, variables, "conv5_3", data, units=units,
                                                       batch_size=ctx.n(128, 4)))
    k = 512 if units is None else len(units)
    return [{"what": f"clean evaluation, {n} images", "value": n / clean, "unit": "images/s", "goal": ""},
            {"what": f"{k}-unit single-unit ablation sweep, {n} images", "value": sweep / clean,
             "unit": "x clean pass", "goal": "at most 2x" if not ctx.smoke else ""}]


def _float32_only(ctx: Context, what: str) -> list[dict] | None:
    """A note row for a section whose code runs in float32 only (None when ``ctx`` is float32)."""
    if ctx.dtype == "float32":
        return None
    return [{"what": f"{what}: measured in float32 only", "value": float("nan"), "unit": "", "goal": ""}]


@section("ganpaint_edit")
def ganpaint_edit(ctx: Context) -> list[dict]:
    """GANPaint edit latency through the app's API (bench/app.py's gpu_section)."""
    from bench.app import gpu_section

    return gpu_section(ctx)


@section("photo_editing")
def photo_editing(ctx: Context) -> list[dict]:
    """Inversion and adaptation step times and paint edits/s on a ProGAN (bench/editing.py's gpu_figures)."""
    from bench.editing import LSUN, gpu_figures

    note = _float32_only(ctx, "photo editing")
    if note:
        return note
    sizes = (512, 32, 32, 16, 16, 8) if ctx.smoke else LSUN
    r = gpu_figures(sizes=sizes, steps=ctx.n(10, 2), repeats=ctx.n(3, 1))
    res = 4 * 2 ** (len(sizes) - 2)
    return [{"what": f"inversion step, {res}x{res} ProGAN + VGG16 perceptual", "value": r["invert_s_per_step"],
             "unit": "s", "goal": ""},
            {"what": "adaptation, 1000 steps", "value": r["adapt_1000_steps_s"], "unit": "s",
             "goal": "about 30 s (the reference's GPU time)" if not ctx.smoke else ""},
            {"what": "paint edits", "value": r["paint_edits_per_s"], "unit": "edits/s", "goal": ""}]


@section("attacks")
def attacks(ctx: Context) -> list[dict]:
    """PGD and Carlini-Wagner L2 throughput on VGG16 at 224x224 (bench/attacks.py's gpu_section)."""
    from bench.attacks import gpu_section

    note = _float32_only(ctx, "attacks")
    if note:
        return note
    images, cw_steps, cw_search = ctx.n(32, 1), ctx.n(1000, 2), ctx.n(5, 1)
    r = gpu_section(images=images, pgd_steps=ctx.n(10, 2), cw_steps=cw_steps, cw_search=cw_search)
    return [{"what": f"PGD, {ctx.n(10, 2)} steps, batch {images}", "value": r["pgd_images_per_s"],
             "unit": "images/s", "goal": ""},
            {"what": f"Carlini-Wagner L2, {cw_search} x {cw_steps} steps, batch {images}",
             "value": r["cw_images_per_s"], "unit": "images/s", "goal": ""}]


def run(names, dtypes, smoke: bool) -> dict:
    import jax

    out = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
           "count": jax.device_count(), "rows": [], "load": os.getloadavg()}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            for name in names:
                ctx = Context(smoke=smoke, dtype=dtype, workdir=os.path.join(tmp, f"{name}-{dtype}"))
                os.makedirs(ctx.workdir, exist_ok=True)
                t = time.perf_counter()
                try:
                    rows = SECTIONS[name](ctx)
                    error = None
                except Exception as e:  # one failing section must not lose the others' figures
                    traceback.print_exc()
                    rows, error = [], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                out["rows"].append({"section": name, "dtype": dtype, "rows": rows, "error": error,
                                    "seconds": time.perf_counter() - t})
                print(f"{name} {dtype}: {rows or error}", file=sys.stderr)
    out["seconds"] = time.perf_counter() - start
    return out


def report(r: dict, smoke: bool) -> str:
    lines = [SECTION, "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {r['count']} x {r['device']} ({r['backend']}), "
             f"host load average {r['load'][0]:.1f}; whole script {r['seconds']:.0f} s."
             + (" SMOKE RUN (tiny sizes): these figures mean nothing." if smoke else ""),
             "", "| section | dtype | measurement | value | unit | goal |", "|---|---|---|---|---|---|"]
    for s in r["rows"]:
        if s["error"]:
            lines.append(f"| {s['section']} | {s['dtype']} | failed: {s['error']} | | | |")
        for row in s["rows"]:
            lines.append(f"| {s['section']} | {s['dtype']} | {row['what']} | {row['value']:.3g} | {row['unit']} | "
                         f"{row['goal']} |")
    lines.append("")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def main(argv):
    del argv
    from jaxdissect.models import set_cpu_xla_flags

    set_cpu_xla_flags()
    unknown = [s for s in FLAGS.sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: unknown section(s) {unknown}; sections: {sorted(SECTIONS)}")
    r = run(FLAGS.sections, FLAGS.dtypes, FLAGS.smoke)
    body = report(r, FLAGS.smoke)
    print(body)
    if FLAGS.results:
        from bench.results import write_section

        write_section(FLAGS.results, SECTION, body)
    if any(s["error"] for s in r["rows"]):
        raise SystemExit("error: some sections failed (see the table)")


def define_flags() -> None:
    flags.DEFINE_list("sections", list(SECTIONS), f"Sections to run, from {list(SECTIONS)}.")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Model dtypes to run every section in.")
    flags.DEFINE_bool("smoke", False, "Tiny sizes on any backend (tests); the figures mean nothing.")
    flags.DEFINE_string("results", os.path.join(REPO, "bench", "RESULTS.md"), "Results file ('' = none).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
