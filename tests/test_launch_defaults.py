"""Issue 23: every launcher runs with no flags on the embedded demo, refuses unwritable paths in one line,
and two runs started together on an empty cache both finish with the same bytes."""

import filecmp
import os
import re
import subprocess
import sys
import time

import pytest

from launch import common
from launcher_cli import TINY, cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# launcher -> what its no-flag run writes (relative to the working folder)
DEFAULT_OUTPUTS = {
    "check_model": ["grid.png"],
    "unit_plot": ["results/unit_plot-demo-conv4-best/unit_plot.png"],
    "ablate_classifier": ["results/ablate_classifier-demo-conv4/summary.json",
                          "results/ablate_classifier-demo-conv4/ice-all-classes.png"],
    "adversarial": ["results/adversarial-demo-conv4/adversarial.json",
                    "results/adversarial-demo-conv4/adversarial.png"],
    "shape_bias": ["results/shape_bias-demo/shape_bias.json", "results/shape_bias-demo/shape_bias.png"],
    "stylize": ["results/stylize-demo"],
    "compare": ["results/compare-demo-random_init-bases-synthetic-dataset/index.html"],
    "intervene_generator": ["results/intervene_generator-toy-layer4/summary.json"],
    "edit_photo": ["results/edit_photo-toy/side_by_side.png"],
}
LAUNCHERS = ["dissect", "compare", "check_model", "unit_plot", "ablate_classifier", "adversarial", "shape_bias",
             "stylize", "intervene_generator", "edit_photo", "ganpaint"]


SLOW = ("ablate_classifier", "adversarial", "compare", "edit_photo", "intervene_generator", "shape_bias",
        "stylize")   # over 5 s


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(DEFAULT_OUTPUTS)])
def test_no_flags_runs_the_demo(name, user):
    code, out, err = cli(name)
    assert code == 0, err[-3000:]
    assert "Traceback" not in out + err
    for path in DEFAULT_OUTPUTS[name]:
        assert os.path.exists(user / path), (path, out, err[-2000:])
    if name == "stylize":
        written = [f for _, _, files in os.walk(user / DEFAULT_OUTPUTS[name][0]) for f in files]
        assert len(written) == 16 and all("-stylized-painting-" in f for f in written)
    if name == "check_model":  # item 5: the class names of model.json, not output numbers
        assert re.search(r"top-5 classes (kitchen|bedroom|street|forest|beach|office) \(0\.", out), out
    if name == "edit_photo":   # item 5: each PSNR said once
        assert (out + err).count("inversion PSNR") == 1 and (out + err).count("adapted reconstruction PSNR") == 1


def test_no_flags_through_python_m(demo_cache, tmp_path):
    """The absl wiring of one launcher as the user types it."""
    env = dict(os.environ, PYTHONPATH=REPO, JAXDISSECT_CACHE=demo_cache)
    env.pop("JAX_PLATFORMS", None)
    out = subprocess.run([sys.executable, "-m", "launch.check_model"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert (tmp_path / "grid.png").exists() and "top-5 classes" in out.stdout


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    """A folder nobody can write, root included: a read-only tmpfs where mounting is allowed, else /sys."""
    folder = tmp_path_factory.mktemp("read-only")
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        yield str(folder)
        os.chmod(folder, 0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    yield str(folder) if mounted else "/sys"   # sysfs: no new files, even for root
    if mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


def _output_flag(name):
    return {"check_model": "--output", "stylize": "--output", "ganpaint": None}.get(name, "--output_dir")


def _one_line_error(code, out, err, path):
    assert code in (common.EXIT_ERROR, common.EXIT_USAGE), (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert path in err, err
    assert "Traceback" not in out + err


@pytest.mark.parametrize("name", LAUNCHERS)
def test_unwritable_paths_are_one_line_errors(name, read_only, tmp_path, monkeypatch):
    """Read-only output folder, read-only cache, a file as output folder: one line naming the path, no traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXDISSECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    flag = _output_flag(name)
    target = os.path.join(read_only, "out")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [(f"--cache_dir={os.path.join(read_only, 'cache')}", os.path.join(read_only, "cache"))]
    if flag == "--output" and name == "check_model":
        cases += [(f"--output={target}/grid.png", target), (f"--output={a_file}/grid.png", str(a_file))]
    elif flag:
        cases += [(f"{flag}={target}", target), (f"{flag}={a_file}", str(a_file))]
    for arg, path in cases:
        code, out, err = cli(name, arg)
        _one_line_error(code, out, err, path)
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")   # refused before any work


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_waits_then_finds_the_results(user):
    """Two runs into one output folder: the second waits for the first's lock (saying so), then resumes."""
    out_dir = user / "results" / "unit_plot-demo-conv4-best"
    code, first, _ = cli("unit_plot")
    assert code == 0
    before = {f: (out_dir / f).read_bytes() for f in ("unit_plot.json", "unit_plot.npz", "unit_plot.png")}
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from jaxdissect import fileio\n"
        f"with fileio.lock({str(out_dir / '.launch.json.lock')!r}, log=print):\n"
        "    print('held', flush=True); time.sleep(3)")], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.time()
    code, second, err = cli("unit_plot")
    holder.wait(timeout=60)
    assert code == 0 and "waiting for the run writing" in err and time.time() - start > 1.0, err
    assert second.splitlines()[0] == first.splitlines()[0]
    assert before == {f: (out_dir / f).read_bytes() for f in before}


def _run_together(commands, cwd, env, timeout=600):
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outputs)]


