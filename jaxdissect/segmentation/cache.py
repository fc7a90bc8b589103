"""On-disk cache of segmentation label maps, shared by every dissection of a dataset.

The segmenter is the most expensive network of a dissection. Its labels depend
only on the images and the segmenter, not on the model being dissected, so
they are kept on disk and a second dissection (another model, other layers,
a comparison) of the same data reads them instead of segmenting again::

    cache = open_cache(root, key, tables, num_channels=6, resolution=(56, 56))
    labels = cache.lookup(indices)          # int32 [B, K, S, S], or None unless all are there
    if labels is None:
        labels = segment(...)
        cache.store(indices, labels)        # buffered; written as chunk files
    cache.flush()                           # at the end of a pass (or on an error)

One entry per key (data fingerprint, segmenter digest, settings, format
version) lives in ``<root>/segmentation/<sha256(key)[:16]>/``: ``entry.json``
(the key in clear and the label tables) and ``labels-<start>-<stop>.npy``
chunks (items ``start .. stop - 1``, uint8 when there are fewer than 256
labels, else uint16, at the segmentation resolution). A chunk is written to a
temporary name and renamed into place (:mod:`jaxdissect.fileio`), so a killed run never leaves a chunk
that reads as complete, and two runs writing the same chunk write the same
bytes. Faults never cost results: an entry or chunk that does not match is
not used (the log says why); an unwritable directory, a full disk or the size
budget stop the writing for the run with one log line, and the labels are
computed as without a cache. Pure host I/O (NumPy), no JAX.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from jaxdissect import fileio

FORMAT = 1
SUBDIR = "segmentation"
CHUNK_BYTES = 32 * 2**20
_CHUNK = re.compile(r"^labels-(\d+)-(\d+)\.npy$")
_MAX_LOGGED = 5


def digest(value: Any) -> str:
    """16 hex digits of sha256 over the canonical JSON of ``value``."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def variables_digest(variables) -> str:
    """16 hex digits of sha256 over every leaf's path, shape, dtype and bytes (a pytree of arrays)."""
    import jax

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # the bytes, not a copy of them
    return h.hexdigest()[:16]


