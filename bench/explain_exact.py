"""Benchmark: exact formula search (``compositional(..., exact=True)``) at the bench/explain.py size.

    python -m bench.explain_exact [--images=300] [--units=512] [--concepts=1024] [--baseline_commit=]
                                  [--baseline_units=16] [--results=bench/RESULTS.md]

Same synthetic Broden-like masks as bench/explain.py. Times the branch and
bound on all units (compilation excluded: both sides are warmed on two units
first), checks it is never worse than the beam, and with ``--baseline_commit``
also times that commit's ``jaxdissect/explain/compositional.py`` (read with
``git show``) on the first ``--baseline_units`` units, side by side in the
same process, and compares their IoUs.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

SECTION = "## Exact formula search (bench/explain_exact.py)"


def _baseline(commit: str):
    text = subprocess.run(["git", "show", f"{commit}:jaxdissect/explain/compositional.py"], check=True,
                          capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "baseline_compositional.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("baseline_compositional", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.compositional


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main(argv):
    del argv
    import jax

    from bench.explain import build_data
    from bench.results import write_section
    from jaxdissect.explain import SparseMasks, compositional
    from jaxdissect.models import set_cpu_xla_flags
    set_cpu_xla_flags()
    f = FLAGS
    load0 = os.getloadavg()
    cm, um, _, _ = build_data(f.images, f.units, f.concepts)
    names = [f"c{i}" for i in range(f.concepts)]
    dense_units = um.to_dense()

    def units(k):
        return SparseMasks.from_dense(dense_units[:k], cm.block_words)

    compositional(units(2), cm, names, length=3, exact=True)                     # compile
    beam, beam_wall, _ = _timed(lambda: compositional(um, cm, names, length=3))
    exact, wall, cpu = _timed(lambda: compositional(um, cm, names, length=3, exact=True))
    load1 = os.getloadavg()
    gain = np.asarray([e.iou - b.iou for e, b in zip(exact, beam)])
    print(f"exact: {f.units} units in {wall:.1f} s wall, {cpu:.1f} CPU s; beam {beam_wall:.1f} s")
    lines = [
        f"{SECTION}\n",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs shared with other jobs (load average {load0[0]:.1f} at the start, {load1[0]:.1f} "
        f"after the exact run: the machine was busy, wall times are noisy), jax {jax.__version__}, JAX device "
        f"{jax.devices()[0].platform}. Data of bench/explain.py: {f.images} images of 56x56, {f.concepts} "
        f"concepts, {f.units} units; length 3, beam 5 as the first incumbent; compilation excluded.\n",
        f"- Exact mode, all {f.units} units: {wall:.1f} s wall, {cpu:.1f} CPU s ({wall / f.units:.2f} s per unit); "
        f"the beam search on the same units {beam_wall:.1f} s wall. Exact is better than the beam on "
        f"{int((gain > 0).sum())} of {f.units} units (largest IoU gain {gain.max():+.3f}), never worse "
        f"(min gain {gain.min():+.1e}).",
    ]
    if f.baseline_commit:
        old = _baseline(f.baseline_commit)
        k = f.baseline_units
        old(units(2), cm, names, length=3, exact=True)                           # compile
        ref, old_wall, old_cpu = _timed(lambda: old(units(k), cm, names, length=3, exact=True))
        new, new_wall, new_cpu = _timed(lambda: compositional(units(k), cm, names, length=3, exact=True))
        load2 = os.getloadavg()
        same = sum(a.iou == b.iou for a, b in zip(ref, new))
        print(f"baseline {f.baseline_commit}: {k} units {old_wall:.1f} s wall; now {new_wall:.1f} s")
        lines.append(
            f"- Side by side on units 0-{k - 1} (load average {load2[0]:.1f} after): the exact mode of commit "
            f"{f.baseline_commit[:7]} {old_wall:.1f} s wall / {old_cpu:.1f} CPU s, this one {new_wall:.1f} s wall / "
            f"{new_cpu:.1f} CPU s ({old_cpu / max(new_cpu, 1e-9):.0f}x in CPU time, {old_wall / new_wall:.0f}x in "
            f"wall time); the same IoU on {same} of {k} units.")
    body = "\n".join(lines) + "\n"
    print(body)
    if f.results:
        write_section(f.results, SECTION, body)


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_integer("images", 300, "synthetic images (56 x 56 positions each)")
    flags.DEFINE_integer("units", 512, "units explained")
    flags.DEFINE_integer("concepts", 1024, "concepts (11 colours, the rest objects)")
    flags.DEFINE_string("baseline_commit", "", "also time this commit's exact mode (git show) side by side")
    flags.DEFINE_integer("baseline_units", 16, "units timed on the baseline side")
    flags.DEFINE_string("results", "bench/RESULTS.md", "results file to update ('' to only print)")
    FLAGS = flags.FLAGS
    app.run(main)
