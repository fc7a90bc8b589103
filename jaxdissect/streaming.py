"""Resumable streaming driver: fold batches into a state, checkpoint, resume after a crash.

:func:`run_stream` drives a jitted ``step(state, batch) -> state`` over
``num_batches`` batches. Every ``checkpoint_every`` batches and at the end it
saves the state (orbax, asynchronously, written to a temporary directory and
renamed, so a kill never leaves a half-written checkpoint). Run again with
the same arguments, it restores the latest checkpoint and continues with the
next batch, giving the identical final state; a finished stream is not
recomputed. The arguments that determine the result are described by the
caller as a JSON-able ``config``; a work directory written with a different
config is refused, naming the differing keys. In a multi-process job every
process calls :func:`run_stream` with the same arguments on a shared
directory: process 0 takes the lock and writes ``stream.json``, and orbax
writes every process's shards of the (global) state.

:class:`Workdir` is a small resumable work directory in the style of the
original's ``pidfile.exclusive_dirfn``: ``path(name)``, ``done(name)`` /
``mark_done(name)`` markers and a ``lock.pid`` lock (``pid@host``) so two
workers never write the same directory.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from absl import logging

from jaxdissect import fileio
from jaxdissect import progress as progress_lib
from jaxdissect.errors import JaxDissectError

_STREAM_JSON = "stream.json"
_CHECKPOINTS = "checkpoints"
_FORMAT = "jaxdissect-stream"
_LOCK = "lock.pid"


class StreamError(JaxDissectError, RuntimeError):
    """A work directory cannot be used for this stream (other arguments, damaged, locked)."""


class WorkdirLocked(StreamError):
    """Another live worker holds the directory's lock (a job list can skip to its next item)."""


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Workdir:
    """A work directory shared by resumable jobs: file paths, done markers and a lock.

    ``with Workdir(path) as wd:`` takes the lock ``lock.pid`` (content
    ``pid@host``) for the duration; a lock left by a dead process on this host
    is taken over, one held by a live process (or by another host) raises
    :class:`WorkdirLocked` naming its owner and the file to delete.
    """

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._locked = False

    def path(self, name: str) -> str:
        """``directory/name`` (parent folders created)."""
        full = os.path.join(self.directory, name)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def _marker(self, name: str) -> str:
        return self.path(f"{name}.done")

    def done(self, name: str) -> bool:
        """Whether ``mark_done(name)`` was called (by any run) in this directory."""
        return os.path.exists(self._marker(name))

    def mark_done(self, name: str) -> None:
        """Record that step ``name`` finished (atomically; says who and when)."""
        fileio.write_text(self._marker(name), f"done by {_owner()} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._locked

    def lock(self) -> "Workdir":
        """Take ``lock.pid``; raises :class:`WorkdirLocked` if another live worker holds it."""
        if self._locked:
            return self
        path = os.path.join(self.directory, _LOCK)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(path) as f:
                        holder = f.read().strip()
                except FileNotFoundError:
                    continue
                pid, _, host = holder.partition("@")
                if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                    logging.warning("Taking over %s left by dead process %s", path, holder)
                    try:
                        os.remove(path)
                    except FileNotFoundError:
                        pass
                    continue
                raise WorkdirLocked(
                    f"{self.directory} is in use by {holder or 'an unknown process'} ({path}); wait "
                    f"for it to finish, or delete {path} if that worker is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(_owner() + "\n")
            self._locked = True
            return self
        raise StreamError(f"cannot take the lock {path}; delete it if no worker is running")

    def unlock(self) -> None:
        """Release the lock if this object holds it."""
        if not self._locked:
            return
        path = os.path.join(self.directory, _LOCK)
        try:
            with open(path) as f:
                if f.read().strip() == _owner():
                    os.remove(path)
        except FileNotFoundError:
            pass
        self._locked = False

    def __enter__(self) -> "Workdir":
        return self.lock()

    def __exit__(self, *exc) -> None:
        self.unlock()


_RUNNING = 0  # run_stream loops in progress in this process
_STOP_REQUESTED = False


class Interrupted(KeyboardInterrupt):
    """A stream stopped on request (Ctrl-C) after checkpointing; the message says where it resumes."""


def request_stop() -> bool:
    """Ask the running stream to stop after its current batch, checkpointed (for a SIGINT handler).

    Returns True when a stream is running and will stop (it then raises
    :class:`Interrupted`); False when none is running or a stop was already
    requested, so the caller should interrupt at once.
    """
    global _STOP_REQUESTED
    if _RUNNING and not _STOP_REQUESTED:
        _STOP_REQUESTED = True
        return True
    return False


def _normalize(config) -> Any:
    try:
        return json.loads(json.dumps(config, sort_keys=True))
    except TypeError as e:
        raise TypeError(f"stream config must be JSON-able (numbers, strings, lists, dicts): {e}") from e


def _differences(stored, new, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(stored) | set(new)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                out.append(f"{name} (new: {new[key]!r})")
            elif key not in new:
                out.append(f"{name} (stored {stored[key]!r}, now absent)")
            else:
                out.extend(_differences(stored[key], new[key], name))
        return out
    if stored != new:
        return [f"{prefix or 'config'} (stored {stored!r}, now {new!r})"]
    return []


def _restore_target(state):
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return np.asarray(x)

    return jax.tree.map(leaf, state)


def _batch_items(batch) -> int:
    leaves = jax.tree.leaves(batch)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 1


def run_stream(step: Callable, state, batches: Callable[[int], Iterable], *, num_batches: int,
               workdir, config: dict, checkpoint_every: int = 50, desc: str = "",
               check: Callable[[Any, int], None] | None = None, keep: int = 2, progress: bool | None = None):
    """Fold ``num_batches`` batches into ``state`` with ``step``, resumably; returns the final state.

    ``batches(start)`` returns an iterator over the batches from index
    ``start`` on (the data must be the same on every run); ``step(state,
    batch) -> state`` is jitted by the caller and must be deterministic
    (carry any random key inside ``state``). ``state`` is the initial state
    and also the template (shapes, dtypes, shardings) for restoring.

    ``workdir`` (a path or :class:`Workdir`) holds ``stream.json`` (config
    and ``num_batches``) and ``checkpoints/<batches done>``; the last
    ``keep`` checkpoints are kept. ``check(state, batch_index)`` runs on the
    host before each checkpoint, ``batch_index`` being the last batch folded
    in; it may raise to stop the run (e.g. NaNs found in batches after the
    previous checkpoint), and the previous checkpoint stays intact.

    A progress bar (:mod:`jaxdissect.progress`: rate, ETA) shows unless
    ``progress=False`` (None: the global setting). After :func:`request_stop`
    the stream checkpoints after its current batch and raises
    :class:`Interrupted`; a plain ``KeyboardInterrupt`` also saves the state
    reached before it propagates.
    """
    import orbax.checkpoint as ocp

    if num_batches < 0 or checkpoint_every < 1:
        raise ValueError(f"need num_batches >= 0 and checkpoint_every >= 1 (got {num_batches}, {checkpoint_every})")
    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    primary = jax.process_index() == 0
    took_lock = primary and not wd.locked
    if took_lock:
        wd.lock()
    try:
        record = {"format": _FORMAT, "config": _normalize(config), "num_batches": int(num_batches)}
        record_path = wd.path(_STREAM_JSON)
        if os.path.exists(record_path):
            try:
                with open(record_path) as f:
                    stored = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise StreamError(f"cannot read {record_path} ({e}); delete {wd.directory} to start over") from e
            diff = _differences({k: stored.get(k) for k in record}, record)
            if diff:
                raise StreamError(
                    f"work directory {wd.directory} holds a stream computed with different arguments: "
                    + "; ".join(diff)
                    + f". Delete {wd.directory} to recompute with the new arguments, or choose another directory."
                )
        elif primary:
            fileio.write_text(record_path, json.dumps(record, indent=1, sort_keys=True))

        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), cleanup_tmp_directories=True,
                                               enable_async_checkpointing=True)
        manager = ocp.CheckpointManager(wd.path(_CHECKPOINTS), options=options)
        try:
            return _drive(manager, step, state, batches, num_batches, checkpoint_every, desc, check, wd,
                          progress)
        finally:
            manager.wait_until_finished()
            manager.close()
    finally:
        if took_lock:
            wd.unlock()


def _drive(manager, step, state, batches, num_batches, checkpoint_every, desc, check, wd, show_progress):
    import orbax.checkpoint as ocp

    start = manager.latest_step() or 0
    if start > num_batches:
        raise StreamError(f"{wd.directory} has a checkpoint after batch {start} of only {num_batches}; "
                          f"delete {wd.directory} to start over")
    if start:
        try:
            state = manager.restore(start, args=ocp.args.StandardRestore(_restore_target(state)))
        except Exception as e:  # orbax raises many types for trees that do not match
            raise StreamError(
                f"cannot restore the checkpoint after batch {start} from {wd.directory}: {e}. The state "
                f"layout changed since it was written; delete {wd.directory} to start over"
            ) from e
        if start == num_batches:
            logging.info("%s: finished stream restored from %s", desc or "stream", wd.directory)
            return state
        logging.info("%s: resuming at batch %d of %d from %s", desc or "stream", start, num_batches, wd.directory)

    def save(index: int, current) -> None:
        if check is not None:
            check(current, index - 1)
        manager.save(index, args=ocp.args.StandardSave(current))

    global _RUNNING, _STOP_REQUESTED
    bar = progress_lib.progress(total=num_batches, desc=desc or "stream", unit="batch", initial=start,
                                enabled=show_progress)
    done = start
    iterator: Iterator = iter(batches(start))
    _RUNNING += 1
    try:
        for index in range(start, num_batches):
            if _STOP_REQUESTED:
                _STOP_REQUESTED = False
                if done > (manager.latest_step() or 0):
                    manager.save(done, args=ocp.args.StandardSave(state), force=True)
                manager.wait_until_finished()
                raise Interrupted(f"{desc or 'stream'} checkpointed after batch {done} of {num_batches} "
                                  f"in {wd.directory}")
            try:
                batch = next(iterator)
            except StopIteration:
                raise StreamError(f"batches({start}) ended after batch {index - 1}; {num_batches} were "
                                  "expected. Check num_batches against the data") from None
            state = step(state, batch)
            done = index + 1
            bar.update(1)
            bar.set_postfix_str(f"{_batch_items(batch)} items/batch", refresh=False)
            if done % checkpoint_every == 0 or done == num_batches:
                save(done, state)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        if done > (manager.latest_step() or 0):
            logging.warning("Interrupted: saving the state after batch %d to %s", done - 1, wd.directory)
            try:
                manager.save(done, args=ocp.args.StandardSave(state), force=True)
            except Exception as e:  # the interrupted step may have consumed the state buffers
                logging.warning("could not save the interrupted state: %s", e)
        raise
    finally:
        _RUNNING -= 1
        bar.close()
    return state
