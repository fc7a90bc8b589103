"""Benchmark: the statistics pass of a dissection, streaming JAX vs in-memory NumPy, side by side.

    python -m bench.stats [--images=32] [--growth=4] [--batch=16] [--data=blobs] \
        [--original=/path/to/davidbau/dissect] [--results=bench/RESULTS.md]

Both compute the same EXACT quantities for one layer of 512 units: the
per-unit level ``numpy.quantile(upsampled activations, 0.99)``, integer IoU
counts of ``upsampled > level`` against ~1,800 labels in 6 segmentation
channels, and the top-100 images per unit by raw spatial maximum.

* JAX: :func:`jaxdissect.statistics.dissect_activations` (three streaming
  passes, exact radix-select quantiles, memory independent of the number of
  images).
* NumPy: the straightforward implementation: upsample with the same two-tap
  geometry, keep every upsampled value, ``numpy.quantile``, then ``bincount``
  IoU and ``argsort`` top-k.
* original (with ``--original=PATH``, a local checkout of davidbau/dissect):
  its own tally code as its ``dissect_experiment.py`` runs it on PyTorch
  (CPU here): ``upsample.upsampler`` + ``RunningQuantile`` (r=8192) for the
  level, ``RunningTopK`` of the per-image maxima, and ``conditional_samples``
  + ``RunningConditionalVariance`` one image at a time for the IoU. Its level
  is a sketch estimate, so only the closeness of its levels is reported. Its
  optional imports that the tally code does not use (statsmodels,
  torchvision) are stubbed when missing.

Data (``--data``): ``blobs`` (default) is shaped like post-ReLU feature maps:
about 87% zeros, each (image, unit) firing with probability 0.3 as one
smooth blob plus weak noise, and segmentations of a few regions per channel
(about 20 labels per image, as a scene parser gives); ``exponential`` is
i.i.d. exponential activations (no zeros, no spatial structure: the worst
case for skipping cells) with blocky segmentations of up to 384 labels per
image (the original's per-label loop makes that case very slow for it).

Shapes: VGG16 ``conv5_3`` (14x14 -> 56x56) and ProGAN ``layer4`` (8x8 ->
64x64). Synthetic data is generated on the fly per batch (the same on both
sides); its generation time is measured and left out. Each (implementation,
shape, image count) runs in a fresh subprocess, so ``ru_maxrss`` is that
run's peak memory. Throughput is marginal, between ``images`` and
``growth * images`` images, so JAX's compile time (reported apart) does not
count; the results of both sides are compared. Figures go to the
``## Statistics pass (bench/stats.py)`` section of the results file.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from bench.results import load_note, write_section


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Statistics pass (bench/stats.py)"
UNITS, CHANNELS, QUANTILE, TOPK = 512, 6, 0.01, 100
# (first label, last label, probability of no label) per segmentation channel; 1,801 labels with 0.
CHANNEL_LABELS = ((1, 600, 0.0), (601, 1200, 0.3), (1201, 1500, 0.5), (1501, 1550, 0.2), (1551, 1790, 0.6),
                  (1791, 1800, 0.0))
NUM_LABELS = 1801
SHAPES = {"conv5_3": {"source": 14, "size": 56, "model": "VGG16 conv5_3"},
          "layer4": {"source": 8, "size": 64, "model": "ProGAN layer4"}}


# --------------------------------------------------------------------------
# Synthetic data: exponential activations, blocky segmentations, units 0-63 tied to labels 1-64.


def make_batch(shape: str, index: int, batch: int, seed: int = 0):
    """Batch ``index``: raw activations ``[B, h, h, 512]`` float32 and segmentations ``[B, 6, S, S]`` int32."""
    cfg = SHAPES[shape]
    h, s = cfg["source"], cfg["size"]
    rng = np.random.default_rng([seed, index])
    grid = 8
    seg = np.zeros((batch, CHANNELS, grid, grid), np.int32)
    for k, (lo, hi, empty) in enumerate(CHANNEL_LABELS):
        labels = rng.integers(lo, hi + 1, (batch, grid, grid))
        if k == 0:
            labels = np.where(rng.random((batch, grid, grid)) < 0.5, rng.integers(1, 65, (batch, grid, grid)), labels)
        seg[:, k] = np.where(rng.random((batch, grid, grid)) < empty, 0, labels)
    seg = np.repeat(np.repeat(seg, s // grid, axis=2), s // grid, axis=3)
    acts = rng.standard_exponential((batch, h, h, UNITS), dtype=np.float32)
    # Unit u < 64 fires where channel 0 carries label u + 1 (nearest cell of the label grid).
    cells = (np.arange(h) * grid) // h
    coarse = seg[:, 0, :, :][:, cells * (s // grid)][:, :, cells * (s // grid)]
    planted = coarse[..., None] == np.arange(1, 65, dtype=np.int32)
    acts[..., :64] += 4.0 * planted
    return acts, seg


def make_blobs(shape: str, index: int, batch: int, seed: int = 0):
    """Batch ``index`` of ``blobs`` data: sparse smooth post-ReLU maps and region segmentations."""
    cfg = SHAPES[shape]
    h, s = cfg["source"], cfg["size"]
    rng = np.random.default_rng([seed, index, 1])
    y = np.arange(h, dtype=np.float32)
    cy, cx = rng.uniform(0, h, (2, batch, UNITS)).astype(np.float32)
    sigma = rng.uniform(1.0, 2.5, (batch, UNITS)).astype(np.float32)
    amp = (rng.standard_exponential((batch, UNITS)) * 3 * (rng.random((batch, UNITS)) < 0.3)).astype(np.float32)
    d = ((y[:, None, None, None] - cy) ** 2 + (y[None, :, None, None] - cx) ** 2) / (2 * sigma ** 2)
    acts = amp * np.exp(-d) + 0.3 * rng.standard_normal((h, h, batch, UNITS), dtype=np.float32) - 0.4
    acts = np.ascontiguousarray(np.maximum(acts, 0).transpose(2, 0, 1, 3))
    seg = np.zeros((batch, CHANNELS, 4, 4), np.int32)
    for k, (lo, hi, empty) in enumerate(CHANNEL_LABELS):
        pool = rng.integers(lo, hi + 1, (batch, 3))                     # 3 labels per image and channel
        pick = np.take_along_axis(pool, rng.integers(0, 3, (batch, 16)), 1).reshape(batch, 4, 4)
        seg[:, k] = np.where(rng.random((batch, 4, 4)) < empty, 0, pick)
    seg = np.repeat(np.repeat(seg, s // 4, axis=2), s // 4, axis=3)
    return acts, seg


DATA = {"blobs": make_blobs, "exponential": make_batch}


# --------------------------------------------------------------------------
# The NumPy reference.


def axis_taps(source: int, target: int):
    """Two-tap bilinear sampling with half-pixel centres and zero padding (the original geometry)."""
    x = (np.arange(target) + 0.5) * (source / target) - 0.5
    i0 = np.floor(x).astype(np.int64)
    w1 = x - i0
    w0 = 1.0 - w1
    i1 = i0 + 1
    w0 = np.where((i0 >= 0) & (i0 < source), w0, 0.0).astype(np.float32)
    w1 = np.where(i1 < source, w1, 0.0).astype(np.float32)
    return np.clip(i0, 0, source - 1), np.clip(i1, 0, source - 1), w0, w1


def _two_taps(a, axis: int, i0, i1, w0, w1):
    """``fma(w0, a[i0], w1 * a[i1])`` in float32 along ``axis``.

    XLA:CPU contracts the jitted two-tap sum into a fused multiply-add, so
    this reference does too: ``w0 * a[i0]`` is exact in float64 and the sum
    is rounded once (to float64, then float32; the double rounding never
    showed a difference here).
    """
    shape = [1] * a.ndim
    shape[axis] = -1
    near = np.take(a, i0, axis).astype(np.float64) * w0.astype(np.float64).reshape(shape)
    far = (np.take(a, i1, axis) * w1.reshape(shape)).astype(np.float64)
    return (near + far).astype(np.float32)


def upsample(acts, size: int):
    """``[B, h, w, U]`` -> ``[B, S, S, U]`` float32, rows then columns."""
    taps = axis_taps(acts.shape[1], size)
    return _two_taps(_two_taps(acts, 1, *taps), 2, *taps)


def numpy_stats(batches, num_batches: int, size: int) -> dict:
    """Exact level, IoU counts and top-k with everything in memory."""
    ups, segs, scores = [], [], []
    for acts, seg in batches(num_batches):
        ups.append(upsample(acts, size).reshape(-1, UNITS))
        segs.append(seg)
        scores.append(acts.max(axis=(1, 2)))
    values = np.concatenate(ups)
    del ups
    thresholds = np.quantile(values, 1 - QUANTILE, axis=0).astype(np.float32)
    seg = np.concatenate(segs).transpose(0, 2, 3, 1).reshape(-1, CHANNELS)
    # One (pixel, label) pair per label a pixel carries, however many channels carry it.
    pixel = np.repeat(np.arange(len(seg)), CHANNELS)
    pairs = np.unique(pixel * NUM_LABELS + seg.reshape(-1))
    pairs = pairs[pairs % NUM_LABELS != 0]
    pair_pixel, pair_label = pairs // NUM_LABELS, pairs % NUM_LABELS
    label_pixels = np.bincount(pair_label, minlength=NUM_LABELS)
    intersection = np.zeros((UNITS, NUM_LABELS), np.int64)
    active = np.zeros(UNITS, np.int64)
    chunk = 1 << 15
    for start in range(0, len(pair_pixel), chunk):
        p, lab = pair_pixel[start:start + chunk], pair_label[start:start + chunk]
        on = values[p] > thresholds                                   # [pairs, U]
        rows, units = np.nonzero(on)
        intersection += np.bincount(units * NUM_LABELS + lab[rows], minlength=UNITS * NUM_LABELS).reshape(
            UNITS, NUM_LABELS)
    for start in range(0, len(values), chunk):
        active += (values[start:start + chunk] > thresholds).sum(0)
    # Label 0 stands for "every pixel", so IoU column 0 is the activation rate (as in the original).
    label_pixels[0] = len(values)
    intersection[:, 0] = active
    union = active[:, None] + label_pixels[None, :] - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / union
    score = np.concatenate(scores).T                                 # [U, N]
    top_index = np.argsort(-score, axis=1, kind="stable")[:, :TOPK]
    return {"thresholds": thresholds, "intersection": intersection, "active": active,
            "label_pixels": label_pixels, "iou": iou, "top_index": top_index,
            "top_values": np.take_along_axis(score, top_index, 1)}


def jax_stats(batches, num_batches: int, size: int, sparse: bool = True) -> dict:
    from jaxdissect.statistics import dissect_activations

    r = dissect_activations(lambda: batches(num_batches), NUM_LABELS, quantile=QUANTILE, resolution=size,
                            topk=TOPK, num_batches=num_batches, sparse=sparse)
    return {"thresholds": r.thresholds, "intersection": r.intersection, "active": r.active,
            "label_pixels": r.label_pixels, "iou": r.iou, "top_index": r.top_index, "top_values": r.top_values}


def _import_original(path: str):
    """``netdissect.runningstats``, ``.upsample``, ``.tally`` from a local checkout of the original, importable
    on this CPU as bench/vs_original.py makes it (stand-ins for packages it imports but the tally code does not use)."""
    from bench.vs_original import import_original

    mods = import_original(path)
    from netdissect import runningstats

    return runningstats, mods["tally"], mods["upsample"]


def original_stats(batches, num_batches: int, size: int, path: str) -> dict:
    """The original's tally code over the same batches (three passes, as its dissect_experiment.py)."""
    import torch

    runningstats, tally, upsample = _import_original(path)
    torch.set_grad_enabled(False)
    torch.set_num_threads(os.cpu_count() or 1)
    upfn = None

    def torch_batches():
        nonlocal upfn
        for acts, seg in batches(num_batches):
            a = torch.from_numpy(acts).permute(0, 3, 1, 2).contiguous()
            if upfn is None:
                upfn = upsample.upsampler((size, size), data_shape=a.shape[2:], image_size=(4 * size, 4 * size))
            yield a, torch.from_numpy(seg).long()

    rq = runningstats.RunningQuantile(r=8192)
    for a, _ in torch_batches():                                   # rq: quantile sketch of upsampled values
        rq.add(upfn(a).permute(0, 2, 3, 1).reshape(-1, a.shape[1]))
    topk = runningstats.RunningTopK(k=TOPK)
    for a, _ in torch_batches():                                   # topk: per-image maxima
        topk.add(a.view(a.shape[0], a.shape[1], -1).max(2)[0])
    level = rq.quantiles(1 - QUANTILE)
    cv = runningstats.RunningConditionalVariance()
    for a, seg in torch_batches():                                 # condi99: one image at a time
        for i in range(a.shape[0]):
            indicator = (upfn(a[i:i + 1]) > level[None, :, None, None]).float()
            for cond, sample in tally.conditional_samples(indicator, seg[i:i + 1]):
                cv.add(cond, sample)
    iou = tally.iou_from_conditional_indicator_mean(cv).numpy().T      # [U, conditions]
    full = np.zeros((iou.shape[0], NUM_LABELS))
    full[:, :iou.shape[1]] = iou
    values, index = topk.result()
    return {"thresholds": level.numpy().astype(np.float32), "iou": full, "top_index": index.numpy(),
            "top_values": values.numpy()}


