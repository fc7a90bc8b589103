"""Learned bases kept in the per-user cache, trained once per model, layer, data and settings.

A learned basis lives in ``<cache_dir>/bases/<kind>-<key>/`` (``params.npz``
and ``info.json``: settings, identity, training curve), ``key`` a hash of
what determines it. :func:`cached` builds it with
:func:`jaxdissect.fileio.build_once` (one process trains, others wait and
load); training checkpoints go to ``<cache_dir>/bases/.<kind>-<key>.train``,
a fixed name, so a killed training resumes there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable

import numpy as np

from jaxdissect import fileio

VERSION = 1


def key(kind: str, identity: dict, settings: dict) -> str:
    """16 hex digits naming a learned basis: kind, identity (model, layer, data) and training settings."""
    text = json.dumps({"kind": kind, "identity": identity, "settings": settings, "version": VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached(cache_dir: str, kind: str, identity: dict, settings: dict,
           build: Callable[[str, str], None], log: Callable[[str], None] | None = None) -> str:
    """The directory of the learned basis, made by ``build(tmp_dir, workdir)`` if it is not there yet.

    ``build`` writes ``params.npz`` and ``info.json`` into ``tmp_dir`` (renamed
    into place when it returns) and may checkpoint into ``workdir``, which is
    removed once the basis is complete.
    """
    folder = os.path.join(fileio.require_writable_dir(cache_dir, "cache folder"), "bases")
    name = f"{kind}-{key(kind, identity, settings)}"
    target = os.path.join(folder, name)
    workdir = os.path.join(folder, f".{name}.train")
    fileio.build_once(target, lambda tmp: build(tmp, workdir), what=f"{kind} basis {name}", log=log)
    shutil.rmtree(workdir, ignore_errors=True)
    return target


def save(folder: str, params: dict, info: dict) -> None:
    """Write ``params.npz`` and ``info.json`` into ``folder`` (atomically)."""
    fileio.savez(os.path.join(folder, "params.npz"), **{k: np.asarray(v) for k, v in params.items()})
    fileio.write_json(os.path.join(folder, "info.json"), info)


def load(folder: str) -> tuple[dict, dict]:
    """``(params, info)`` from a folder written by :func:`save`."""
    with np.load(os.path.join(folder, "params.npz")) as f:
        params = {k: f[k] for k in f.files}
    with open(os.path.join(folder, "info.json")) as f:
        return params, json.load(f)
