"""Bases: what counts as a "unit" of a layer.

A basis maps a layer's ``C`` channels to ``U`` units at every position of its
feature map (or token of a transformer). The dissection driver applies it right
after capture, so thresholds, IoU, labels, strips, significance and reports
treat a basis's units exactly as neurons; interventions remove or insert a
unit's decoded contribution. A basis object holds only static settings and is
hashable (jitted code is cached on it); its arrays travel separately as
``params``, passed to jit as arguments (never closed over, which would make
XLA fold them into the program as constants).

* :class:`Neurons`: the identity (``U = C``), today's units.
* :class:`Linear`: ``u = W a`` with ``params = {"matrix": W [U, C]}``; the 2017
  random rotation (``jaxdissect.rotation``) is ``Linear`` with ``W = Q^alpha``.

Learned bases implement the same interface:

* :class:`jaxdissect.bases.sae.TopKSAE`: a TopK sparse autoencoder
  (Gao et al. 2024), trained on a layer's activations, resumable and cached
  per user (:func:`jaxdissect.bases.sae.train_or_load`);
* :class:`jaxdissect.bases.probe.Probe`: Net2Vec concept directions trained
  on segmentation labels (:func:`jaxdissect.bases.probe.train_or_load`).

:mod:`jaxdissect.bases.spec` reads the specs users write (``neurons``,
``rotation:ALPHA[:SEED]``, ``sae:EXPANSION[,k=K]``, ``probe:net2vec``) and
:func:`jaxdissect.bases.spec.resolve` turns one into ``(basis, params,
info)``. :class:`jaxdissect.layers.FeatureEdit` removes or inserts a
basis's features in a forward pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.errors import JaxDissectError


class BasisError(JaxDissectError, ValueError):
    """A basis that does not fit the layer it is applied to, or a basis spec that cannot be read."""


def params_digest(params: Mapping[str, Any]) -> str:
    """A short sha256 of a basis's arrays (names, dtypes, shapes and bytes), for a run's resume identity."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(np.asarray(params[name]))
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


class Basis:
    """Interface of a basis (subclasses are frozen dataclasses of static settings).

    ``encode(params, acts [..., C]) -> [..., U]`` float32 and
    ``decode(params, codes [..., U]) -> [..., C]`` are pure and jit-traceable.
    ``decode`` gives the units' contribution to the layer, so that removing
    units ``S`` from a layer ``a`` is ``a - decode(params, codes * 1[S])``
    (for a linear basis, ``codes = encode(params, a)``); the reconstruction
    error of a lossy basis stays in the layer. The method ``codes(params,
    acts)`` is ``encode`` in the form the statistics read fastest (a sparse
    basis lists its nonzero units at each position).
    """

    kind = "basis"

    def num_units(self, params: Mapping[str, Any], channels: int) -> int:
        raise NotImplementedError

    def check(self, params: Mapping[str, Any], channels: int) -> None:
        """Raise :class:`BasisError` when this basis cannot act on a layer of ``channels`` channels."""

    def encode(self, params, acts):
        raise NotImplementedError

    def decode(self, params, codes):
        raise NotImplementedError

    def codes(self, params, acts):
        """:meth:`encode` in the form the statistics read fastest: the dense ``[..., U]`` units, or a sparse
        basis's :class:`~jaxdissect.kernels.codes.SparseCodes` (the same values)."""
        return self.encode(params, acts)

    def identity(self, params: Mapping[str, Any]) -> dict:
        """JSON-able description that changes whenever the units change (settings and a digest of params)."""
        return {"kind": self.kind, **dataclasses.asdict(self), "params": params_digest(params)}

    def describe(self) -> str:
        return self.kind


@dataclasses.dataclass(frozen=True)
class Neurons(Basis):
    """The layer's own channels."""

    kind = "neurons"

    def num_units(self, params, channels):
        return int(channels)

    def encode(self, params, acts):
        return jnp.asarray(acts, jnp.float32)

    def decode(self, params, codes):
        return codes

    def identity(self, params):
        return {"kind": self.kind}


@dataclasses.dataclass(frozen=True)
class Linear(Basis):
    """``u = W a`` over the channels, ``params = {"matrix": W [U, C]}`` (a rotation when ``W`` is orthogonal).

    ``decode`` is ``W^T u``: for an orthogonal ``W`` it is the exact inverse,
    so removing a unit removes its component and nothing else.
    """

    kind = "linear"
    label: str = "linear"

    def num_units(self, params, channels):
        return int(np.shape(params["matrix"])[0])

    def check(self, params, channels):
        shape = tuple(np.shape(params["matrix"]))
        if len(shape) != 2 or shape[1] != channels:
            raise BasisError(f"a {'x'.join(map(str, shape))} {self.label} matrix cannot act on a layer with "
                             f"{channels} channels; it needs shape [units, {channels}]")

    def encode(self, params, acts):
        acts = jnp.asarray(acts, jnp.float32)
        return jnp.einsum("...j,ij->...i", acts, jnp.asarray(params["matrix"], acts.dtype))

    def decode(self, params, codes):
        return jnp.einsum("...i,ij->...j", codes, jnp.asarray(params["matrix"], codes.dtype))

    def describe(self):
        return self.label


def apply(basis: Basis, params, acts) -> jax.Array:
    """``basis.encode(params, acts)`` after checking the channel count (outside jit: shapes only)."""
    basis.check(params, int(np.shape(acts)[-1]))
    return basis.encode(params, acts)