def _describe(obj, depth: int = 0):
    """A JSON-able description of a segmenter's static settings (fields of nested dataclasses/modules)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if depth > 6:
        return type(obj).__qualname__
    if isinstance(obj, np.dtype):
        return str(obj)
    if not isinstance(obj, np.ndarray) and hasattr(obj, "__array__") and hasattr(obj, "shape"):
        obj = np.asarray(obj)
    if isinstance(obj, np.ndarray):
        return {"array": hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()[:16],
                "shape": list(obj.shape), "dtype": str(obj.dtype)}
    if isinstance(obj, (list, tuple)):
        return [_describe(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _describe(getattr(obj, f.name, None), depth + 1)
                  for f in dataclasses.fields(obj) if f.name not in ("parent", "name")}
        return {"class": type(obj).__qualname__, **fields}
    if isinstance(obj, type):
        return obj.__qualname__
    return type(obj).__qualname__


def segmenter_digest(segmentation) -> Any:
    """What identifies a segmentation: ``'dataset'``, or the segmenter's class, variables and labels.

    For a ``(segmenter, variables)`` pair: its class name, a digest of its
    variables, of its label names and of its static settings (the module's
    fields: setting, quirks, compute dtype, ...).
    """
    if isinstance(segmentation, str):
        return segmentation
    seg, seg_vars = segmentation
    names = [str(n) for n in getattr(seg, "label_names", ())]
    return {"class": type(seg).__name__, "variables": variables_digest(seg_vars),
            "labels": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
            "settings": digest(_describe(seg))}


def label_dtype(num_labels: int):
    """The compact storage dtype for label numbers ``0 .. num_labels - 1``."""
    if num_labels <= 256:
        return np.uint8
    if num_labels <= 65536:
        return np.uint16
    return np.int32


class SegmentationCache:
    """One cache entry: lookup and buffered store of label maps by item index (see the module docstring)."""

    def __init__(self, directory: str, key: dict, tables: dict, num_channels: int, resolution: Sequence[int],
                 *, max_bytes: int | None, used_bytes: int, writable: bool, log: Callable[[str], None]):
        self.directory, self.key, self.tables = directory, key, tables
        self.shape = (int(num_channels),) + tuple(int(s) for s in resolution)
        self.num_labels = len(tables["label_names"])
        self.dtype = np.dtype(label_dtype(self.num_labels))
        self.max_bytes, self.used_bytes = max_bytes, int(used_bytes)
        self.writable = writable
        self.log = log
        self.image_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.chunk_images = max(1, CHUNK_BYTES // self.image_bytes)
        self.hits = self.misses = self.written = 0
        self._chunks: list[tuple[int, int, str]] = []
        self._bad: set[str] = set()
        self._loaded: dict[str, np.ndarray] = {}
        self._pending: list[tuple[int, Any]] = []  # (first index, labels of a contiguous run)
        self._pending_count = 0
        self.scan()

    # -- reading -----------------------------------------------------------
    def scan(self) -> None:
        """(Re)list the complete chunks on disk (temporary files are never listed)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            names = []
        chunks = []
        for n in names:
            m = _CHUNK.match(n)
            if m and n not in self._bad and int(m.group(2)) > int(m.group(1)):
                chunks.append((int(m.group(1)), int(m.group(2)), n))
        self._chunks = sorted(chunks)

    def _chunk(self, name: str, start: int, stop: int) -> np.ndarray | None:
        if name in self._loaded:
            return self._loaded[name]
        path = os.path.join(self.directory, name)
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
            problem = None
            if a.shape != (stop - start,) + self.shape:
                problem = f"shape {a.shape}, expected {(stop - start,) + self.shape}"
            elif a.dtype != self.dtype:
                problem = f"dtype {a.dtype}, expected {self.dtype}"
        except (OSError, ValueError, EOFError) as e:
            problem = f"unreadable ({e})"
        if problem is not None:
            logging.warning("segmentation cache: chunk %s is %s: not used (it is recomputed)", path, problem)
            self._bad.add(name)
            self.scan()
            return None
        if len(self._loaded) >= 4:
            self._loaded.pop(next(iter(self._loaded)))
        self._loaded[name] = a
        return a

    def _gather(self, indices: np.ndarray) -> np.ndarray | None:
        out = np.zeros((len(indices),) + self.shape, np.int32)
        todo = np.ones(len(indices), bool)
        for first, labels in self._pending:
            inside = todo & (indices >= first) & (indices < first + len(labels))
            if inside.any():
                out[inside] = np.asarray(labels)[indices[inside] - first]
                todo &= ~inside
        for start, stop, name in list(self._chunks):
            if not todo.any():
                break
            inside = todo & (indices >= start) & (indices < stop)
            if not inside.any():
                continue
            chunk = self._chunk(name, start, stop)
            if chunk is None:
                continue
            rows = np.asarray(chunk[indices[inside] - start], np.int32)
            if rows.size and int(rows.max()) >= self.num_labels:
                logging.warning("segmentation cache: chunk %s holds label %d but there are %d labels: not used",
                                os.path.join(self.directory, name), int(rows.max()), self.num_labels)
                self._bad.add(name)
                self.scan()
                continue
            out[inside] = rows
            todo &= ~inside
        return None if todo.any() else out

    def lookup(self, indices) -> np.ndarray | None:
        """int32 ``[B, K, S, S]`` labels of items ``indices``, or None unless every one is cached."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        out = self._gather(indices)
        if out is None:
            self.scan()  # another run may have written chunks since
            out = self._gather(indices)
        if out is None:
            self.misses += len(indices)
        else:
            self.hits += len(indices)
        return out

    # -- writing -----------------------------------------------------------
    def store(self, indices, labels) -> None:
        """Keep the label maps of items ``indices`` (``[B, K, S, S]``, any array type) for writing."""
        if not self.writable:
            return
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices for {len(labels)} label maps")
        if not len(indices):
            return
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(indices)]])):
            first = int(indices[lo])
            if self._pending:
                last_first, last = self._pending[-1]
                if last_first + len(last) != first:
                    self.flush()
            self._pending.append((first, labels[lo:hi]))
            self._pending_count += int(hi - lo)
            if self._pending_count >= self.chunk_images:
                self.flush()

    def flush(self) -> None:
        """Write what ``store`` kept as one chunk file (atomic: temporary name, then rename)."""
        pending, self._pending, self._pending_count = self._pending, [], 0
        if not pending or not self.writable:
            return
        first = pending[0][0]
        try:
            labels = np.concatenate([np.asarray(a) for _, a in pending])
        except ValueError as e:
            logging.warning("segmentation cache: cannot write labels (%s): not written", e)
            return
        if labels.shape[1:] != self.shape or (labels.size and (labels.min() < 0 or labels.max() >= self.num_labels)):
            logging.warning("segmentation cache: label maps of shape %s (values up to %s) do not match the entry "
                            "(%s, %d labels): not written", labels.shape[1:], labels.max() if labels.size else "-",
                            self.shape, self.num_labels)
            return
        data = labels.astype(self.dtype)
        if self.max_bytes is not None and self.used_bytes + data.nbytes > self.max_bytes:
            self.writable = False
            self.log(f"segmentation cache: the size budget of {self.max_bytes / 2**20:.0f} MiB is reached "
                     f"({self.used_bytes / 2**20:.0f} MiB used): no more labels are written in this run "
                     "(raise the budget or clear the cache)")
            return
        name = f"labels-{first}-{first + len(data)}.npy"
        path = os.path.join(self.directory, name)
        try:
            with fileio.atomic_file(path) as f:
                _save(f, data)
        except OSError as e:
            self.writable = False
            logging.warning("segmentation cache: cannot write %s (%s); the labels are computed as without a "
                            "cache and nothing more is written in this run", path, e)
            return
        self.used_bytes += data.nbytes
        self.written += len(data)
        self._bad.discard(name)
        self._loaded.pop(name, None)
        self.scan()


def _save(f, data: np.ndarray) -> None:
    """Write ``data`` as ``.npy`` to the file object ``f`` (a temporary file renamed into place when complete)."""
    np.save(f, data, allow_pickle=False)


def _remove_stale_temporaries(directory: str, age_s: float = 3600.0) -> None:
    """Remove temporary files that killed runs left (older than ``age_s``: a live writer renames within seconds)."""
    import time

    try:
        names = os.listdir(directory)
    except OSError:
        return
    now = time.time()
    for n in names:
        path = os.path.join(directory, n)
        if n.startswith(".") and n.endswith(".tmp"):
            try:
                if now - os.path.getmtime(path) > age_s:
                    os.remove(path)
            except OSError:
                pass


def _tree_bytes(directory: str) -> int:
    total = 0
    for base, _, files in os.walk(directory):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(base, f))
            except OSError:
                pass
    return total


def _read_entry(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "entry.json")) as f:
            entry = json.load(f)
        return entry if isinstance(entry, dict) else None
    except (OSError, ValueError):
        return None


def _explain_others(base: str, own: str, key: dict, log: Callable[[str], None]) -> None:
    """Log why other entries of the same data or segmenter (or an older format) are not used."""
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return
    said = 0
    for name in names:
        path = os.path.join(base, name)
        if name == own or not os.path.isdir(path) or said >= _MAX_LOGGED:
            continue
        entry = _read_entry(path)
        other = entry.get("key") if entry else None
        if not isinstance(other, dict):
            continue
        if other.get("format") != key["format"]:
            if other.get("data") == key["data"]:
                log(f"segmentation cache: entry {path} was written by format {other.get('format')}, this is "
                    f"format {key['format']}: not used (delete it to reclaim the space)")
                said += 1
            continue
        differing = sorted(k for k in set(key) | set(other) if key.get(k) != other.get(k))
        if other.get("data") == key["data"] and "segmenter" in differing:
            log(f"segmentation cache: entry {path} holds labels of the same data from another segmenter "
                f"({other['segmenter']}, this one is {key['segmenter']}): not used")
            said += 1
        elif other.get("segmenter") == key["segmenter"] and _same_source(other.get("data"), key["data"]) \
                and "data" in differing:
            log(f"segmentation cache: entry {path} holds labels of another version of this data "
                f"({_dict_diff(other.get('data'), key['data'])} changed): not used")
            said += 1
        elif other.get("data") == key["data"] and other.get("segmenter") == key["segmenter"]:
            log(f"segmentation cache: entry {path} holds labels of this data and segmenter with other settings "
                f"({', '.join(differing)} differ): not used")
            said += 1


def _same_source(a, b) -> bool:
    """Two data fingerprints of the same source (same kind and location or name), maybe another version."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    ids = [k for k in ("kind", "name", "root", "data_dir") if k in a or k in b]
    return bool(ids) and all(a.get(k) == b.get(k) for k in ids)