def _same_files(a, b, skip=("launch.json", ".launch.json.lock", "work")):
    cmp = filecmp.dircmp(a, b, ignore=list(skip))
    assert not cmp.left_only and not cmp.right_only, (cmp.left_only, cmp.right_only)
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    for sub in cmp.common_dirs:
        _same_files(os.path.join(a, sub), os.path.join(b, sub), skip)


@pytest.mark.slow
def test_two_launcher_runs_on_an_empty_cache_both_finish_with_the_same_bytes(tmp_path):
    """`python -m launch.intervene_generator` twice at once, an empty cache: one builds the toy dissection,
    the other waits for it; both finish, with byte-identical results."""
    env = dict(os.environ, PYTHONPATH=REPO, JAXDISSECT_CACHE=str(tmp_path / "cache"), JAXDISSECT_PROGRESS="0")
    env.pop("JAX_PLATFORMS", None)
    command = [sys.executable, "-m", "launch.intervene_generator"]
    runs = _run_together([command, command + ["--output_dir=other"]], tmp_path, env)
    for code, out, err in runs:
        assert code == 0 and "Traceback" not in err, err[-3000:]
    assert sum("waiting for the toy generator's dissection" in err for _, _, err in runs) <= 1
    _same_files(tmp_path / "results" / "intervene_generator-toy-layer4", tmp_path / "other")


@pytest.mark.slow
def test_two_trainings_of_the_demo_model_at_once_build_it_once(tmp_path):
    """The demo model on an empty cache from two processes: one trains, the other waits and loads the same model."""
    code = ("import os, sys, time, hashlib, numpy as np, jax; from jaxdissect.pipelines import train_synthetic as t\n"
            f"ready = {str(tmp_path / 'ready')!r}\n"
            "open(f'{ready}-{os.getpid()}', 'w').close()\n"   # start together: each waits until both are ready
            f"while len([n for n in os.listdir({str(tmp_path)!r}) if n.startswith('ready-')]) < 2: time.sleep(0.05)\n"
            f"m, v, info = t.train_or_load({str(tmp_path / 'cache')!r}, progress=False, log=lambda m: print(m, file=sys.stderr), "
            f"**{TINY!r})\n"
            "print(info['cached'], hashlib.sha256(b''.join(np.asarray(a).tobytes() "
            "for a in jax.tree.leaves(v))).hexdigest())")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    (tmp_path / "cache").mkdir()
    runs = _run_together([[sys.executable, "-c", code]] * 2, REPO, env)
    for rc, out, err in runs:
        assert rc == 0, err[-3000:]
    results = sorted(out.split() for _, out, _ in runs)
    assert [r[0] for r in results] == ["False", "True"] and results[0][1] == results[1][1]
    waited = [err for _, out, err in runs if out.startswith("True")][0]
    assert "waiting for the demo model" in waited


@pytest.mark.slow
def test_two_runs_creating_one_segmentation_cache_entry_at_once(tmp_path):
    """Two processes open, fill and read the same segmentation cache entry at the same moment: both succeed and
    read the labels that either wrote (the entry file and chunks are written atomically, the same bytes)."""
    code = ("import os, sys, time, numpy as np\n"
            "from jaxdissect.segmentation import cache as segcache\n"
            f"root = {str(tmp_path / 'cache')!r}\n"
            f"open(os.path.join({str(tmp_path)!r}, f'ready-{{os.getpid()}}'), 'w').close()\n"
            f"while len([n for n in os.listdir({str(tmp_path)!r}) if n.startswith('ready-')]) < 2: time.sleep(0.01)\n"
            "tables = dict(label_names=['-', 'a', 'b'], label_categories=['-', 'c', 'c'], categories=['c'])\n"
            "labels = np.random.default_rng(0).integers(0, 3, (40, 2, 8, 8)).astype(np.int32)\n"
            "cache = segcache.open_cache(root, {'data': 'x'}, tables, 2, (8, 8), log=lambda m: None)\n"
            "cache.store(np.arange(40), labels)\n"
            "cache.flush()\n"
            "again = segcache.open_cache(root, {'data': 'x'}, tables, 2, (8, 8), log=lambda m: None)\n"
            "assert (again.lookup(np.arange(40)) == labels).all()\n"
            "print('ok')")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    runs = _run_together([[sys.executable, "-c", code]] * 2, REPO, env)
    for rc, out, err in runs:
        assert rc == 0 and out.strip() == "ok", err[-3000:]
    entries = os.listdir(tmp_path / "cache" / "segmentation")
    assert len(entries) == 1