# --------------------------------------------------------------------------
# One measured run (in a fresh process) and the side-by-side driver.


def worker(impl: str, shape: str, images: int, batch: int, out: str, data: str = "blobs",
           original: str = "") -> dict:
    """Run one implementation over ``images`` images; returns timings and peak memory."""
    generation = [0.0]
    num_batches = -(-images // batch)

    def batches(n):
        for i in range(n):
            start = time.thread_time()  # this thread's CPU time: wall time is inflated on a loaded machine
            b = min(batch, images - i * batch)
            arrays = DATA[data](shape, i, b)
            generation[0] += time.thread_time() - start
            yield arrays

    fn = {"jax": jax_stats, "numpy": numpy_stats,
          "jax-dense": lambda *a: jax_stats(*a, sparse=False),
          "original": lambda *a: original_stats(*a, path=original)}[impl]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = fn(batches, num_batches, SHAPES[shape]["size"])
    total = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)
    np.savez(out, **result)
    # Generation is single-threaded NumPy in this thread: its CPU time comes off both figures.
    return {"seconds": total - generation[0], "cpu_s": cpu - generation[0], "generation_s": generation[0],
            "peak_mib": after.ru_maxrss / 1024}  # ru_maxrss is in KiB on Linux


def _spawn(impl, shape, images, batch, out, devices, data="blobs", original="") -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.setdefault("JAX_PLATFORMS", "cpu")
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, "-m", "bench.stats", f"--worker={impl}", f"--shape={shape}", f"--images={images}",
           f"--batch={batch}", f"--out={out}", f"--data={data}", f"--original={original}", "--results="]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: dict, b: dict) -> dict:
    """How far the two results are apart (thresholds, counts, IoU, top-k)."""
    iou_a, iou_b = np.nan_to_num(a["iou"]), np.nan_to_num(b["iou"])
    k = min(a["top_index"].shape[1], b["top_index"].shape[1])
    return {"thresholds_equal": float(np.mean(a["thresholds"] == b["thresholds"])),
            "thresholds_max_rel": float(np.max(np.abs(a["thresholds"] - b["thresholds"]) / np.abs(b["thresholds"]))),
            "counts_equal": bool(np.array_equal(a["intersection"], b["intersection"])
                                 and np.array_equal(a["active"], b["active"])
                                 and np.array_equal(a["label_pixels"], b["label_pixels"])),
            "iou_max_abs": float(np.max(np.abs(iou_a - iou_b))),
            "topk_equal": bool(np.array_equal(a["top_index"][:, :k], b["top_index"][:, :k])
                               and np.array_equal(a["top_values"][:, :k], b["top_values"][:, :k]))}


