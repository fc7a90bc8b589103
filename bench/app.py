"""Benchmark: painting-app edits per second through the JSON API (request to decoded image).

    python -m bench.app [--edits=30] [--strokes=1,4] [--gpu]

Each edit is a ``POST /api/generate`` with a stroke stack of ``--strokes``
32x32 PNG masks, sent through Starlette's in-process ``TestClient`` (the
full ASGI app: JSON and PNG decoding, validation, the jitted edit, PNG
encoding), and the reply's PNG decoded back to pixels. Side by side, in the
same loop, ``jaxdissect.editing.apply_strokes`` is called directly with the
same strokes, so the API's overhead is a ratio measured under the same load.

CPU: the embedded default (the toy generator, 32x32 images). GPU
(:func:`run_gpu`, ``--gpu``, or :func:`gpu_section` for ``bench/gpu.py``'s registry): a ProGAN of the
LSUN layout (256x256, 512 units at layer4) with random weights and random
brushes, since no weights may be downloaded; the goal there is an
interactive edit, under 100 ms. Figures go to the
``## Painting app (bench/app.py)`` section of the results file.
"""

from __future__ import annotations

import base64
import io
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Painting app (bench/app.py)"
GPU_SECTION = "## Painting app on GPU (bench/app.py --gpu)"