def _dict_diff(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))) or "nothing"
    return "the fingerprint"


def open_cache(root: str, key: dict, tables: dict, num_channels: int, resolution: Sequence[int], *,
               max_mb: float | None = None, log: Callable[[str], None] = logging.info) -> SegmentationCache | None:
    """The entry of ``key`` under ``root/segmentation`` (created when missing), or None when unusable.

    ``key``: what determines the labels (JSON-able: data fingerprint,
    ``segmenter_digest``, settings); ``FORMAT`` is added. ``tables``:
    ``{'label_names', 'label_categories', 'categories'}``, stored with the
    entry and checked against it. ``max_mb``: size budget of the whole
    ``root/segmentation`` tree (None: unbounded); writing stops when it is
    reached. ``log`` receives the informational lines; faults are logged as
    warnings. Several processes of one job (``jax.process_count() > 1``) do
    not use the cache.
    """
    try:
        import jax

        processes = jax.process_count()
    except Exception:  # noqa: BLE001 (no JAX backend: a single process)
        processes = 1
    if processes > 1:
        log(f"segmentation cache: not used in a multi-process run ({processes} processes)")
        return None
    key = {**json.loads(json.dumps(key, sort_keys=True, default=str)), "format": FORMAT}
    tables = {k: [str(v) for v in tables[k]] for k in ("label_names", "label_categories", "categories")}
    base = os.path.join(os.path.abspath(os.path.expanduser(root)), SUBDIR)
    name = digest(key)
    directory = os.path.join(base, name)
    _explain_others(base, name, key, log)
    entry = _read_entry(directory) if os.path.isdir(directory) else None
    if entry is not None:
        stored = entry.get("key", {}) if isinstance(entry.get("key"), dict) else {}
        if stored.get("format") != FORMAT:
            logging.warning("segmentation cache: entry %s was written by format %s, this is format %s: not used "
                            "(delete it to rebuild)", directory, stored.get("format"), FORMAT)
            return None
        if stored != key or entry.get("tables") != tables:
            what = "key" if stored != key else "label tables"
            logging.warning("segmentation cache: entry %s has another %s than this run's: not used (delete it to "
                            "rebuild)", directory, what)
            return None
    else:
        try:  # two runs creating the entry at once write the same file, each under its own temporary name
            os.makedirs(directory, exist_ok=True)
            fileio.write_json(os.path.join(directory, "entry.json"),
                              {"key": key, "tables": tables, "channels": int(num_channels),
                               "resolution": [int(s) for s in resolution],
                               "dtype": np.dtype(label_dtype(len(tables["label_names"]))).name}, sort_keys=True)
        except OSError as e:
            logging.warning("segmentation cache: cannot write to %s (%s); segmenting as without a cache", base, e)
            return None
    _remove_stale_temporaries(directory)
    max_bytes = None if max_mb is None else int(float(max_mb) * 2**20)
    used = _tree_bytes(base) if max_bytes is not None else 0
    cache = SegmentationCache(directory, key, tables, num_channels, resolution, max_bytes=max_bytes,
                              used_bytes=used, writable=True, log=log)
    cached = sum(stop - start for start, stop, _ in cache._chunks)
    log(f"segmentation cache: {directory} ({len(cache._chunks)} chunks, up to {cached} label maps"
        + ("" if max_bytes is None else f"; {used / 2**20:.0f} of {max_mb:g} MiB used") + ")")
    return cache


open_segmentation_cache = open_cache  # the name exported as jaxdissect.open_segmentation_cache
