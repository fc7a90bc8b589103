"""The one file-writing layer: atomic writes, cross-process locks, artefacts built once, writable checks.

Everything jaxdissect writes goes through here, so a kill never leaves a file
that a later run mistakes for complete, and two processes never build the same
cached artefact at once:

* :func:`write_json`, :func:`write_text`, :func:`write_bytes`, :func:`save`,
  :func:`savez`, and :func:`atomic_file` for any writer that takes a file
  object (matplotlib, Pillow, csv): written to a temporary name in the same
  folder (``.<name>.<pid>-<random>.tmp``, unique across processes and hosts)
  and renamed into place.
* :func:`lock`: an exclusive lock on a lock file (``filelock``, released by the
  kernel when its holder dies, so no stale locks); a second process waits,
  saying once what it waits for, up to a timeout.
* :func:`build_once`: a cached artefact (a directory or file) made by
  ``build(tmp_path)`` under the lock, into a temporary name, renamed into place
  when complete; a process that waited finds it there and uses it.
* :func:`require_writable_dir`: checks up front that a folder can be created and
  written, naming the path and the reason otherwise.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from typing import Any, Callable, Iterator

import numpy as np

from jaxdissect.errors import JaxDissectError

LOCK_TIMEOUT = float(os.environ.get("JAXDISSECT_LOCK_TIMEOUT", 6 * 3600))


class FileIOError(JaxDissectError, OSError):
    """A path that cannot be written, or a lock that could not be taken in time; the message names it."""


class LockTimeout(FileIOError):
    """Another process held a lock for longer than the timeout."""


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable: {value!r}")


def _tmp_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", **open_kwargs) -> Iterator[Any]:
    """``open(path, mode, **open_kwargs)`` writing atomically: ``path`` appears, complete, when the block ends.

    The file is written under a temporary name in the same folder, synced to
    the disk and renamed into place; an error (or a kill) leaves no ``path``
    and, but for a kill, no temporary file.
    """
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary name in the same folder, then rename)."""
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, data, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` atomically; NumPy scalars and arrays become numbers and lists."""
    write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=_json_default))


def save(path: str, array) -> None:
    """``numpy.save`` of ``array`` to ``path`` atomically (no pickles)."""
    with atomic_file(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def savez(path: str, **arrays) -> None:
    """``numpy.savez`` to ``path`` atomically (``path`` should end in ``.npz``)."""
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)


def _holder(lock_path: str) -> str:
    try:
        with open(lock_path + ".owner") as f:
            return f.read().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def lock(path: str, *, what: str | None = None, timeout: float | None = None,
         log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive cross-process lock on the file ``path`` (created with its folder).

    If another process holds it, waits (logging once ``waiting for <what> ...``
    through ``log``, default absl's ``logging.info``) up to ``timeout`` seconds
    (default ``$JAXDISSECT_LOCK_TIMEOUT`` or 6 hours), then raises
    :class:`LockTimeout` naming the lock file and its holder. A holder that dies
    releases the lock with it.
    """
    import filelock

    timeout = LOCK_TIMEOUT if timeout is None else float(timeout)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise FileIOError(f"cannot create {folder} for the lock {path}: {e.strerror or e}") from None
    flock = filelock.FileLock(path)
    try:
        flock.acquire(timeout=0)
    except filelock.Timeout:
        holder = _holder(path)
        if log is None:
            from absl import logging

            log = logging.info
        log(f"waiting for {what or path} ({holder} holds {path}; up to {timeout:.0f} s)")
        try:
            flock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise LockTimeout(
                f"{what or path}: {_holder(path)} still holds {path} after {timeout:.0f} s; wait for it to "
                f"finish, or raise JAXDISSECT_LOCK_TIMEOUT (seconds)") from None
    except OSError as e:
        raise FileIOError(f"cannot take the lock {path}: {e.strerror or e}") from None
    try:
        with contextlib.suppress(OSError):
            write_text(path + ".owner", f"process {os.getpid()}@{socket.gethostname()} since "
                                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path + ".owner")
        flock.release()


def build_once(target: str, build: Callable[[str], Any], *, what: str | None = None,
               timeout: float | None = None, log: Callable[[str], None] | None = None,
               directory: bool = True) -> str:
    """Return ``target`` after making sure it exists, built by ``build(tmp)`` at most once across processes.

    If ``target`` exists it is returned at once. Otherwise the lock
    ``target + '.lock'`` is taken (waiting for a process that is building it),
    ``target`` checked again, and ``build(tmp)`` called with a fresh temporary
    path beside ``target`` (an empty directory when ``directory``, else a file
    name that does not exist yet), which is renamed to ``target`` only when
    ``build`` returns. A failed or killed build leaves no ``target``; its
    leftovers are removed by the next build.
    """
    if os.path.exists(target):
        return target
    parent = os.path.dirname(os.path.abspath(target)) or "."
    name = os.path.basename(os.path.normpath(target))
    with lock(target + ".lock", what=what or target, timeout=timeout, log=log):
        if os.path.exists(target):
            return target
        for stale in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.building-*")):
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
        tmp = tempfile.mkdtemp(prefix=f".{name}.building-", dir=parent)
        if not directory:
            os.rmdir(tmp)
        try:
            build(tmp)
            if not os.path.exists(tmp):
                raise FileIOError(f"building {what or target} wrote nothing to {tmp}")
            os.replace(tmp, target)
        except BaseException:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.exists(tmp):
                os.remove(tmp)
            raise
    return target


def require_writable_dir(path: str, what: str = "output folder") -> str:
    """Create ``path`` if needed and check that a file can be written in it; returns its absolute path.

    Raises :class:`FileIOError` naming the path and why (an existing file, no
    permission, a read-only file system, ...), before any work is done.
    """
    full = os.path.abspath(os.path.expanduser(path))
    probe = full
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(full) and not os.path.isdir(full):
        raise FileIOError(f"{what} {full} is an existing file, not a folder; choose another path")
    if not os.path.isdir(probe):
        raise FileIOError(f"cannot create {what} {full}: {probe} is a file, not a folder")
    try:
        os.makedirs(full, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=full)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        reason = e.strerror or str(e)
        raise FileIOError(f"cannot write to {what} {full}: {reason}; choose a folder you can write to") from None
    return full


def default_cache_dir() -> str:
    """The one per-user cache: ``$JAXDISSECT_CACHE``, ``$XDG_CACHE_HOME/jaxdissect`` or ``~/.cache/jaxdissect``.

    Everything cached for a user lives under it: converted published models and
    data (:mod:`jaxdissect.zoo`), the demo model, segmentations, compiled programs.
    """
    if os.environ.get("JAXDISSECT_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["JAXDISSECT_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "jaxdissect")