def _rate(images: float, seconds: float):
    return images / seconds if seconds > 0 else None


NAMES = {"jax": "JAX streaming, hot cells only (dissect_activations)",
         "jax-dense": "JAX streaming, dense kernels (sparse=False)",
         "numpy": "NumPy in memory", "original": "original tally code (PyTorch CPU)"}


def run(images: int, growth: int, batch: int, shapes, devices: int, data: str, original: str) -> dict:
    impls = ["jax", "jax-dense", "numpy"] + (["original"] if original else [])
    figures = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            runs = {}
            for n in (images, growth * images):
                for impl in impls:
                    out = os.path.join(tmp, f"{impl}-{shape}-{n}.npz")
                    runs[impl, n] = _spawn(impl, shape, n, batch, out, devices, data, original)
                    print(f"{shape} {impl} {n} images: {runs[impl, n]}", file=sys.stderr)
            small, big = images, growth * images
            result = {}
            for impl in impls:
                lo, hi = runs[impl, small], runs[impl, big]
                cpu_per_image = (hi["cpu_s"] - lo["cpu_s"]) / (big - small)
                result[impl] = {
                    "ips": _rate(big - small, hi["seconds"] - lo["seconds"]),
                    "ips_cpu": _rate(1.0, cpu_per_image),
                    # Fixed cost: CPU time at the small size beyond what the marginal rate accounts for.
                    "fixed_cpu_s": lo["cpu_s"] - small * cpu_per_image,
                    "peak_mib": (lo["peak_mib"], hi["peak_mib"]),
                    # All in: the large run's whole CPU time, compilation and set-up included.
                    "total_cpu_s": hi["cpu_s"],
                }
            arrays = {impl: dict(np.load(os.path.join(tmp, f"{impl}-{shape}-{big}.npz"))) for impl in impls}
            result["agreement"] = compare(arrays["jax"], arrays["numpy"])
            result["dense_agreement"] = compare(arrays["jax"], arrays["jax-dense"])
            if original:
                o = arrays["original"]["thresholds"]
                result["original_level_rel"] = float(np.median(np.abs(o - arrays["numpy"]["thresholds"])
                                                               / np.abs(arrays["numpy"]["thresholds"])))
            figures[shape] = result
    return {"images": images, "growth": growth, "batch": batch, "devices": devices, "shapes": figures,
            "impls": impls, "data": data, "load": (load_before, os.getloadavg())}


