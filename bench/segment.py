"""Benchmark: unified-parsing segmenter throughput, Flax (jit) vs the PyTorch reference, side by side.

    python -m bench.segment [--batch=4] [--repeats=3] [--results=bench/RESULTS.md]

Both run the same random weights (a fake published checkpoint converted with
``converters.segmenter``) on the same CPU: 256x256 preprocessed inputs, full
forward to object/material/part logits at 64x64 (the dissection setting for
224-pixel images is 56x56; 64 keeps the comparison round). The PyTorch side
is the test reference (``tests/torch_segmenter_reference.py``), whose precise
RoI pooling is a Python loop standing in for the original CUDA kernel; it is
a small share of the time at these sizes. Figures go to the
``## Segmenter (bench/segment.py)`` section of the results file (replaced on
each run, other sections left alone).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np
import torch
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from bench.results import write_section  # noqa: E402
import torch_segmenter_reference as R  # noqa: E402

from jaxdissect.convert import segmenter as converter  # noqa: E402
from jaxdissect.checkpoint import load_model  # noqa: E402


SECTION = "## Segmenter (bench/segment.py)"
SIZE, SEG = 256, (64, 64)


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run(batch: int, repeats: int) -> dict:
    """Convert a fake checkpoint, then time both implementations; returns the figures."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = R.make_upp_checkpoint(os.path.join(tmp, "published"))
        converter.convert(paths["encoder"], paths["decoder"], paths["labels"], os.path.join(tmp, "converted"))
        module, variables = load_model(os.path.join(tmp, "converted"))
        encoder, decoder = R.load_upp_reference(paths)

    x = np.random.default_rng(0).normal(scale=60.0, size=(batch, SIZE, SIZE, 3)).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    forward = jax.jit(lambda v, x: module.apply(v, x, SEG))
    xj = jax.device_put(x)
    start = time.perf_counter()
    ours = jax.block_until_ready(forward(variables, xj))
    compile_s = time.perf_counter() - start
    flax_s = _timed(lambda: jax.block_until_ready(forward(variables, xj)), repeats)

    theirs = R.upp_reference_forward(encoder, decoder, xt, SEG)[1]
    torch_s = _timed(lambda: R.upp_reference_forward(encoder, decoder, xt, SEG), repeats)
    encoder, decoder = (m.to(memory_format=torch.channels_last) for m in (encoder, decoder))
    xt = xt.contiguous(memory_format=torch.channels_last)
    R.upp_reference_forward(encoder, decoder, xt, SEG)
    torch_cl_s = _timed(lambda: R.upp_reference_forward(encoder, decoder, xt, SEG), repeats)

    ref = R.to_nhwc(theirs["object"])
    err = float(np.abs(np.asarray(ours["object"]) - ref).max() / np.abs(ref).max())
    return {"batch": batch, "repeats": repeats, "flax_ips": batch / flax_s, "torch_ips": batch / torch_s,
            "torch_cl_ips": batch / torch_cl_s,
            "compile_s": compile_s, "object_rel_err": err, "load": load}


def report(r: dict) -> str:
    return "\n".join([
        SECTION,
        "",
        f"Unified-parsing segmenter (ResNet-50 + UPerNet), {SIZE}x{SIZE} input, logits resized to "
        f"{SEG[0]}x{SEG[1]}, batch {r['batch']}, float32, median of {r['repeats']} runs, same random weights, "
        f"one process ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, torch {torch.__version__}; load average {r['load']:.1f} at the start, "
        "so absolute rates on this shared machine are low and noisy, the ratio less so).",
        "",
        "| implementation | images/s |",
        "|---|---|",
        f"| Flax, jit (this package; XLA_FLAGS `{os.environ.get('XLA_FLAGS', '')}`) | {r['flax_ips']:.2f} |",
        f"| PyTorch reference (tests/torch_segmenter_reference.py) | {r['torch_ips']:.2f} |",
        f"| PyTorch reference, channels_last | {r['torch_cl_ips']:.2f} |",
        "",
        f"Ratio Flax / PyTorch: {r['flax_ips'] / r['torch_ips']:.2f} "
        f"({r['flax_ips'] / r['torch_cl_ips']:.2f} against channels_last). "
        f"Flax first call (compile + one run) {r['compile_s']:.1f} s. "
        f"Object logits agree to max relative error {r['object_rel_err']:.1e}.",
        "",
    ])


FLAGS = flags.FLAGS


def main(argv):
    del argv
    from jaxdissect.models import set_cpu_xla_flags

    set_cpu_xla_flags()  # as the launchers do, before JAX's first computation
    r = run(FLAGS.batch, FLAGS.repeats)
    body = report(r)
    print(body)
    write_section(FLAGS.results, SECTION, body)


def define_flags() -> None:
    flags.DEFINE_integer("batch", 4, "Images per forward pass.")
    flags.DEFINE_integer("repeats", 3, "Timed forward passes per implementation (after one warm-up).")
    flags.DEFINE_string("results", os.path.join(REPO, "bench", "RESULTS.md"), "Results file to update.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
