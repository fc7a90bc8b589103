"""``python -m launch.ganpaint``: the embedded default serves the page on localhost; bad flags fail in one line."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from launcher_cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_cache(tmp_path_factory) -> str:
    """One cache (the toy dissection) for all app tests of the session."""
    path = tmp_path_factory.getbasetemp() / "ganpaint-cache"
    path.mkdir(exist_ok=True)
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return dict(os.environ, JAX_PLATFORMS="cpu", JAXDISSECT_PROGRESS="0", PYTHONPATH=ROOT)


@pytest.mark.slow
def test_default_serves_on_localhost(tmp_path_factory):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "launch.ganpaint", f"--port={port}",
                             f"--cache_dir={shared_cache(tmp_path_factory)}"], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/concepts", timeout=5) as r:
                    info = json.load(r)
                break
            except OSError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.3)
        assert {"red", "green", "blue"} <= set(info["concepts"])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"/static/app.js" in r.read()
        # Bound to the loopback interface only: the listening socket's address is 127.0.0.1.
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            assert all(line.split()[3] == f"127.0.0.1:{port}" for line in out.stdout.strip().splitlines())
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("args,words", [(["--dissection=somewhere"], "--dissection needs --model")])
def test_bad_flags_fail_in_one_line(args, words):
    code, _, err = cli("ganpaint", *args)
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last
