"""Run a launcher (or converter) as ``python -m launch.<name> ARGS`` would, inside the test process; a small demo
model cache.

:func:`cli` defines the launcher's flags, runs its ``main`` through
``launch.common.run`` (flag parsing, the up-front checks, one-line errors, exit
status) and removes the flags again, so every launcher can be called in turn
without starting a Python and JAX per call. :func:`tiny_demo_cache` puts a
small demo model where the launchers look for the default one, so their
no-flag runs take seconds (the real one trains in about two minutes).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys

from absl import flags

from launch import common

TINY = dict(num_train=64, num_test=32, steps=20, batch_size=16, widths=(8, 8, 8, 64), image_size=32)


def cli(name: str, *args: str) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``python -m launch.<name> *args``, run in this process.

    A dotted ``name`` is a module path (``converters.proggan``): any command line on ``launch.common.run``.
    """
    module = importlib.import_module(name if "." in name else f"launch.{name}")
    before = set(flags.FLAGS)
    writable = dict(common.WRITABLE_FLAGS)
    module.define_flags()
    defined = set(flags.FLAGS) - before
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, [module.__file__, *args]
    main, sys.modules["__main__"] = sys.modules["__main__"], module   # --help lists the launcher's own flags
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            common.run(module.main)
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    finally:
        sys.argv = argv
        sys.modules["__main__"] = main
        for flag in defined:
            delattr(flags.FLAGS, flag)
        common.WRITABLE_FLAGS.clear()
        common.WRITABLE_FLAGS.update(writable)
    return code, out.getvalue(), err.getvalue()


def tiny_demo_cache(cache: str) -> str:
    """Save a small demo model (32-pixel scenes, 20 steps; 64 units in conv4 as the real one) as the cache's default demo model; returns its path."""
    from jaxdissect.checkpoint import save_model
    from jaxdissect.pipelines import train_synthetic

    path = train_synthetic.model_path(cache)
    if not os.path.exists(os.path.join(path, "model.json")):
        module, variables, info = train_synthetic.train(**TINY, log=None, progress=False)
        save_model(path, module, variables, metadata=info)
    return path
