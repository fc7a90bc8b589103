"""Basis specs as users write them: ``neurons``, ``rotation:ALPHA[:SEED]``, ``sae:EXPANSION[,k=K]``, ``probe:net2vec``.

:func:`parse` turns one spec into a :class:`BasisSpec` (a frozen, JSON-able
description) or raises :class:`~jaxdissect.bases.BasisError` with a one-line
message naming the fix; :func:`parse_list` reads several separated by ``;``
(the SAE spec has a comma of its own). A spec of a fixed basis builds its
``(basis, params)`` for a layer at once (:meth:`BasisSpec.build`); a learned
one (``sae``, ``probe``) is trained from data by
:func:`jaxdissect.bases.sae.train_or_load` or
:func:`jaxdissect.bases.probe.train_or_load`.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxdissect.bases import BasisError, Linear, Neurons

FORMS = "neurons, rotation:ALPHA[:SEED], sae:EXPANSION[,k=K] or probe:net2vec"
DEFAULT_K = 32
PROBE_METHODS = ("net2vec",)


@dataclasses.dataclass(frozen=True)
class BasisSpec:
    """One parsed basis spec; ``text`` is the spec as given (normalised)."""

    kind: str                       # "neurons" | "rotation" | "sae" | "probe"
    alpha: float | None = None      # rotation power
    seed: int | None = None         # rotation seed
    expansion: float | None = None  # SAE features per channel
    k: int | None = None            # SAE active features per position
    method: str | None = None       # probe method

    @property
    def learned(self) -> bool:
        """Whether the basis is trained from data (``sae``, ``probe``)."""
        return self.kind in ("sae", "probe")

    @property
    def text(self) -> str:
        """The canonical spelling, also a view name: ``rotation:0.5:1``, ``sae:8,k=32``."""
        if self.kind == "rotation":
            return f"rotation:{_number(self.alpha)}:{self.seed}"
        if self.kind == "sae":
            return f"sae:{_number(self.expansion)},k={self.k}"
        if self.kind == "probe":
            return f"probe:{self.method}"
        return "neurons"

    def units(self, channels: int) -> int | None:
        """The number of units on a layer of ``channels`` channels (None for a probe: one per concept)."""
        if self.kind == "sae":
            return max(1, int(round(self.expansion * channels)))
        return None if self.kind == "probe" else int(channels)

    def build(self, channels: int, unpermute: bool = False):
        """``(basis, params)`` of a fixed basis for a layer of ``channels`` channels (``unpermute``: a rotation's
        units permuted back towards the channels, NetDissect's ``--rotation_unpermute``)."""
        if self.kind == "neurons":
            return Neurons(), {}
        if self.kind == "rotation":
            from jaxdissect.rotation import RotationError, random_rotation_powers

            try:
                matrix = random_rotation_powers(channels, [self.alpha], self.seed, unpermute)[0]
            except RotationError as e:
                raise BasisError(f"{self.text}: {e}") from None
            return Linear(label=self.text), {"matrix": matrix.astype(np.float32)}
        raise BasisError(f"{self.text} is learned from data: train it with jaxdissect.bases."
                         f"{self.kind}.train_or_load (the dissection driver does this for a learned basis)")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?"


def parse(spec: str) -> BasisSpec:
    """One spec -> :class:`BasisSpec`; raises :class:`BasisError` naming the accepted forms."""
    text = (spec or "").strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    rest = rest.strip()
    if kind == "neurons" and not rest:
        return BasisSpec("neurons")
    if kind == "rotation":
        m = re.fullmatch(rf"({_NUMBER})(?::(\d+))?", rest)
        if not m:
            raise BasisError(f"basis {text!r}: give rotation:ALPHA[:SEED], e.g. rotation:1 or rotation:0.5:7 "
                             "(alpha >= 0, integer seed >= 0, default 1)")
        return BasisSpec("rotation", alpha=float(m.group(1)), seed=int(m.group(2) or 1))
    if kind == "sae":
        m = re.fullmatch(rf"({_NUMBER})(?:\s*,\s*k\s*=\s*(\d+))?", rest)
        if not m or float(m.group(1)) <= 0 or (m.group(2) is not None and int(m.group(2)) < 1):
            raise BasisError(f"basis {text!r}: give sae:EXPANSION[,k=K], e.g. sae:8 or sae:4,k=16 (features per "
                             f"channel > 0; K >= 1 active features per position, default {DEFAULT_K})")
        return BasisSpec("sae", expansion=float(m.group(1)), k=int(m.group(2) or DEFAULT_K))
    if kind == "probe":
        if rest.lower() not in PROBE_METHODS:
            raise BasisError(f"basis {text!r}: give probe:net2vec (the probe methods: {', '.join(PROBE_METHODS)})")
        return BasisSpec("probe", method=rest.lower())
    raise BasisError(f"unknown basis {text!r}: give {FORMS}")


def parse_list(text: str) -> list[BasisSpec]:
    """Several specs separated by ``;`` (e.g. ``neurons;rotation:1;sae:8,k=32``); duplicates are refused."""
    specs = [parse(part) for part in (text or "").split(";") if part.strip()]
    if not specs:
        raise BasisError(f"no basis given: give one or more of {FORMS}, separated by ';'")
    seen = set()
    for s in specs:
        if s.text in seen:
            raise BasisError(f"basis {s.text} is listed twice; list each basis once")
        seen.add(s.text)
    return specs


def resolve(spec: BasisSpec | str, channels: int, *, cache_dir: str | None = None, identity: dict | None = None,
            activations=None, labelled=None, num_labels: int | None = None, label_names=None, settings=None,
            unpermute: bool = False, progress: bool | None = None, log=None):
    """``(basis, params, info)`` of ``spec`` on a layer of ``channels`` channels, training a learned one.

    A fixed basis (``neurons``, ``rotation``) needs nothing else. ``sae``
    needs ``activations`` (``batches(start)`` of the layer's activations,
    e.g. :func:`jaxdissect.bases.sae.activation_batches`), ``probe`` needs
    ``labelled`` (``batches()`` of ``(acts, seg)``), ``num_labels`` and
    ``label_names``; both need ``cache_dir`` and ``identity`` (JSON-able:
    model, layer, data), which key the per-user cache. ``settings``
    (:class:`jaxdissect.bases.sae.Settings` or
    :class:`jaxdissect.bases.probe.Settings`) overrides the training
    defaults; an SAE's ``expansion`` and ``k`` always come from the spec.
    ``unpermute`` goes to a rotation's :meth:`BasisSpec.build`.
    """
    spec = parse(spec) if isinstance(spec, str) else spec
    if not spec.learned:
        basis, params = spec.build(channels, unpermute)
        return basis, params, {"spec": spec.text}
    if cache_dir is None or identity is None:
        raise BasisError(f"{spec.text} is trained from data: give cache_dir and identity (model, layer, data)")
    if spec.kind == "sae":
        from jaxdissect.bases import sae

        if activations is None:
            raise BasisError(f"{spec.text}: give activations=batches(start) of the layer's activations to train it")
        s = dataclasses.replace(settings or sae.Settings(), expansion=spec.expansion, k=spec.k)
        basis, params, info = sae.train_or_load(cache_dir, identity, activations, channels, s, progress=progress,
                                                log=log)
    else:
        from jaxdissect.bases import probe

        if labelled is None or num_labels is None:
            raise BasisError(f"{spec.text}: give labelled=batches() of (acts, seg) and num_labels to train it")
        basis, params, info = probe.train_or_load(cache_dir, identity, labelled, num_labels, label_names=label_names,
                                                  settings=settings or probe.Settings(), progress=progress, log=log)
    return basis, params, dict(info, spec=spec.text)
