"""launch.common, the shared launcher behaviour: flags checked before work, one-line errors, Ctrl-C, output dirs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import common
from launch import dissect as launcher
from launcher_cli import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A cheap demo model (32-pixel scenes, 20 steps): the launchers' code path without the two-minute training.
TINY_DEMO = dict(num_train=64, num_test=32, steps=20, batch_size=16, widths=[8, 8, 8, 8], image_size=32)


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("JAX_PLATFORMS", None)   # launch.common picks the CPU itself when no accelerator is present
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One demo-model cache for the module's tests (the tiny model trains once)."""
    return str(tmp_path_factory.mktemp("cache"))


def _config(**kw):
    base = dict(model=None, layers=None, data=None, segmenter=None, quantile=0.01, miniou=0.04, topk=5,
                thumbsize=20, batch_size=4, output_dir=None, cache_dir=None, num_images=None,
                on_bad_image="raise", checkpoint_every=50, overwrite=False, geometry="original",
                row0_competes=False, quad_quirk=True, faithful_color_blank=False, coordinator_address=None,
                num_processes=None, process_id=None, demo_settings=TINY_DEMO)
    base.update(kw)
    return base


@pytest.mark.parametrize("flag, message", [
    ("--data=synthetic:abc", "count after synthetic: must be a positive integer"),
    ("--data=synthetic:-5", "count after synthetic: must be a positive integer"),
    ("--data=imagenet:/x", "unknown kind 'imagenet'"),
    ("--data=folder:", "give the folder"),
    ("--topk=0", "--topk=0: must be a positive integer"),
    ("--thumbsize=0", "--thumbsize=0: must be a positive integer"),
    ("--checkpoint_every=0", "--checkpoint_every=0: must be a positive integer"),
    ("--num_images=0", "--num_images=0: must be a positive integer"),
    ("--batch_size=0", "--batch_size=0: must be a positive integer"),
    ("--quantile=1.5", "--quantile=1.5: must lie in (0, 1)"),
    ("--layers=conv9", "unknown layer 'conv9'"),
])
def test_bad_flags_fail_before_any_work(flag, message, tmp_path):
    """Each bad value is a LaunchError raised before the demo model trains (the cache stays empty)."""
    name, _, value = flag[2:].partition("=")
    cache = tmp_path / "cache"
    value = {"topk": int, "thumbsize": int, "checkpoint_every": int, "num_images": int, "batch_size": int,
             "quantile": float}.get(name, str)(value)
    with pytest.raises(common.LaunchError) as e:
        launcher.run(_config(**{name: value}, cache_dir=str(cache), output_dir=str(tmp_path / "out")))
    assert message in str(e.value)
    assert not cache.exists() or not os.listdir(cache)


def test_cli_errors_are_one_line_and_help_exits_0(tmp_path):
    """In process (tests/launcher_cli.py); test_launch_defaults runs one launcher through ``python -m``."""
    def dissect(*args):
        return cli("dissect", *args, f"--cache_dir={tmp_path}")

    code, out, err = dissect("--topk=0")
    assert code in (1, 2) and err == "error: --topk=0: must be a positive integer\n"
    code, out, err = dissect("--topk=abc")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    code, out, err = dissect("--help")
    assert code == 0 and "--data:" in out and "--overwrite:" in out
    code, out, err = cli("check_model", "--model=/nonexistent")
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err


def test_output_dir_refused_unless_same_run_or_overwrite(tmp_path, cache):
    out = tmp_path / "out"
    (out / "conv1").mkdir(parents=True)
    (out / "conv1" / "report.json").write_text("my own file")
    config = _config(data="synthetic:8", segmenter="dataset", layers="conv4", output_dir=str(out),
                     cache_dir=cache)
    with pytest.raises(common.LaunchError, match="not empty.*--overwrite"):
        launcher.build(config)
    assert (out / "conv1" / "report.json").read_text() == "my own file"
    (out / "work").mkdir()
    launcher.build(dict(config, overwrite=True))          # the user asked for it: the old run's state goes
    assert not (out / "work").exists() and (out / "conv1" / "report.json").exists()   # the rest is rewritten
    launcher.build(config)                                 # the same configuration again: resumes
    with pytest.raises(common.LaunchError, match="differing: quantile"):
        launcher.build(dict(config, quantile=0.02))


