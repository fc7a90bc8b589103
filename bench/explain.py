"""Benchmark: compositional explanations (formula search), JAX bit-packed vs the paper's NumPy/RLE beam search.

    python -m bench.explain [--images=500] [--units=512] [--concepts=1024] [--reference_units=3]
                            [--exact_units=0] [--results=bench/RESULTS.md]

Both sides run the paper's beam search (beam 5, length 3, every concept tried
at every step) on the same synthetic Broden-like masks:

* concepts: 11 "colours" that tile every image, and object/part concepts
  present in few images (frequencies falling from 30% to 0.2% of images),
  each a rectangle where present; images of 56 x 56 positions;
* units: noisy planted formulas of one to three concepts.

* JAX: :func:`jaxdissect.explain.compositional` on block-sparse bit-packed
  masks, all units.
* NumPy/RLE: the paper's search on run-length encoded masks (each concept
  is one RLE over the flattened dataset; AND, OR, AND NOT by merging run
  boundaries, areas by summing runs), as compexp does with its pycocotools
  fork. It is timed on ``--reference_units`` units and scaled to all units:
  its cost per unit does not depend on the other units.

Both report the IoU of each unit's formula; the JAX answers must be at least
as good. ``gpu_section()`` is the hook for bench/gpu.py (full layer on an
accelerator); no GPU figures are claimed here.
"""

from __future__ import annotations

import os
import platform
import time
from collections import Counter

import numpy as np

SECTION = "## Compositional explanations (bench/explain.py)"
SIDE = 56
COLOURS = 11


# --------------------------------------------------------------------------
# Synthetic Broden-like masks.


