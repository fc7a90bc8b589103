"""The one progress display of jaxdissect: every long loop (passes, training, attacks, inversion) uses it.

Built on tqdm, so it works in terminals, notebooks and log files alike. Switch it
off for a whole program with ``jaxdissect.progress.set_enabled(False)`` or the
environment variable ``JAXDISSECT_PROGRESS=0``; a single call takes ``enabled=``.

A program that shows progress elsewhere (the painting app reports an upload's
inversion to a web page) wraps the work in :func:`listen`: every bar opened
in that thread also reports ``(desc, done, total)`` to a callback, shown or not.
"""

from __future__ import annotations

import contextlib
import os
import threading

_ENABLED: bool | None = None
_LOCAL = threading.local()


def set_enabled(enabled: bool) -> None:
    """Show (True) or hide (False) every progress bar from now on."""
    global _ENABLED
    _ENABLED = bool(enabled)


def enabled() -> bool:
    if _ENABLED is not None:
        return _ENABLED
    return os.environ.get("JAXDISSECT_PROGRESS", "1").lower() not in ("0", "false", "no", "off")


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
             enabled: bool | None = None, **kwargs):
    """A tqdm bar (``update(n)``, ``set_postfix(...)``, ``close()``, iteration) with the project's defaults."""
    from tqdm.auto import tqdm

    show = globals()["enabled"]() if enabled is None else enabled
    bar = tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not show,
               dynamic_ncols=True, **kwargs)
    callback = getattr(_LOCAL, "callback", None)
    if callback is None:
        return bar
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _Reported(bar, iterable, desc, initial, total, callback)


@contextlib.contextmanager
def listen(callback):
    """While active, bars opened in this thread also call ``callback(desc, done, total)`` on each update."""
    previous = getattr(_LOCAL, "callback", None)
    _LOCAL.callback = callback
    try:
        yield
    finally:
        _LOCAL.callback = previous


class _Reported:
    """A tqdm bar that also reports its count to a :func:`listen` callback (counting itself, shown or not)."""

    def __init__(self, bar, iterable, desc, initial, total, callback):
        self._bar, self._iterable, self._callback = bar, iterable, callback
        self.desc, self.n, self.total = desc, initial, total

    def update(self, n=1):
        self._bar.update(n)
        self.n += n
        self._callback(self.desc, self.n, self.total)

    def __iter__(self):
        for item in self._bar:
            self.n += 1
            self._callback(self.desc, self.n, self.total)
            yield item

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._bar, name)
