"""bench/gpu.py --smoke: the accelerator script runs end to end at tiny sizes on CPU and writes its table."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_run_writes_every_requested_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Other section\n\nkept\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--sections=progan_layer4,classifier_sweep",
                           "--dtypes=float32", f"--results={results}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert "## Other section\n\nkept" in text                     # other sections untouched
    assert "## Accelerator figures (bench/gpu.py)" in text and "SMOKE RUN" in text
    assert "| progan_layer4 | float32 | ProGAN layer4 dissection, 8 samples |" in text
    assert "| classifier_sweep | float32 | 8-unit single-unit ablation sweep, 4 images |" in text
    assert "failed" not in text


def test_unknown_section_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--sections=nope", "--results="], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "error: unknown section(s) ['nope']" in proc.stderr


def test_sections_register_with_the_decorator():
    from bench import gpu

    @gpu.section("extra_for_test")
    def extra(ctx):
        return [{"what": "x", "value": 1.0, "unit": "s", "goal": ""}]

    try:
        assert gpu.SECTIONS["extra_for_test"] is extra
        assert {"dissect_vgg16", "progan_layer4", "classifier_sweep", "ganpaint_edit", "photo_editing",
                "attacks"} <= set(gpu.SECTIONS)  # the other benchmarks' GPU figures run from the one script
    finally:
        del gpu.SECTIONS["extra_for_test"]
