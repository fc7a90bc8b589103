"""Data-parallel steps: identical results on 1 and 8 devices, against NumPy references.

The 8-device runs happen in a subprocess with forced host devices (the flag
must be set before JAX is imported, and this test process already has one).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(code: str, devices: int = 8, timeout: int = 240) -> dict:
    """Run ``code`` with ``devices`` forced CPU devices; it prints one JSON line last."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Toy kernels: a histogram, counts and a maximum per state; padded rows (x = 0, w = 0) must
# be excluded by the validity mask, or bin 0 and the counts come out wrong.
TOY = """
import json
import jax
import jax.numpy as jnp
import numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from jaxdissect import parallel

BINS = 50

def init():
    return {"hist": np.zeros((3, BINS), np.int32), "n": np.int32(0), "wsum": np.int32(0),
            "max": np.full(3, -1, np.int32)}

def update(state, x, w, valid):
    # x [b, 3] ints in [0, BINS), w [b] ints; padded rows must not count.
    v = valid.astype(jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(3), x.shape)
    hist = state["hist"].at[rows, x].add(v[:, None])
    return {"hist": hist, "n": state["n"] + v.sum(), "wsum": state["wsum"] + (w * v).sum(),
            "max": jnp.maximum(state["max"], jnp.where(valid[:, None], x, -1).max(0))}

def merge(host):
    return {"hist": host["hist"].sum(0).tolist(), "n": int(host["n"].sum()), "wsum": int(host["wsum"].sum()),
            "max": host["max"].max(0).tolist()}

rng = np.random.RandomState(0)
sizes = [16, 37, 8, 5, 1, 24]   # several not divisible by 8
data = [(rng.randint(0, BINS, (n, 3)).astype(np.int32), rng.randint(1, 4, n).astype(np.int32))
        for n in sizes]

def run(mesh):
    state = parallel.stack_init(mesh, init())
    step = parallel.per_device(update, mesh, pad=True)
    for x, w in data:
        state = step(state, x, w)
    return merge(parallel.to_host(state))
"""


@pytest.fixture(scope="module")
def eight_devices():
    """One 8-device subprocess for the toy-kernel and layout checks (saves a JAX start-up)."""
    return run_with_devices(TOY + """
devices = jax.devices()
assert len(devices) == 8, devices
one = run(parallel.make_mesh(devices[:1]))
eight = run(parallel.make_mesh())
# Host-padded path: the kernel receives the mask as an ordinary batch array.
mesh = parallel.make_mesh()
state = parallel.stack_init(mesh, init())
step = parallel.per_device(update, mesh)
for x, w in data:
    (x, w), valid = parallel.pad_batch((x, w), 8)
    state = step(state, *parallel.shard_batch(mesh, (x, w, valid)))
host_padded = merge(parallel.to_host(state))

# Layout: stacked, sharded state; donation; which items each device saw.
state = parallel.stack_init(mesh, {"a": np.arange(4, dtype=np.int32)})
shards = sorted(s.device.id for s in state["a"].addressable_shards)
step = parallel.per_device(lambda s, x: {"a": s["a"] + x.sum()}, mesh)
new = step(state, jnp.arange(16, dtype=jnp.int32).reshape(16, 1))
layout = {"shape": list(state["a"].shape), "spec": list(new["a"].sharding.spec), "devices": shards,
          "donated": state["a"].is_deleted(), "per_device": np.asarray(new["a"][:, 0]).tolist()}
print(json.dumps({"one": one, "eight": eight, "host_padded": host_padded, "layout": layout}))
""")


def test_toy_kernels_identical_on_1_and_8_devices(eight_devices):
    out = eight_devices
    # Independent NumPy reference (same random data).
    rng = np.random.RandomState(0)
    hist, n, wsum, mx = np.zeros((3, 50), np.int64), 0, 0, np.full(3, -1)
    for size in [16, 37, 8, 5, 1, 24]:
        x, w = rng.randint(0, 50, (size, 3)), rng.randint(1, 4, size)
        for c in range(3):
            hist[c] += np.bincount(x[:, c], minlength=50)
        n += size
        wsum += int(w.sum())
        mx = np.maximum(mx, x.max(0))
    expected = {"hist": hist.tolist(), "n": n, "wsum": wsum, "max": mx.tolist()}
    assert out["one"] == expected
    assert out["eight"] == expected
    assert out["host_padded"] == expected


def test_state_layout_and_donation(eight_devices):
    out = eight_devices["layout"]
    assert out["shape"] == [8, 4]
    assert out["devices"] == list(range(8))
    assert out["spec"] == ["data"]
    assert out["donated"] is True
    # Device i received items 2i and 2i+1.
    assert out["per_device"] == [4 * i + 1 for i in range(8)]


