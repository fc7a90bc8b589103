"""Batches from a data source, decoded in a background thread while the device computes.

``batches(source, batch_size, num_items, start)`` yields fixed-size batches
(the last one padded with ``valid=False`` rows, so a jitted step compiles once)
in index order, each with ``'index'`` (global item indices) and ``'valid'``.
``prefetch(iterator, size)`` runs any iterator in a daemon thread behind a
bounded queue: order is preserved and an exception raised while producing a
batch is re-raised in the consumer at that batch. :class:`ThreadedReader`
decodes the items of one batch in parallel (the file-backed sources use it).
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

_END = object()


class ThreadedReader:
    """``read(indices, count)``: ``load(i)`` of each index, in order, on a thread pool started on first use.

    ``load`` decodes one item (Pillow releases the GIL while decoding);
    ``num_threads`` defaults to the CPU count, at most 8; ``what`` names the
    items in the error for an index out of range.
    """

    def __init__(self, load: Callable[[int], Any], what: str, num_threads: int | None = None):
        self.load, self.what = load, what
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        self._pool = None

    def read(self, indices: Sequence[int], count: int) -> tuple[list[int], list]:
        """``(indices as ints, [load(i) for i in indices])``; IndexError unless ``0 <= i < count``."""
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < count:
                raise IndexError(f"index {i} out of range for {count} {self.what}")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads)
        return indices, list(self._pool.map(self.load, indices))


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(iterable: Iterable, size: int = 2) -> Iterator:
    """Iterate ``iterable`` in a background thread, at most ``size`` items ahead."""
    if size <= 0:
        yield from iterable
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def produce():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(_Failure(e))

    thread = threading.Thread(target=produce, daemon=True, name="jaxdissect-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()


def pad_batch(batch: dict, size: int) -> dict:
    """Pad every array of ``batch`` along axis 0 to ``size`` rows (zeros; ``valid`` False)."""
    n = len(next(iter(batch.values())))
    if n == size:
        return batch
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        pad = np.zeros((size - n,) + value.shape[1:], value.dtype)
        out[key] = np.concatenate([value, pad])
    return out


def batches(source, batch_size: int, num_items: int | None = None, start: int = 0,
            *, prefetch_size: int = 2, keys: tuple[str, ...] | None = None) -> Iterator[dict]:
    """Batches ``start, start + 1, ...`` of items ``0 .. num_items - 1`` of ``source``.

    Each batch is ``source.get_batch(indices)`` (only ``keys`` if given) plus
    ``'index'`` (int32) and ``'valid'`` (bool; False for padding and unreadable
    items), padded to ``batch_size`` rows.
    """
    total = len(source) if num_items is None else int(num_items)
    num_batches = -(-total // batch_size)

    def generate():
        for b in range(start, num_batches):
            idx = np.arange(b * batch_size, min(total, (b + 1) * batch_size), dtype=np.int32)
            batch = source.get_batch(idx)
            if keys is not None:
                batch = {k: v for k, v in batch.items() if k in keys or k == "valid"}
            batch = dict(batch)
            batch["valid"] = np.asarray(batch.get("valid", np.ones(len(idx), bool)), bool)
            batch["index"] = idx
            yield pad_batch(batch, batch_size)

    return prefetch(generate(), prefetch_size)
