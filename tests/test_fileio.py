"""The one file-writing layer: atomic writes, cross-process locks, artefacts built once, writable checks."""

import json
import multiprocessing
import os
import time

import numpy as np
import pytest

from jaxdissect import fileio
from jaxdissect.bases import Linear, Neurons, params_digest


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    fileio.write_json(str(tmp_path / "a.json"), {"x": np.int64(3), "y": np.float32(0.5), "z": np.arange(2)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 3, "y": 0.5, "z": [0, 1]}
    fileio.savez(str(tmp_path / "b.npz"), a=np.arange(3))
    with np.load(tmp_path / "b.npz") as z:
        np.testing.assert_array_equal(z["a"], [0, 1, 2])
    with pytest.raises(TypeError):
        fileio.write_json(str(tmp_path / "c.json"), {"bad": object()})
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.npz"]


def test_atomic_file_appears_complete_or_not_at_all(tmp_path):
    fileio.save(str(tmp_path / "c.npy"), np.arange(4, dtype=np.uint8))
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), [0, 1, 2, 3])
    with fileio.atomic_file(str(tmp_path / "d.csv"), "w", newline="", encoding="utf-8") as f:
        tmp = [n for n in os.listdir(tmp_path) if n != "c.npy"]
        f.write("a,b\r\n")
    assert len(tmp) == 1 and tmp[0].startswith(".d.csv.") and tmp[0].endswith(".tmp")  # hidden while written
    assert (tmp_path / "d.csv").read_bytes() == b"a,b\r\n"
    with pytest.raises(OSError):
        with fileio.atomic_file(str(tmp_path / "e.bin")) as f:
            f.write(b"half")
            raise OSError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["c.npy", "d.csv"]


def _build_slowly(target, log):
    def build(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        with open(os.path.join(tmp, "value.txt"), "w") as f:
            f.write("built")

    fileio.build_once(target, build, what="the test artefact", log=lambda m: None)
    with open(os.path.join(target, "value.txt")) as f:
        return f.read()


@pytest.mark.slow
def test_build_once_across_processes(tmp_path):
    target, log = str(tmp_path / "artefact"), str(tmp_path / "builds.log")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_build_slowly, [(target, log), (target, log)])
    assert results == ["built", "built"]
    assert len(open(log).read().split()) == 1  # built by one process only
    assert sorted(os.listdir(tmp_path)) == ["artefact", "artefact.lock", "builds.log"]


def test_failed_build_leaves_nothing(tmp_path):
    target = str(tmp_path / "artefact")

    def fail(tmp):
        open(os.path.join(tmp, "half"), "w").close()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fileio.build_once(target, fail)
    assert not os.path.exists(target)
    assert [n for n in os.listdir(tmp_path) if "building" in n] == []
    fileio.build_once(target, lambda tmp: open(os.path.join(tmp, "ok"), "w").close())
    assert os.listdir(target) == ["ok"]


def _hold(path, seconds):
    with fileio.lock(path):
        time.sleep(seconds)


@pytest.mark.slow
def test_lock_times_out_naming_the_holder(tmp_path):
    path = str(tmp_path / "x.lock")
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_hold, args=(path, 5))
    p.start()
    try:
        deadline = time.time() + 30
        while not os.path.exists(path + ".owner") and time.time() < deadline:
            time.sleep(0.05)
        messages = []
        with pytest.raises(fileio.LockTimeout, match=rf"process {p.pid}@.*x\.lock"):
            with fileio.lock(path, what="the thing", timeout=0.2, log=messages.append):
                pass
        assert messages and messages[0].startswith("waiting for the thing")
    finally:
        p.join()
    with fileio.lock(path, timeout=1):  # released when the holder finished
        pass


def test_require_writable_dir(tmp_path):
    assert fileio.require_writable_dir(str(tmp_path / "new" / "sub")) == str(tmp_path / "new" / "sub")
    (tmp_path / "file").write_text("x")
    with pytest.raises(fileio.FileIOError, match="is an existing file"):
        fileio.require_writable_dir(str(tmp_path / "file"))
    with pytest.raises(fileio.FileIOError, match="is a file, not a folder"):
        fileio.require_writable_dir(str(tmp_path / "file" / "below"))
    with pytest.raises(fileio.FileIOError, match="cannot write to output folder /proc"):
        fileio.require_writable_dir("/proc")


def test_linear_basis_is_the_rotation_and_its_inverse():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    acts = rng.normal(size=(2, 3, 3, 6)).astype(np.float32)
    params = {"matrix": q.astype(np.float32)}
    codes = np.asarray(Linear().encode(params, acts))
    np.testing.assert_allclose(codes, np.einsum("bhwj,ij->bhwi", acts, q), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(Linear().decode(params, codes)), acts, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(Neurons().encode({}, acts)), acts)
    assert params_digest(params) != params_digest({"matrix": q.T.astype(np.float32)})
    with pytest.raises(ValueError, match="cannot act on a layer with 5 channels"):
        Linear().check(params, 5)