def test_indivisible_batch_without_padding_is_a_clear_error():
    mesh = parallel.make_mesh()
    d = mesh.size
    state = parallel.stack_init(mesh, {"n": np.int32(0)})
    step = parallel.per_device(lambda s, x: {"n": s["n"] + x.shape[0]}, mesh)
    state = step(state, np.zeros(2 * d))
    assert int(parallel.to_host(state)["n"].sum()) == 2 * d
    if d > 1:
        with pytest.raises(ValueError, match="pad=True"):
            step(state, np.zeros(2 * d + 1))


def test_state_without_device_axis_is_a_clear_error():
    mesh = parallel.make_mesh()
    step = parallel.per_device(lambda s, x: s, mesh)
    with pytest.raises(ValueError, match="stack_init"):
        step({"n": jnp.int32(0)}, np.zeros(4))


def test_mismatched_batch_arrays_are_a_clear_error():
    with pytest.raises(ValueError, match="leading"):
        parallel.pad_batch((np.zeros(3), np.zeros(4)), 2)


def test_pad_batch():
    (x,), valid = parallel.pad_batch((np.arange(5),), 4)
    np.testing.assert_array_equal(x, [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(valid, [1, 1, 1, 1, 1, 0, 0, 0])
    (y,), valid = parallel.pad_batch((np.ones((8, 2)),), 4)
    assert y.shape == (8, 2) and valid.all()
    (z,), valid = parallel.pad_batch((np.arange(3),), 4, size=8)
    assert z.shape == (8,) and valid.sum() == 3
    with pytest.raises(ValueError, match="multiple of 4"):
        parallel.pad_batch((np.arange(3),), 4, size=6)


def test_initialize_distributed_single_process_is_a_no_op():
    parallel.initialize_distributed(num_processes=1)
    jnp.ones(2).block_until_ready()
    parallel.initialize_distributed()   # after JAX started: a warning, not an error
    with pytest.raises(ValueError, match="all"):
        parallel.initialize_distributed(coordinator_address="localhost:1234")
    assert jax.process_count() == 1


# Planted dissection data: unit u of the first 4 fires on label u + 1 (channel 0);
# batches of 6 (not divisible by 8), 20 images, the last batch has 2.
DISSECT_DATA = """
import numpy as np

N, BATCH, H, UNITS, S, LABELS = 20, 6, 7, 12, 28, 9

def make_data():
    rng = np.random.RandomState(3)
    seg = np.zeros((N, 2, S, S), np.int32)
    blocks = rng.randint(0, LABELS, (N, 2, 4, 4))
    seg[:] = np.kron(blocks, np.ones((S // 4, S // 4), np.int32))
    acts = rng.gamma(1.0, 1.0, (N, H, H, UNITS)).astype(np.float32)
    coarse = seg[:, 0, ::S // H, ::S // H]   # [N, H, H]
    for u in range(4):
        acts[..., u] += 4.0 * (coarse == u + 1)
    return acts, seg

def batches_of(acts, seg):
    return lambda: ((acts[i:i + BATCH], seg[i:i + BATCH]) for i in range(0, N, BATCH))
"""


@pytest.mark.slow
def test_dissect_activations_identical_on_1_and_8_devices(tmp_path):
    out = tmp_path / "results.npz"
    run_with_devices(DISSECT_DATA + f"""
import json
import jax
from jaxdissect import parallel
from jaxdissect.statistics import dissect_activations
acts, seg = make_data()
results = {{}}
for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    r = dissect_activations(batches_of(acts, seg), num_labels=LABELS, quantile=0.05, resolution=S, topk=5,
                            mesh=parallel.make_mesh(devices))
    for key in ("thresholds", "iou", "top_values", "top_index", "intersection", "active", "label_pixels",
                "act_mean", "label"):
        results[f"{{name}}_{{key}}"] = getattr(r, key)
# Sparse codes (the 4 largest of 12 units per position) on one and eight devices, and their dense map.
from jaxdissect import SparseCodes
idx = np.argsort(-acts, -1)[..., :4].astype(np.int32)
val = np.take_along_axis(acts, idx, -1)
dense = np.zeros_like(acts)
np.put_along_axis(dense, idx, val, -1)
listed = lambda: ((SparseCodes(idx[i:i + BATCH], val[i:i + BATCH], UNITS), seg[i:i + BATCH]) for i in range(0, N, BATCH))
for name, source, devices in (("codes_one", listed, jax.devices()[:1]), ("codes_eight", listed, jax.devices()),
                              ("codes_dense", batches_of(dense, seg), jax.devices()[:1])):
    r = dissect_activations(source, num_labels=LABELS, quantile=0.05, resolution=S, topk=5,
                            mesh=parallel.make_mesh(devices))
    for key in ("thresholds", "top_values", "top_index", "intersection", "active", "act_mean"):
        results[f"{{name}}_{{key}}"] = getattr(r, key)
np.savez({str(out)!r}, **results)
print(json.dumps({{"ok": True}}))
""")
    r = dict(np.load(out))
    for key in ("thresholds", "iou", "top_values", "top_index", "intersection", "active", "label_pixels",
                "act_mean", "label"):
        one, eight = r[f"one_{key}"], r[f"eight_{key}"]
        assert one.dtype == eight.dtype and one.shape == eight.shape, key
        # Bit-identical, NaNs included.
        assert one.tobytes() == eight.tobytes(), key
    for key in ("thresholds", "top_values", "top_index", "intersection", "active", "act_mean"):
        assert r[f"codes_one_{key}"].tobytes() == r[f"codes_eight_{key}"].tobytes() == r[f"codes_dense_{key}"].tobytes()

    # Independent NumPy reference for the data above.
    ns = {}
    exec(DISSECT_DATA, ns)
    acts, seg = ns["make_data"]()
    s, units = ns["S"], ns["UNITS"]
    # Top-5 images by raw spatial maximum (stable order: value descending, index ascending).
    score = acts.max(axis=(1, 2))                               # [N, U]
    order = np.lexsort((np.broadcast_to(np.arange(len(acts))[:, None], score.shape), -score), axis=0)[:5].T
    np.testing.assert_array_equal(r["one_top_index"], order)
    np.testing.assert_array_equal(r["one_top_values"], np.take_along_axis(score.T, order, 1))
    # Thresholds: numpy.quantile of the upsampled values (original geometry, zero padding).
    x = (np.arange(s) + 0.5) * acts.shape[1] / s - 0.5
    m = np.zeros((s, acts.shape[1]))
    for t, v in enumerate(x):
        i = int(np.floor(v))
        for j, w in ((i, 1 - (v - i)), (i + 1, v - i)):
            if 0 <= j < acts.shape[1]:
                m[t, j] += w
    up = np.einsum("th,nhwu,sw->ntsu", m, acts.astype(np.float64), m).reshape(-1, units)
    np.testing.assert_allclose(r["one_thresholds"], np.quantile(up, 0.95, axis=0), rtol=1e-5)
    # IoU of the planted units with their labels from counts taken with those thresholds.
    active = up > r["one_thresholds"]
    pix = seg.transpose(0, 2, 3, 1).reshape(-1, 2)
    for u in range(4):
        has = (pix == u + 1).any(1)
        inter = (active[:, u] & has).sum()
        union = active[:, u].sum() + has.sum() - inter
        assert abs(r["one_iou"][u, u + 1] - inter / union) < 1e-3
        assert r["one_label"][u] == u + 1


# Multi-host recipe, as two local processes of 4 CPU devices each: every process
# reads its own half of each batch; the stream is checkpointed, then restored.
MULTIHOST = """
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from absl import logging
from jaxdissect import parallel, streaming
logging.set_verbosity(logging.INFO)
pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
parallel.initialize_distributed(f"localhost:{port}", 2, pid)
import jax.numpy as jnp
import numpy as np

mesh = parallel.make_mesh()
def update(state, x, valid):
    return {"hist": state["hist"].at[x].add(valid.astype(jnp.int32))}

step = parallel.per_device(update, mesh)
rng = np.random.RandomState(0)
data = [rng.randint(0, 16, n) for n in (10, 7, 13, 5, 9, 12)]

def batches(start):
    for x in data[start:]:
        half = -(-len(x) // 2)
        mine = x[:half] if pid == 0 else x[half:]
        (mine,), valid = parallel.pad_batch((mine,), 4, size=8)
        yield parallel.shard_batch(mesh, (mine, valid))

state = parallel.stack_init(mesh, {"hist": np.zeros(16, np.int32)})
out = streaming.run_stream(lambda s, b: step(s, *b), state, batches, num_batches=len(data), workdir=workdir,
                           config={"toy": 1}, checkpoint_every=2)
print(json.dumps({"processes": jax.process_count(), "devices": len(jax.devices()),
                  "hist": parallel.to_host(out)["hist"].sum(0).tolist()}))
"""


@pytest.mark.slow
def test_multi_process_recipe_matches_single_host(tmp_path):
    import socket

    script = tmp_path / "multihost.py"
    script.write_text(MULTIHOST)
    workdir = tmp_path / "work"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng = np.random.RandomState(0)
    expected = np.bincount(np.concatenate([rng.randint(0, 16, n) for n in (10, 7, 13, 5, 9, 12)]),
                           minlength=16).tolist()
    for attempt in ("compute", "restore"):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, str(script), str(pid), str(port), str(workdir)], env=env,
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for pid in (0, 1)]
        outs = [p.communicate(timeout=240) for p in procs]
        for p, (stdout, stderr) in zip(procs, outs):
            assert p.returncode == 0, stderr[-4000:]
            result = json.loads(stdout.strip().splitlines()[-1])
            assert result["processes"] == 2 and result["devices"] == 8
            assert result["hist"] == expected, attempt
            assert ("finished stream restored" in stderr) == (attempt == "restore")
        assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
