"""Open a local page in headless Chromium: screenshot it or dump its DOM after scripts ran.

Used by the report tests (skipped where no ``chromium`` is installed) and
handy by hand: ``python tests/screenshot.py results/run/index.html out.png``.
The flags keep Chromium off the network and out of the user's profile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=3000")


def browser() -> str | None:
    """Path of an installed Chromium, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(page: str, extra: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = browser()
    if exe is None:
        raise FileNotFoundError("no chromium on PATH; install it (apt-get install chromium)")
    url = page if "://" in page else Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=timeout)


def screenshot(page: str, png: str, width: int = 1200, height: int = 1600, timeout: float = 120) -> str:
    """Screenshot ``page`` (a file path or URL, ``#fragment`` allowed in URLs) into ``png``."""
    png = os.path.abspath(png)
    result = _run(page, [f"--screenshot={png}", f"--window-size={width},{height}"], timeout)
    if not os.path.exists(png):
        raise RuntimeError(f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}")
    return png


def dump_dom(page: str, timeout: float = 120) -> str:
    """The page's DOM serialised after its scripts ran."""
    result = _run(page, ["--dump-dom"], timeout)
    if result.returncode != 0 or "<html" not in result.stdout:
        raise RuntimeError(f"chromium --dump-dom failed (exit {result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/screenshot.py PAGE OUT.png")
    print(screenshot(sys.argv[1], sys.argv[2]))
