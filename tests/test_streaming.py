"""Resumable streams: a run killed with SIGKILL and restarted gives the uninterrupted result."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import streaming

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_BATCHES = 40

# An order-sensitive toy stream: a histogram plus a running polynomial hash of
# the batch sums, so a skipped, repeated or reordered batch changes the result.
TOY_STREAM = """
import json, os, signal, sys, time
import jax, jax.numpy as jnp, numpy as np
from jaxdissect import streaming

# Ctrl-C raises KeyboardInterrupt even when started from a shell that ignores SIGINT for background jobs.
signal.signal(signal.SIGINT, signal.default_int_handler)

workdir, sleep, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
every = int(sys.argv[4]) if len(sys.argv) > 4 else 4
num_batches = 40
data = np.random.RandomState(0).randint(0, 64, (num_batches, 16)).astype(np.int32)

def step(state, batch):
    h = (state["hash"] * 1000003 + batch.sum()) % 2147483647
    return {"hist": state["hist"].at[batch].add(1), "hash": h}

starts = []
def batches(start):
    starts.append(start)
    for i in range(start, num_batches):
        if i == start + 3:  # three batches folded in
            open(out + ".running", "w").close()
        time.sleep(sleep)
        yield data[i]

state = {"hist": jnp.zeros(64, jnp.int32), "hash": jnp.zeros((), jnp.int64)}
final = streaming.run_stream(jax.jit(step, donate_argnums=0), state, batches, num_batches=num_batches,
                             workdir=workdir, config={"data": "toy", "bins": 64}, checkpoint_every=every)
with open(out, "w") as f:
    json.dump({"hist": np.asarray(final["hist"]).tolist(), "hash": int(final["hash"]), "starts": starts}, f)