def _mask_urls(n: int, size: tuple[int, int], seed: int = 0) -> tuple[list[str], list[np.ndarray]]:
    from PIL import Image

    rng = np.random.RandomState(seed)
    urls, masks = [], []
    for _ in range(n):
        h, w = size
        y, x = rng.randint(0, h - h // 4), rng.randint(0, w - w // 4)
        m = np.zeros((h, w), np.float32)
        m[y:y + h // 4, x:x + w // 4] = 1
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[m > 0] = 255
        buf = io.BytesIO()
        Image.fromarray(rgba).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        masks.append(m)
    return urls, masks


def measure(painter, edits: int, stroke_counts=(1, 4)) -> dict:
    """Per stroke count: median ms per edit through the API and direct, alternating, after a warm-up."""
    from starlette.testclient import TestClient

    from jaxdissect import editing
    from jaxdissect.app import create_app
    from jaxdissect.app.codec import decode_png

    concepts = painter.concepts()
    rows = {}
    with TestClient(create_app(painter)) as client:
        for n in stroke_counts:
            urls, masks = _mask_urls(n, painter.mask_size, seed=n)
            body = {"image": 0, "strokes": [{"concept": concepts[i % len(concepts)], "mask": u, "erase": i % 3 == 2}
                                            for i, u in enumerate(urls)]}
            strokes = [editing.Stroke(s["concept"], m, erase=s["erase"]) for s, m in zip(body["strokes"], masks)]
            x = painter.z[:1]

            def api():
                r = client.post("/api/generate", json=body)
                assert r.status_code == 200, r.text
                return decode_png(r.json()["image"])

            def direct():
                return np.asarray(editing.apply_strokes(painter.module, painter.variables, x, strokes,
                                                        painter.brushes, layer=painter.layer))

            t0 = time.perf_counter()
            api(), direct()
            compile_s = time.perf_counter() - t0
            times = {"api": [], "direct": []}
            for _ in range(edits):
                for name, fn in (("api", api), ("direct", direct)):
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
            rows[n] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows[n].update({k + "_best": min(v) * 1e3 for k, v in times.items()})
            rows[n]["compile_s"] = compile_s
    return rows


def run_cpu(edits: int, stroke_counts) -> dict:
    import tempfile

    from jaxdissect.app import build_painter

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as cache:
        painter = build_painter(cache_dir=cache, num_images=1)
        rows = measure(painter, edits, stroke_counts)
    return {"rows": rows, "load": (load0[0], os.getloadavg()[0]), "edits": edits,
            "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "image": painter.resolution, "units": painter.num_units}


def progan_painter(sizes=None, dtype=None):
    """A ProGAN (default: the LSUN layout) with random weights and random brushes (3 concepts) at layer4."""
    import jax.numpy as jnp

    from jaxdissect.app import Painter
    from jaxdissect.editing import Brushes
    from jaxdissect.models.proggan import LSUN_SIZES, ProgressiveGenerator

    sizes = tuple(sizes or LSUN_SIZES)
    module = ProgressiveGenerator(sizes=sizes, dtype=dtype or jnp.float32)
    z = np.random.RandomState(1).standard_normal((1, sizes[0])).astype(np.float32)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(module.init, jax.random.key(0), z)
    variables = jax.device_put(jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32) * 0.05, shapes))
    units = sizes[2]  # layer4 is the second block at the second width
    brushes = Brushes(layer="layer4", label_names=("-", "tree", "door", "dome"), iou=rng.random((units, 4)),
                      levels=rng.random(units).astype(np.float32) * 5)
    return Painter(module, variables, "layer4", brushes, z, mask_size=(32, 32))


def run_gpu(edits: int = 30, stroke_counts=(1, 4), sizes=None, dtype=None) -> dict:
    """Edit latency through the API with a ProGAN-sized generator on the default JAX device (a GPU)."""
    load0 = os.getloadavg()[0]
    painter = progan_painter(sizes, dtype)
    rows = measure(painter, edits, stroke_counts)
    return {"rows": rows, "load": (load0, os.getloadavg()[0]), "edits": edits,
            "device": str(jax.devices()[0].device_kind), "image": painter.resolution, "units": painter.num_units}


def gpu_section(ctx) -> list[dict]:
    """Rows for bench/gpu.py's section registry (``section("ganpaint_edit")(gpu_section)``).

    ``ctx``: its Context (``smoke``, ``jnp_dtype()``, ``n(full, smoke)``). Full size: the LSUN ProGAN at
    256x256; smoke: a small ProGAN, any backend.
    """
    import jax.numpy as jnp

    if ctx.jnp_dtype() != jnp.float32:  # apply_strokes' composition is float32; a bf16 layer then mismatches
        return [{"what": "GANPaint edit: measured in float32 only", "value": float("nan"), "unit": "", "goal": ""}]
    sizes = None if not ctx.smoke else (512, 32, 32, 16, 16, 8)
    r = run_gpu(ctx.n(30, 2), (1, 4), sizes=sizes)
    rows = []
    for n, row in r["rows"].items():
        rows.append({"what": f"GANPaint edit through the API, {n} stroke(s), {r['image']}x{r['image']}, "
                             "request to decoded image (median)", "value": row["api"], "unit": "ms",
                     "goal": "under 100 ms" if not ctx.smoke else ""})
        rows.append({"what": "  same, apply_strokes direct (median)", "value": row["direct"], "unit": "ms",
                     "goal": ""})
    return rows


def report(r: dict, section: str, what: str) -> str:
    lines = [
        section, "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {r['device']}, jax {jax.__version__}; "
        f"load average {r['load'][0]:.1f} at the start, {r['load'][1]:.1f} at the end"
        + (" (the machine was shared with other jobs, so wall times are noisy; the ratio less so). "
           if r["load"][0] > (os.cpu_count() or 1) / 2 else ". ")
        +
        f"{what}, {r['image']}x{r['image']} images, {r['units']} units at the edited layer; {r['edits']} edits "
        "per row, API and direct calls alternating after a warm-up (compile) call; median and fastest "
        "(interference from other jobs only adds time).",
        "",
        "| strokes per edit | API: request to decoded image, median / fastest (ms) | edits/s via API (median) | "
        "apply_strokes direct, median / fastest (ms) | API / direct (fastest) | warm-up (s) |",
        "|---|---|---|---|---|---|",
    ]
    for n, row in r["rows"].items():
        lines.append(f"| {n} | {row['api']:.1f} / {row['api_best']:.1f} | {1e3 / row['api']:.1f} | "
                     f"{row['direct']:.1f} / {row['direct_best']:.1f} | {row['api_best'] / row['direct_best']:.2f} | "
                     f"{row['compile_s']:.1f} |")
    return "\n".join(lines + [""])


FLAGS = flags.FLAGS


def main(argv):
    del argv
    import logging

    logging.getLogger("httpx2").setLevel(logging.WARNING)
    counts = tuple(int(s) for s in FLAGS.strokes.split(","))
    if FLAGS.gpu:
        body = report(run_gpu(FLAGS.edits, counts), GPU_SECTION, "ProGAN LSUN layout, random weights")
        section = GPU_SECTION
    else:
        from jaxdissect.models import set_cpu_xla_flags

        set_cpu_xla_flags()
        body = report(run_cpu(FLAGS.edits, counts), SECTION, "Embedded default (planted toy generator)")
        body += ("\nThe API adds JSON and PNG decoding, validation and PNG encoding to the jitted edit. GPU: "
                 "`python -m bench.app --gpu` (or `gpu_section` in bench/gpu.py) times a ProGAN of the LSUN "
                 "layout (256x256, random weights) the same way, goal under 100 ms per edit; no GPU was lent "
                 "to this task, so there is no GPU figure yet.\n")
        section = SECTION
    print(body)
    if FLAGS.results:
        from bench.results import write_section

        write_section(FLAGS.results, section, body)


def define_flags() -> None:
    flags.DEFINE_integer("edits", 30, "Timed edits per stroke count (each API and direct).")
    flags.DEFINE_string("strokes", "1,4", "Comma list of stroke-stack sizes to time.")
    flags.DEFINE_bool("gpu", False, "Time the ProGAN-sized random generator on the default device instead.")
    flags.DEFINE_string("results", os.path.join(REPO, "bench", "RESULTS.md"), "Results file to update ('' = none).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