def concept_mask(c: int, images: int, seed: int = 0) -> np.ndarray:
    """Concept ``c`` over ``images`` images of SIDE x SIDE, flattened (image-major)."""
    rng = np.random.default_rng((seed, c))
    if c < COLOURS:
        off = rng.integers(0, COLOURS, images)[:, None, None]
        yy, xx = np.mgrid[:SIDE, :SIDE]
        m = ((yy // 8 + xx // 8 + off) % COLOURS) == c
        return m.reshape(-1)
    freq = 0.3 * (c - COLOURS + 1) ** -0.8 + 0.002
    present = np.nonzero(rng.random(images) < freq)[0]
    m = np.zeros((images, SIDE, SIDE), bool)
    for i in present:
        h, w = rng.integers(SIDE // 8, SIDE // 2, 2)
        y, x = rng.integers(0, SIDE - h), rng.integers(0, SIDE - w)
        m[i, y : y + h, x : x + w] = True
    return m.reshape(-1)


def unit_mask(u: int, images: int, concepts: int, seed: int = 0) -> np.ndarray:
    """A noisy planted formula of one to three concepts (mostly frequent objects)."""
    rng = np.random.default_rng((seed, 10_000 + u))
    k = rng.integers(1, 4)
    picks = [int(COLOURS + min(concepts - COLOURS - 1, rng.geometric(0.05))) for _ in range(k)]
    if k == 3:
        picks[2] = int(rng.integers(0, COLOURS))        # often "object AND NOT colour"
    m = concept_mask(picks[0], images, seed)
    for c in picks[1:]:
        op = rng.integers(3)
        x = concept_mask(c, images, seed)
        m = m | x if op == 0 else m & x if op == 1 else m & ~x
    noise = rng.random(m.shape)
    return (m & (noise > 0.2)) | (noise < 0.0005)


# --------------------------------------------------------------------------
# The reference: the paper's beam search on run-length encodings (NumPy).


def rle(mask: np.ndarray) -> np.ndarray:
    """Run boundaries ``[start0, end0, start1, end1, ...]`` of a flat boolean mask."""
    d = np.diff(np.concatenate([[0], mask.view(np.int8), [0]]))
    return np.flatnonzero(d).astype(np.int64)


def rle_merge(a: np.ndarray, b: np.ndarray, op: str) -> np.ndarray:
    pts = np.union1d(a, b)
    sa = (np.searchsorted(a, pts, "right") % 2).astype(bool)
    sb = (np.searchsorted(b, pts, "right") % 2).astype(bool)
    res = sa | sb if op == "or" else sa & sb if op == "and" else sa & ~sb
    change = res != np.concatenate([[False], res[:-1]])
    return pts[change]


def rle_area(r: np.ndarray) -> int:
    return int((r[1::2] - r[0::2]).sum())


def reference_beam(unit: np.ndarray, masks: list, areas: np.ndarray, beam: int = 5, length: int = 3):
    """The paper's compute_best_iou on RLEs: ``(formula tuple, iou)``; formulas are nested tuples."""
    ur = rle(unit)
    ua = rle_area(ur)

    def iou(m, area):
        both = rle_area(rle_merge(m, ur, "and"))
        return both / (area + ua - both + 1e-10)

    def build(f):
        if isinstance(f, int):
            return masks[f]
        left, op, c = f
        return rle_merge(build(left), masks[c], op)

    ious = {c: iou(masks[c], areas[c]) for c in range(len(masks))}
    nonzero = Counter({c: v for c, v in ious.items() if v > 0})
    if not nonzero:
        return 0, 0.0
    formulas = dict(nonzero.most_common(beam))
    for _ in range(length - 1):
        new = {}
        for f in formulas:
            fm = build(f)
            for c in range(len(masks)):
                for op in ("or", "and", "andnot"):
                    m = rle_merge(fm, masks[c], op)
                    new[(f, op, c)] = iou(m, rle_area(m))
        formulas.update(new)
        formulas = dict(Counter(formulas).most_common(beam))
    return Counter(formulas).most_common(1)[0]


# --------------------------------------------------------------------------


def build_data(images, units, concepts, block_words=16, chunk=64):
    from jaxdissect.explain import SparseMasks
    rles, areas = [], []

    def concept_chunks():
        for s in range(0, concepts, chunk):
            m = np.stack([concept_mask(c, images) for c in range(s, min(concepts, s + chunk))])
            for row in m:
                rles.append(rle(row))
                areas.append(int(row.sum()))
            yield m

    def unit_chunks():
        for s in range(0, units, chunk):
            yield np.stack([unit_mask(u, images, concepts) for u in range(s, min(units, s + chunk))])

    p = images * SIDE * SIDE
    cm = SparseMasks.from_chunks(concept_chunks(), p, block_words)
    um = SparseMasks.from_chunks(unit_chunks(), p, block_words)
    return cm, um, rles, np.asarray(areas)


def gpu_section(images: int = 2000, units: int = 512, concepts: int = 1024) -> str:
    """Full layer (all units, length 3, beam 5) on the default JAX device; a markdown line for bench/gpu.py."""
    import jax
    from jaxdissect.explain import compositional
    cm, um, _, _ = build_data(images, units, concepts)
    names = [f"c{i}" for i in range(concepts)]
    run = lambda: compositional(um, cm, names, length=3, beam=5, batch=64, chunk_words=1 << 22)  # noqa: E731
    t = time.perf_counter()
    run()                                                           # includes compilation
    first = time.perf_counter() - t
    t = time.perf_counter()
    res = run()
    wall = time.perf_counter() - t
    return (f"- Compositional explanations: {units} units x {concepts} concepts, {images} images of "
            f"{SIDE}x{SIDE}, beam 5, length 3 on {jax.devices()[0].device_kind}: {wall:.1f} s "
            f"({first:.1f} s for the first run, compilation included) "
            f"(mean IoU {np.mean([r.iou for r in res]):.4f}).")


def main(argv):
    del argv
    import jax

    from bench.results import write_section
    from jaxdissect.explain import compositional
    from jaxdissect.models import set_cpu_xla_flags
    set_cpu_xla_flags()
    f = FLAGS
    load0 = os.getloadavg()
    names = [f"c{i}" for i in range(f.concepts)]
    t = time.perf_counter()
    cm, um, rles, areas = build_data(f.images, f.units, f.concepts)
    build = time.perf_counter() - t
    print(f"data: {cm.blocks.shape[0]} concept blocks of {cm.block_words} words "
          f"({cm.blocks.nbytes / 2**20:.1f} MiB; dense would be {f.concepts * f.images * SIDE * SIDE / 8 / 2**20:.0f} MiB), "
          f"built in {build:.1f} s")
    compositional(um, cm, names, length=1)                           # compile outside the timing
    small = compositional(um, cm, names, length=3)                   # warm every shape
    del small
    t, c0 = time.perf_counter(), time.process_time()
    res = compositional(um, cm, names, length=3, beam=5)
    jax_wall, jax_cpu = time.perf_counter() - t, time.process_time() - c0
    print(f"JAX: {f.units} units in {jax_wall:.1f} s wall, {jax_cpu:.1f} CPU s")
    ref_units = list(range(f.reference_units))
    t, c0 = time.perf_counter(), time.process_time()
    ref = [reference_beam(unit_mask(u, f.images, f.concepts), rles, areas) for u in ref_units]
    ref_wall, ref_cpu = time.perf_counter() - t, time.process_time() - c0
    per_unit = ref_wall / len(ref_units)
    print(f"NumPy/RLE: {len(ref_units)} units in {ref_wall:.1f} s wall, {ref_cpu:.1f} CPU s "
          f"({per_unit:.1f} s per unit)")
    diffs = [res[u].iou - ref[k][1] for k, u in enumerate(ref_units)]
    exact_line = ""
    if f.exact_units:
        from jaxdissect.explain import SparseMasks
        k = f.exact_units
        sub = SparseMasks.from_dense(np.stack([unit_mask(u, f.images, f.concepts) for u in range(k)]), cm.block_words)
        t = time.perf_counter()
        ex = compositional(sub, cm, names, length=3, exact=True)
        exact_wall = time.perf_counter() - t
        gain = [e.iou - b.iou for e, b in zip(ex, res[:k])]
        exact_line = (f"- Exact mode (branch and bound) on units 0-{k - 1}: {exact_wall:.1f} s wall "
                      f"(compilation included); better than the beam on {sum(g > 0 for g in gain)} of {k} units, "
                      f"never worse (IoU gain min {min(gain):+.2e}, max {max(gain):+.2e}).\n")
    load1 = os.getloadavg()
    scaled = per_unit * f.units
    body = (
        f"{SECTION}\n\n"
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs shared with other jobs (load average {load0[0]:.1f} at the start, "
        f"{load1[0]:.1f} at the end: the machine was busy, so wall times are noisy), jax {jax.__version__}, "
        f"numpy {np.__version__}, JAX device {jax.devices()[0].platform}. Synthetic Broden-like data: "
        f"{f.images} images of {SIDE}x{SIDE}, {f.concepts} concepts (11 colours tiling every image, objects in "
        f"30% down to 0.2% of images), {f.units} units (noisy planted formulas). Search: the paper's beam "
        f"search, beam 5, length 3, every concept at every step.\n\n"
        f"| implementation | units timed | wall s | CPU s | wall s for all {f.units} units |\n|---|---|---|---|---|\n"
        f"| JAX bit-packed block-sparse (explain.compositional) | {f.units} | {jax_wall:.1f} | {jax_cpu:.1f} | "
        f"{jax_wall:.1f} |\n"
        f"| NumPy/RLE, the paper's search | {len(ref_units)} | {ref_wall:.1f} | {ref_cpu:.1f} | "
        f"{scaled:.0f} (scaled; {ref_cpu / len(ref_units) * f.units:.0f} CPU s) |\n\n"
        f"- Speed-up, all units: {ref_cpu / len(ref_units) * f.units / jax_cpu:.0f}x in CPU time (user + system "
        f"of this process, the robust figure on a shared machine), {scaled / jax_wall:.0f}x in wall-clock time; "
        f"the NumPy side is scaled from {len(ref_units)} units, as its time per unit does not depend on the "
        f"other units.\n"
        f"- Same answers: on the {len(ref_units)} units both ran, JAX IoU minus NumPy/RLE IoU: "
        f"min {min(diffs):+.2e}, max {max(diffs):+.2e} (the same formulas: "
        f"{sum(abs(d) < 1e-9 for d in diffs)}/{len(diffs)} equal).\n"
        f"- Memory: concept masks take {cm.blocks.nbytes / 2**20:.1f} MiB as non-zero 64-byte blocks, "
        f"{f.concepts * f.images * SIDE * SIDE / 8 / 2**20:.0f} MiB if every concept were a full bit mask.\n"
        + exact_line +
        "- GPU: `gpu_section()` in this file runs the full layer on an accelerator for bench/gpu.py; no GPU "
        "figures were measured here.\n")
    print(body)
    if f.results:
        write_section(f.results, SECTION, body)


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_integer("images", 500, "synthetic images (56 x 56 positions each)")
    flags.DEFINE_integer("units", 512, "units explained")
    flags.DEFINE_integer("concepts", 1024, "concepts (11 colours, the rest objects)")
    flags.DEFINE_integer("reference_units", 3, "units timed on the NumPy/RLE side (scaled to all units)")
    flags.DEFINE_integer("exact_units", 0, "if > 0, also time exact mode on that many units (slow with 1,000+ "
                         "overlapping concepts)")
    flags.DEFINE_string("results", "bench/RESULTS.md", "results file to update ('' to only print)")
    FLAGS = flags.FLAGS
    app.run(main)
