"""What the classifier and generator interventions share: their error and name look-up."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class InterventionError(ValueError):
    """Bad arguments to an intervention: unknown class, concept or layer, bad units, mismatched data."""


def lookup(names: Sequence[str], name: str, what: str) -> int:
    """Index of ``name`` in ``names``; an unknown name raises, listing the close matches.

    ``what`` names the kind of thing ("class", "concept") in the message.
    """
    names = list(names)
    if name in names:
        return names.index(name)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    raise InterventionError(
        f"unknown {what} {name!r}" + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
        + f" ({len(names)} known, e.g. {', '.join(map(str, names[:5]))})"
    )
