"""Test-wide settings: CPU only, quiet logs, deterministic float32 matmuls, per-op YNNPACK convs, and one
compilation cache per test session.

The session's compiled programs are kept in a fresh directory named by ``$JAX_COMPILATION_CACHE_DIR``,
set here before JAX is imported so that both pytest-xdist workers and every subprocess a test starts
(launchers, multi-device runs) inherit it: a program compiled once in the session (the demo model, the
statistics kernels, a planted model) is read back instead of compiled again by the next test, worker or
process. Nothing outlives the session; set ``$JAX_COMPILATION_CACHE_DIR`` yourself to keep or move it.
"""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:   # the controller's import runs first: workers inherit it
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdissect-tests-xla-")
    os.environ["JAXDISSECT_TESTS_OWN_XLA_CACHE"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")   # every program, however quick
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from jaxdissect.models import set_cpu_xla_flags  # noqa: E402

# Before JAX's first computation: XLA:CPU otherwise fuses a whole VGG body into one slow call.
set_cpu_xla_flags()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    """The process that made the session's compilation cache removes it (workers leave it alone)."""
    if os.environ.get("JAXDISSECT_TESTS_OWN_XLA_CACHE") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> str:
    """A per-user cache holding a small demo model where the launchers look for the default one (trained once
    per worker; tests/launcher_cli.py)."""
    from launcher_cli import tiny_demo_cache

    cache = str(tmp_path_factory.getbasetemp() / "demo-cache")
    tiny_demo_cache(cache)
    return cache


@pytest.fixture
def user(demo_cache, tmp_path, monkeypatch):
    """A user's shell: the working folder is empty, the per-user cache holds the demo model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXDISSECT_CACHE", demo_cache)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # leave JAX's compilation cache as the other tests have it
    return tmp_path
