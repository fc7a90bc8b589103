"""What the classifier and generator interventions share: their error and name look-up."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

from jaxdissect.errors import JaxDissectError


class InterventionError(JaxDissectError, ValueError):
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


def unit_masks(unit_sets, num_units: int) -> np.ndarray:
    """Unit sets (index lists or bool masks) -> bool masks ``[E, U]``; empty or out-of-range sets raise."""
    if isinstance(unit_sets, np.ndarray) and unit_sets.dtype == bool:
        masks = unit_sets.reshape(-1, unit_sets.shape[-1])
        if masks.shape[1] != num_units:
            raise InterventionError(f"unit masks have {masks.shape[1]} entries; the layer has {num_units} units")
        return masks
    unit_sets = list(unit_sets)
    if not unit_sets:
        raise InterventionError("no unit sets given")
    masks = np.zeros((len(unit_sets), num_units), bool)
    for i, units in enumerate(unit_sets):
        units = np.asarray(units)
        if units.dtype == bool:
            if units.shape != (num_units,):
                raise InterventionError(f"unit set {i}: mask of shape {units.shape}; the layer has {num_units} units")
            masks[i] = units
            continue
        if units.size == 0:
            raise InterventionError(f"unit set {i} is empty; give at least one unit to ablate")
        if not np.issubdtype(units.dtype, np.integer):
            raise InterventionError(f"unit set {i}: units must be integer indices, got {units.dtype}")
        bad = units[(units < 0) | (units >= num_units)]
        if bad.size:
            raise InterventionError(
                f"unit set {i}: unit indices {bad[:10].tolist()} out of range; the layer has units 0..{num_units - 1}"
            )
        masks[i, units] = True
    return masks