"""


def reference(num_batches=NUM_BATCHES):
    data = np.random.RandomState(0).randint(0, 64, (num_batches, 16))
    h = 0
    for b in data:
        h = (h * 1000003 + int(b.sum())) % 2147483647
    return {"hist": np.bincount(data.ravel(), minlength=64).tolist(), "hash": h}


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "toy_stream.py"
    path.write_text(TOY_STREAM)
    return str(path)


def _env(x64=True):
    """Subprocess environment; the toy stream's hash needs 64-bit integers."""
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", JAX_ENABLE_X64="1" if x64 else "0",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(script, workdir, sleep, out, *extra):
    proc = subprocess.run([sys.executable, script, str(workdir), str(sleep), str(out), *extra],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def _checkpoints(workdir):
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


@pytest.mark.slow
def test_killed_stream_resumes_to_the_identical_result(script, tmp_path):
    workdir, out = tmp_path / "work", tmp_path / "out.json"
    proc = subprocess.Popen([sys.executable, script, str(workdir), "0.05", str(out)], env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while len(_checkpoints(workdir)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
            assert time.time() < deadline, "no checkpoints written"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = _checkpoints(workdir)[-1]
    assert 0 < killed_at < NUM_BATCHES and not out.exists()
    # The lock of the killed process is still there and is taken over.
    assert os.path.exists(workdir / "lock.pid")

    resumed = _run(script, workdir, 0, out)
    assert resumed["starts"][0] >= killed_at > 0
    expected = reference()
    assert resumed["hist"] == expected["hist"]
    assert resumed["hash"] == expected["hash"]
    assert not os.path.exists(workdir / "lock.pid")

    # A finished stream is restored, not recomputed.
    again = _run(script, workdir, 0, tmp_path / "again.json")
    assert again["starts"] == []
    assert again["hist"] == expected["hist"] and again["hash"] == expected["hash"]


@pytest.mark.slow
def test_interrupted_stream_saves_its_progress(script, tmp_path):
    workdir, out = tmp_path / "work", tmp_path / "out.json"
    # No periodic checkpoints: any checkpoint comes from the Ctrl-C handler.
    proc = subprocess.Popen([sys.executable, script, str(workdir), "0.05", str(out), "1000"], env=_env(),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not os.path.exists(str(out) + ".running"):
            assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=60)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in stderr
    saved = _checkpoints(workdir)
    assert len(saved) == 1 and 0 < saved[0] < NUM_BATCHES
    resumed = _run(script, workdir, 0, out, "1000")
    assert resumed["starts"] == [saved[0]]
    expected = reference()
    assert resumed["hist"] == expected["hist"] and resumed["hash"] == expected["hash"]


def _toy(state, batch):
    return {"hist": state["hist"].at[batch].add(1)}


def _batches(data):
    return lambda start: iter(data[start:])


def test_different_config_is_refused_naming_keys_and_directory(tmp_path):
    data = np.random.RandomState(1).randint(0, 8, (6, 4)).astype(np.int32)
    state = {"hist": jnp.zeros(8, jnp.int32)}
    kwargs = dict(num_batches=6, workdir=str(tmp_path), checkpoint_every=2)
    out = streaming.run_stream(jax.jit(_toy), state, _batches(data), config={"data": "a", "q": 0.99}, **kwargs)
    np.testing.assert_array_equal(out["hist"], np.bincount(data.ravel(), minlength=8))
    with pytest.raises(streaming.StreamError) as err:
        streaming.run_stream(jax.jit(_toy), state, _batches(data), config={"data": "a", "q": 0.995}, **kwargs)
    message = str(err.value)
    assert "q (stored 0.99, now 0.995)" in message and str(tmp_path) in message and "Delete" in message
    with pytest.raises(streaming.StreamError, match="num_batches"):
        streaming.run_stream(jax.jit(_toy), state, _batches(data), config={"data": "a", "q": 0.99},
                             **dict(kwargs, num_batches=5))


def test_check_hook_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path):
    data = np.ones((10, 4), np.int32)
    data[5, 0] = 7   # the "bad" batch
    state = {"hist": jnp.zeros(8, jnp.int32)}

    def check(s, batch_index):
        if int(np.asarray(s["hist"])[7]):
            raise FloatingPointError(f"bad value found in batches up to {batch_index}")

    with pytest.raises(FloatingPointError, match="up to 5"):
        streaming.run_stream(jax.jit(_toy), state, _batches(data), num_batches=10, workdir=str(tmp_path),
                             config={}, checkpoint_every=3, check=check)
    assert _checkpoints(tmp_path) == [3]
    assert not os.path.exists(tmp_path / "lock.pid")


def test_too_few_batches_is_a_clear_error(tmp_path):
    state = {"hist": jnp.zeros(8, jnp.int32)}
    with pytest.raises(streaming.StreamError, match="ended after batch 2; 5 were expected"):
        streaming.run_stream(jax.jit(_toy), state, _batches(np.zeros((3, 2), np.int32)), num_batches=5,
                             workdir=str(tmp_path), config={})


def test_changed_state_layout_is_a_clear_error(tmp_path):
    data = np.zeros((4, 2), np.int32)
    streaming.run_stream(jax.jit(_toy), {"hist": jnp.zeros(8, jnp.int32)}, _batches(data), num_batches=4,
                         workdir=str(tmp_path), config={})
    with pytest.raises(streaming.StreamError, match="delete"):
        streaming.run_stream(jax.jit(_toy), {"hist": jnp.zeros(9, jnp.int32)}, _batches(data), num_batches=4,
                             workdir=str(tmp_path), config={})


def test_workdir_lock_markers_and_paths(tmp_path):
    wd = streaming.Workdir(str(tmp_path / "w"))
    assert wd.path("a/b.npz") == str(tmp_path / "w" / "a" / "b.npz")
    assert os.path.isdir(tmp_path / "w" / "a")
    assert not wd.done("quantile")
    wd.mark_done("quantile")
    assert wd.done("quantile") and streaming.Workdir(str(tmp_path / "w")).done("quantile")
    with wd:
        with open(tmp_path / "w" / "lock.pid") as f:
            assert f.read().strip() == f"{os.getpid()}@{socket.gethostname()}"
        with pytest.raises(streaming.WorkdirLocked, match="in use by"):
            streaming.Workdir(str(tmp_path / "w")).lock()
    assert not os.path.exists(tmp_path / "w" / "lock.pid")
    # A lock held by a live process on another host is respected.
    (tmp_path / "w" / "lock.pid").write_text("1@some-other-host\n")
    with pytest.raises(streaming.StreamError, match="some-other-host"):
        wd.lock()
    # A second worker on a stream's directory is refused before touching it.
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "lock.pid").write_text(f"{os.getppid()}@{socket.gethostname()}\n")
    with pytest.raises(streaming.WorkdirLocked, match=str(os.getppid())):
        streaming.run_stream(jax.jit(_toy), {"hist": jnp.zeros(8, jnp.int32)}, _batches(np.zeros((2, 2), np.int32)),
                             num_batches=2, workdir=str(tmp_path / "s"), config={})
    assert sorted(os.listdir(tmp_path / "s")) == ["lock.pid"]


def test_progress_bar_shows_rate_outside_a_terminal_and_can_be_silenced(tmp_path, capsys):
    """run_stream's progress is the tqdm bar of jaxdissect.progress: count, rate, ETA, even in a log file."""
    def step(state, batch):
        return {"sum": state["sum"] + batch}

    batches = lambda start: iter(np.arange(start, 4, dtype=np.float32))
    state = streaming.run_stream(step, {"sum": np.float32(0)}, batches, num_batches=4, workdir=str(tmp_path / "a"),
                                 config={}, desc="count")
    assert float(state["sum"]) == 6.0
    err = capsys.readouterr().err
    assert "count: 100%" in err and "4/4" in err and ("batch/s" in err or "s/batch" in err)
    streaming.run_stream(step, {"sum": np.float32(0)}, batches, num_batches=4, workdir=str(tmp_path / "b"),
                         config={}, desc="count", progress=False)
    assert "count" not in capsys.readouterr().err


# dissect_activations with a work directory: 4 batches per pass, a checkpoint after each.
DISSECT_SCRIPT = """
import sys, time
import numpy as np
from absl import logging
from jaxdissect.statistics import dissect_activations

logging.set_verbosity(logging.INFO)
workdir, sleep, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rng = np.random.RandomState(5)
N, B, S, LABELS = 16, 4, 16, 6
seg = np.kron(rng.randint(0, LABELS, (N, 1, 4, 4)), np.ones((S // 4, S // 4), np.int32)).astype(np.int32)
acts = rng.gamma(1.0, 1.0, (N, 4, 4, 8)).astype(np.float32)
acts[..., 0] += 3.0 * (seg[:, 0, ::4, ::4] == 2)

def batches():
    for i in range(0, N, B):
        time.sleep(sleep)
        yield acts[i:i + B], seg[i:i + B]

kwargs = dict(num_labels=LABELS, quantile=0.1, resolution=S, topk=3)
r = dissect_activations(batches, workdir=workdir, num_batches=N // B, checkpoint_every=1, **kwargs)
keys = ("thresholds", "iou", "top_values", "top_index", "intersection", "active", "act_mean")
ref = dissect_activations(batches, **kwargs) if len(sys.argv) > 4 else r
np.savez(out, **{k: getattr(r, k) for k in keys}, **{"ref_" + k: getattr(ref, k) for k in keys})
"""


@pytest.mark.slow
def test_killed_dissection_resumes_to_the_identical_result(tmp_path):
    script = tmp_path / "dissect.py"
    script.write_text(DISSECT_SCRIPT)
    workdir, out = tmp_path / "work", tmp_path / "out.npz"
    proc = subprocess.Popen([sys.executable, str(script), str(workdir), "0.5", str(out)], env=_env(False),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not _checkpoints(workdir / "pass2"):
            assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
            assert time.time() < deadline, "pass 2 never checkpointed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _checkpoints(workdir / "pass1")[-1] == 4
    assert 0 < _checkpoints(workdir / "pass2")[-1] < 4 and not out.exists()

    resumed = subprocess.run([sys.executable, str(script), str(workdir), "0", str(out), "reference"], env=_env(False),
                             cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "dissect pass1: finished stream restored" in resumed.stderr
    assert "dissect pass2: resuming at batch" in resumed.stderr
    r = dict(np.load(out))
    for key in ("thresholds", "iou", "top_values", "top_index", "intersection", "active", "act_mean"):
        assert r[key].tobytes() == r["ref_" + key].tobytes(), key
    assert r["active"].sum() > 0 and np.nanmax(r["iou"][0, 1:]) > 0.3