def test_compilation_cache_in_the_user_cache_unless_jax_is_told_otherwise(tmp_path, monkeypatch):
    import jax

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("JAXDISSECT_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("JAX_ENABLE_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/else")
    assert common.compilation_cache() is None and jax.config.jax_compilation_cache_dir == before
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    try:
        assert common.compilation_cache() == str(tmp_path / "c" / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c" / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_one_per_user_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("JAXDISSECT_CACHE", raising=False)
    assert common.default_cache_dir() == str(tmp_path / "xdg" / "jaxdissect")
    for out in ("a/one", "b/two"):   # two output locations, one training
        launcher.build(_config(data="synthetic:8", segmenter="dataset", layers="conv4",
                               output_dir=str(tmp_path / out)))
    err = capsys.readouterr().err
    assert err.count("train_synthetic: loaded") == 1
    assert [n for n in os.listdir(tmp_path / "xdg" / "jaxdissect") if not n.startswith(".")]


def test_demo_reads_a_folder_with_its_own_preprocessing(tmp_path, cache):
    """--data=folder: for the demo reads images as the demo model was trained; a bad file is skipped."""
    from PIL import Image

    from jaxdissect.data.synthetic import SyntheticScenes

    scenes = SyntheticScenes(3, seed=0, size=32)
    batch = scenes.get_batch([0, 1, 2])
    folder = tmp_path / "images"
    folder.mkdir()
    for i, d in enumerate(batch["display"]):
        Image.fromarray(d).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not an image")
    built = launcher.build(_config(data=f"folder:{folder}", segmenter="dataset", layers="conv4",
                                   on_bad_image="skip", output_dir=str(tmp_path / "out"), cache_dir=cache))
    got = built["data"].get_batch([0, 1, 2, 3])
    np.testing.assert_array_equal(got["image"][:3], batch["image"])
    assert got["valid"].tolist() == [True, True, True, False]


def _checkpoints(output_dir):
    d = os.path.join(output_dir, "work", "pass1", "checkpoints")
    return [n for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []


@pytest.mark.slow
def test_ctrl_c_exits_130_in_one_line_and_resumes_to_the_same_bytes(tmp_path):
    from jaxdissect.checkpoint import save_model
    from jaxdissect.pipelines import train_synthetic

    module, shapes = train_synthetic.abstract_model(widths=(8, 8, 8, 8), image_size=64)
    rng = np.random.default_rng(0)
    import jax

    variables = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.3).astype(np.float32), shapes)
    model = str(tmp_path / "model")
    save_model(model, module, variables, metadata={"model": "tiny", "preprocessing": train_synthetic.preprocessing()})

    def command(out):
        return [sys.executable, "-m", "launch.dissect", f"--model={model}", "--data=synthetic:24",
                "--layers=conv3,conv4", "--batch_size=2", "--checkpoint_every=1", "--topk=3", "--thumbsize=16",
                f"--output_dir={out}"]

    # The launchers keep compiled programs in the per-user cache (here JAXDISSECT_CACHE), every entry written.
    env = _env(JAXDISSECT_CACHE=str(tmp_path / "user_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    done = subprocess.run(command(full), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(os.listdir(tmp_path / "user_cache" / "xla")) > 3     # the compiled model, kernels, ...
    assert done.stdout.count("report: ") == 1 and "report: " not in done.stderr
    assert "Unable to initialize backend" not in done.stderr and "] " not in done.stderr  # no absl prefixes

    proc = subprocess.Popen(command(stopped), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 300
        while not _checkpoints(stopped) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith("interrupted: dissect pass1 checkpointed after batch") and stopped in last, last

    again = subprocess.run(command(stopped), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming at batch" in again.stderr
    for layer in ("conv3", "conv4"):
        for name in ("report.json", "arrays.npz"):
            with open(os.path.join(full, layer, name), "rb") as a, open(os.path.join(stopped, layer, name), "rb") as b:
                assert a.read() == b.read(), (layer, name)
    assert json.load(open(os.path.join(stopped, "launch.json")))["layers"] == ["conv3", "conv4"]
    # The page marks units that never fire (no pixel above threshold) and those below the IoU cut-off.
    page = open(os.path.join(full, "index.html"), encoding="utf-8").read()
    data = json.loads(page.split('id="report-data">', 1)[1].split("</script>", 1)[0])
    for layer in data["layers"]:
        with np.load(os.path.join(full, layer["name"], "arrays.npz")) as arrays:
            assert [u["dead"] for u in layer["units"]] == (arrays["active"] == 0).tolist()
            assert [u["interpretable"] for u in layer["units"]] == arrays["interpretable"].tolist()
        assert all(u["label"] == "" for u in layer["units"] if u["dead"])


@pytest.mark.slow
def test_demo_training_resumes_after_a_stop_to_the_same_weights(tmp_path):
    """Stopped mid-training (as Ctrl-C does), the demo's training resumes and ends where a straight run does."""
    import jax

    from jaxdissect import streaming
    from jaxdissect.pipelines import train_synthetic

    settings = dict(num_train=32, num_test=8, steps=12, batch_size=8, widths=(4, 4, 4, 4), image_size=32)
    _, straight, _ = train_synthetic.train(**settings, log=None, progress=False)   # no checkpoints at all
    original_run_stream = streaming.run_stream

    def stop_after_five(step, state, batches, **kw):
        def stepping(st, b):
            if stepping.n == 5:
                streaming.request_stop()
            stepping.n += 1
            return step(st, b)
        stepping.n = 0
        return original_run_stream(stepping, state, batches, **kw)

    streaming.run_stream = stop_after_five
    try:
        with pytest.raises(streaming.Interrupted, match="checkpointed after batch 6 of 12"):
            train_synthetic.train(**settings, log=None, workdir=str(tmp_path / "b"), progress=False)
    finally:
        streaming.run_stream = original_run_stream
    _, resumed, _ = train_synthetic.train(**settings, log=None, workdir=str(tmp_path / "b"), progress=False)
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)


@pytest.mark.slow
def test_demo_does_not_import_torch(tmp_path):
    code = ("import sys; from launch import dissect as d; "
            f"d.build(dict(data='synthetic:4', segmenter='dataset', layers='conv4', output_dir={str(tmp_path / 'o')!r}, "
            f"cache_dir={str(tmp_path / 'c')!r}, demo_settings=dict(num_train=16, num_test=8, steps=2, batch_size=8, "
            "widths=[4, 4, 4, 4], image_size=32))); "
            "assert 'torch' not in sys.modules, 'the demo imported torch'")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


# One bad flag per launcher written before launch.common (each must fail before any JAX work) and its --help.
PORTED = [
    ("compare", ["--models=m", "--quantile=2"], "--quantile=2.0: must lie in (0, 1)"),
    ("adversarial", ["--model=m", "--data=places:d", "--ablation=a", "--num_images=0"],
     "--num_images=0: must be a positive integer"),
    ("unit_plot", ["--model=m", "--layer=conv1", "--unit=0", "--data=synthetic:abc"],
     "count after synthetic: must be a positive integer"),
    ("stylize", ["--model=m", "--content=c", "--styles=s", "--alpha=2"], "--alpha=2.0: must lie in [0, 1]"),
    ("shape_bias", ["--model=m", "--original=o", "--stylized=s", "--batch_size=0"],
     "--batch_size=0: must be a positive integer"),
    ("edit_photo", ["--strength=abc"], "--strength=abc: give a unit count"),
    ("ganpaint", ["--port=-1"], "--port=-1: give a port in 0..65535"),
]


@pytest.mark.parametrize("name, args, message", PORTED, ids=[p[0] for p in PORTED])
def test_ported_launchers_one_line_errors_and_help(name, args, message, tmp_path):
    out_flag = "--output" if name == "stylize" else "--output_dir"
    extra = [] if name == "ganpaint" else [f"{out_flag}={tmp_path / 'out'}"]
    code, out, err = cli(name, *args, *extra)
    assert code == common.EXIT_ERROR, err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists()  # nothing was started
    code, out, err = cli(name, "--help")
    flag = args[-1].partition("=")[0]
    assert code == 0 and f"\n  {flag}: " in out and err == "", out
