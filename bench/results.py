"""The shared results file: each benchmark owns one ``## `` section of ``bench/RESULTS.md``."""

from __future__ import annotations

import os


def load_note(*loads: float) -> str:
    """How busy the machine was, from 1-minute load averages taken during a run (2 = a benchmark's own two threads)."""
    return ("nothing else running" if max(loads) < 2.5 else
            "the machine was shared with other jobs, so absolute times are noisy, ratios less so")


def write_section(path: str, section: str, body: str) -> None:
    """Replace (or append) the section headed ``section`` with ``body``, leaving the others alone."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    body = body.rstrip("\n") + "\n"
    start = text.find(section)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(section))
        text = text[:start] + body + ("\n" + text[end + 1:] if end >= 0 else "")
    with open(path, "w") as f:
        f.write(text)
