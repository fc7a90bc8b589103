"""The one progress display of jaxdissect: every long loop (passes, training, attacks, inversion) uses it.

Built on tqdm, so it works in terminals, notebooks and log files alike. Switch it
off for a whole program with ``jaxdissect.progress.set_enabled(False)`` or the
environment variable ``JAXDISSECT_PROGRESS=0``; a single call takes ``enabled=``.
"""

from __future__ import annotations

import os

_ENABLED: bool | None = None


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
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not show,
                dynamic_ncols=True, **kwargs)