def _fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def _ratio(a, b):
    return None if a is None or b is None else a / b


def report(r: dict) -> str:
    import jax

    small, big = r["images"], r["growth"] * r["images"]
    load0, load1 = r["load"]
    lines = [
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs (load average {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} (1/5/15 min) at "
        f"the start, {load1[0]:.1f} at the end: "
        + load_note(load0[0], load1[0])
        + f"; images per CPU-second is the robust figure), jax {jax.__version__}, numpy "
        f"{np.__version__}, {r['devices']} JAX device(s), batch {r['batch']}, data `{r['data']}`. 512 units, 6 label "
        f"channels, {NUM_LABELS - 1} labels, level = 0.99 quantile, top-{TOPK}. Rates are marginal between "
        f"{small} and {big} images (fixed costs such as JAX compilation excluded; data generation excluded on all "
        "sides). Peak memory is the process's maximum resident set.",
        "",
        f"| layer | implementation | images/s (wall) | images per CPU-s | fixed cost (CPU s) | "
        f"CPU s for {big} images, all in | peak MiB, {small} images | peak MiB, {big} images |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, f in r["shapes"].items():
        name = SHAPES[shape]["model"] + f" ({SHAPES[shape]['source']}² → {SHAPES[shape]['size']}²)"
        for impl in r["impls"]:
            j = f[impl]
            lines.append(f"| {name} | {NAMES[impl]} | {_fmt(j['ips'])} | {_fmt(j['ips_cpu'])} | "
                         f"{j['fixed_cpu_s']:.1f} | {j['total_cpu_s']:.1f} | {j['peak_mib'][0]:.0f} | "
                         f"{j['peak_mib'][1]:.0f} |")
    lines.append("")
    for shape, f in r["shapes"].items():
        a, d = f["agreement"], f["dense_agreement"]
        ratios = ", ".join(f"{NAMES[i].split(' (')[0]} {_fmt(_ratio(f['jax']['ips_cpu'], f[i]['ips_cpu']))}x"
                           for i in r["impls"] if i != "jax")
        all_in = ", ".join(f"{NAMES[i].split(' (')[0]} {_fmt(_ratio(f[i]['total_cpu_s'], f['jax']['total_cpu_s']))}x"
                           for i in r["impls"] if i != "jax")
        lines.append(
            f"- {SHAPES[shape]['model']}: hot-cell JAX per CPU-second against: {ratios}; all in at {big} "
            f"images (its compilation charged to the run): {all_in}. Agreement at {big} "
            f"images with NumPy: {100 * a['thresholds_equal']:.1f}% of thresholds bit-equal, IoU counts "
            f"{'identical' if a['counts_equal'] else 'differ'}, top-k {'identical' if a['topk_equal'] else 'differs'}; "
            f"with the dense kernels: thresholds {100 * d['thresholds_equal']:.1f}% bit-equal, counts "
            f"{'identical' if d['counts_equal'] else 'differ'}."
            + (f" The original's sketch levels differ from the exact ones by {100 * f['original_level_rel']:.2f}% "
               "(median relative difference)." if "original_level_rel" in f else ""))
    lines.append("")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.worker:
        print(json.dumps(worker(FLAGS.worker, FLAGS.shape, FLAGS.images, FLAGS.batch, FLAGS.out, FLAGS.data,
                                FLAGS.original)))
        return
    r = run(FLAGS.images, FLAGS.growth, FLAGS.batch, FLAGS.shapes, FLAGS.devices, FLAGS.data, FLAGS.original)
    body = report(r)
    print(body)
    if FLAGS.results:
        write_section(FLAGS.results, SECTION, body)


def define_flags() -> None:
    flags.DEFINE_integer("images", 32, "Images in the small run; the large run has growth times more.")
    flags.DEFINE_integer("growth", 4, "Ratio of the large run's image count to the small run's.")
    flags.DEFINE_integer("batch", 16, "Images per batch.")
    flags.DEFINE_list("shapes", list(SHAPES), f"Layers to measure, from {list(SHAPES)}.")
    flags.DEFINE_integer("devices", 1, "JAX devices (forced host devices when > 1).")
    flags.DEFINE_string("results", os.path.join(REPO, "bench", "RESULTS.md"), "Results file to update ('' = none).")
    flags.DEFINE_enum("data", "blobs", list(DATA), "Synthetic data: post-ReLU-like blobs or i.i.d. exponential.")
    flags.DEFINE_string("original", "", "A local checkout of davidbau/dissect: also time its tally code.")
    flags.DEFINE_enum("worker", "", ["", "jax", "jax-dense", "numpy", "original"],
                      "Internal: run one measurement in this process.")
    flags.DEFINE_enum("shape", "conv5_3", list(SHAPES), "Internal: the worker's layer shape.")
    flags.DEFINE_string("out", "", "Internal: where the worker writes its result arrays.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
