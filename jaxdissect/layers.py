"""Read and edit any named layer of a Flax Linen module, inside ``jit`` and ``vmap``.

A *layer* is a submodule, named by its '.'-joined Flax module path
(``conv5_3``, ``block2.conv``, ``layers_3``); its activation is the output of
its ``__call__``. :func:`layer_names` lists them. Nothing here needs the
model's code to cooperate: capture uses ``capture_intermediates`` with a filter
on the path, editing uses ``nn.intercept_methods`` to rewrite the submodule's
output, so any Linen module a researcher brings works unchanged.

* :func:`capture` returns the output plus the activations of chosen layers
  from one forward pass.
* :func:`run` applies edits (:class:`Ablate`, :class:`SetUnits`,
  :class:`Edit`, :class:`Replace`, or any callable ``x -> x``) at named layers;
  :class:`FeatureEdit` applies one of them to the features of a basis
  (an SAE, a probe, a rotation) instead of the channels.
* :func:`run_from` evaluates only the network *above* a layer from cached
  activations of that layer.

**Pre-activations.** ``"<layer>:pre"`` names a layer's value *before* its
final nonlinearity (e.g. the conv output before the ReLU), anywhere a layer
name is accepted by :func:`capture` and :func:`run` (captured under that
name; an edit there acts before the ReLU). It resolves to a submodule path
(:func:`pre_activation`): the layer's child ``preact``, a
:class:`PreActivation` identity that a model places just before its
nonlinearity (VGG16 does), or else the layer's last direct child submodule
whose output has the layer's shape (a ``Conv`` child followed by ``relu``, as
in the small CNN). A layer with neither raises, saying how to mark it.

Edits are pytrees whose leaves are arrays, so a jitted function taking the
edit as an argument compiles once for every unit set of the same shape, and
``jax.vmap`` over a stacked edit evaluates many interventions in one call
(the weights are an argument too: closed over, XLA folds them into the
program as constants, which compiles slowly)::

    f = jax.jit(lambda v, e: run(model, v, x, edits={"conv5_3": e}))
    f(variables, Ablate(np.eye(512, dtype=bool)[7]))           # compiled once ...
    f(variables, Ablate(np.eye(512, dtype=bool)[9]))           # ... reused
    jax.vmap(f, in_axes=(None, 0))(variables, Ablate(np.eye(512, dtype=bool)))   # 512 ablations

Conventions: activations are NHWC (or ``[N, U]`` for dense layers); *units* are
the last axis. A module called several times in one forward pass (a shared
block) is edited at every call, and :func:`capture` returns a tuple of its
outputs in call order instead of a single array. Only ``__call__`` outputs are
layers; a module's other methods are not intercepted.

A plain JAX function or a Flax NNX model has no module paths to intercept;
the kernels elsewhere in jaxdissect take plain arrays, so such a model can
still be dissected by returning the wanted activations from the function
itself (NNX: ``nnx.capture``) and applying an edit object by hand
(``Ablate(units)(activation)``) where the function computes that layer.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.errors import JaxDissectError

__all__ = [
    "Ablate",
    "Edit",
    "FeatureEdit",
    "LayerError",
    "PreActivation",
    "Replace",
    "SetUnits",
    "capture",
    "layer_names",
    "layer_shapes",
    "pre_activation",
    "run",
    "run_from",
]


class LayerError(JaxDissectError, ValueError):
    """A layer name, an edit or its arguments do not fit the model."""


# --------------------------------------------------------------------------
# Edits


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def _as_array(value):
    """Lists and tuples become NumPy arrays; arrays (and tracers) pass unchanged."""
    if isinstance(value, (list, tuple)):
        value = np.asarray(value)
        if value.size == 0:
            value = value.astype(np.int32)
    elif isinstance(value, (bool, int, float, np.generic)):
        value = np.asarray(value)
    return value


class _EditBase:
    """A pytree of array fields; subclasses implement ``__call__(x) -> x``.

    Unflattening bypasses ``__init__``, so JAX transformations can rebuild an
    edit from tracers (or from ``vmap``'s axis specifications) unchecked.
    """

    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node(cls, cls._flatten, cls._unflatten)

    def _flatten(self):
        return tuple(getattr(self, f) for f in self._fields), None

    @classmethod
    def _unflatten(cls, _, children):
        obj = object.__new__(cls)
        for f, c in zip(cls._fields, children):
            object.__setattr__(obj, f, c)
        return obj

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _set(self, **fields):
        for f, v in fields.items():
            object.__setattr__(self, f, v)

    def __repr__(self):
        def show(v):
            if v is None:
                return "None"
            return f"{type(v).__name__}{getattr(v, 'shape', '')}"

        return f"{type(self).__name__}(" + ", ".join(f"{f}={show(getattr(self, f))}" for f in self._fields) + ")"


def _unit_mask(units, n_units: int, what: str):
    """A ``[n_units]`` bool mask from a bool mask or an index array (checked when concrete)."""
    units = jnp.asarray(units) if not isinstance(units, (np.ndarray, jax.Array)) else units
    if units.ndim != 1:
        raise LayerError(
            f"{what}: units has shape {tuple(units.shape)} inside one call; give a 1-D mask or index list "
            "per edit (a stacked edit needs jax.vmap over its leading axis)"
        )
    if units.dtype == bool:
        if units.shape[0] != n_units:
            raise LayerError(f"{what}: unit mask has {units.shape[0]} entries but the layer has {n_units} units")
        return jnp.asarray(units)
    if not jnp.issubdtype(units.dtype, jnp.integer):
        raise LayerError(f"{what}: units must be a bool mask or integer indices, got dtype {units.dtype}")
    if _is_concrete(units):
        bad = np.asarray(units)
        bad = bad[(bad < 0) | (bad >= n_units)]
        if bad.size:
            raise LayerError(
                f"{what}: unit indices {bad[:10].tolist()} out of range; the layer has units 0..{n_units - 1}"
            )
    return jnp.zeros((n_units,), bool).at[units].set(True, mode="drop")


def _check_array(x, what: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise LayerError(
            f"{what}: the layer's output is a {type(x).__name__}, not an array; edits need an array output"
        )
    if x.ndim < 1:
        raise LayerError(f"{what}: the layer's output is a scalar; edits need a units axis (the last axis)")


def _broadcast_operand(value, x, what: str, name: str):
    value = jnp.asarray(value, dtype=x.dtype)
    try:
        jnp.broadcast_shapes(value.shape, x.shape)
    except ValueError:
        raise LayerError(
            f"{what}: {name} of shape {tuple(value.shape)} does not broadcast to the layer's activation "
            f"{tuple(x.shape)}; use a scalar, a per-unit vector [{x.shape[-1]}] or a full tensor"
        ) from None
    return value


class Ablate(_EditBase):
    """Set ``units`` of a layer to zero.

    ``units``: a bool mask over the layer's units or a list/array of unit
    indices (turned into a mask once the unit count is known; out-of-range
    indices raise when they are concrete). A stacked ``[E, U]`` mask (or
    ``[E, k]`` indices) under ``jax.vmap`` gives ``E`` ablations in one call.
    """

    _fields = ("units",)

    def __init__(self, units):
        units = _as_array(units)
        if not hasattr(units, "dtype"):
            raise LayerError(f"Ablate: units must be a mask or a list of indices, got {type(units).__name__}")
        if units.dtype != bool and not jnp.issubdtype(units.dtype, jnp.integer):
            raise LayerError(f"Ablate: units must be a bool mask or integer indices, got dtype {units.dtype}")
        self._set(units=units)

    def __call__(self, x):
        _check_array(x, "Ablate")
        mask = _unit_mask(self.units, x.shape[-1], "Ablate")
        return jnp.where(mask, jnp.zeros((), x.dtype), x)


class SetUnits(_EditBase):
    """Set ``units`` to ``values``, everywhere or only inside a spatial ``region``.

    ``values``: a scalar, one value per listed unit (when ``units`` is a list
    of indices) or one per layer unit (when ``units`` is a bool mask).
    ``region``: ``[h, w]`` (or per image ``[N, h, w]``) bool mask or float
    weight ``w``; the result is ``x * (1 - w) + values * w`` on the units.
    """

    _fields = ("units", "values", "region")

    def __init__(self, units, values, region=None):
        units = _as_array(units)
        if units.dtype != bool and not jnp.issubdtype(units.dtype, jnp.integer):
            raise LayerError(f"SetUnits: units must be a bool mask or integer indices, got dtype {units.dtype}")
        self._set(units=units, values=_as_array(values), region=_as_array(region) if region is not None else None)

    def __call__(self, x):
        _check_array(x, "SetUnits")
        n = x.shape[-1]
        mask = _unit_mask(self.units, n, "SetUnits")
        values = jnp.asarray(self.values, x.dtype)
        if values.ndim == 1 and self.units.dtype != bool:
            if values.shape[0] != self.units.shape[0]:
                raise LayerError(
                    f"SetUnits: {values.shape[0]} values for {self.units.shape[0]} listed units; "
                    "give one value per listed unit or a scalar"
                )
            values = jnp.zeros((n,), x.dtype).at[self.units].set(values, mode="drop")
        elif values.ndim == 1 and values.shape[0] != n:
            raise LayerError(f"SetUnits: {values.shape[0]} values for a layer of {n} units; give a scalar or [{n}]")
        elif values.ndim > 1:
            raise LayerError(f"SetUnits: values must be a scalar or a vector, got shape {tuple(values.shape)}")
        weight = mask.astype(x.dtype)
        if self.region is not None:
            region = jnp.asarray(self.region).astype(x.dtype)
            if x.ndim < 3 or region.shape not in (x.shape[-3:-1], x.shape[:-1]):
                raise LayerError(
                    f"SetUnits: region of shape {tuple(region.shape)} does not match the layer's spatial shape; "
                    f"the activation is {tuple(x.shape)} (NHWC), so give [h, w] = {tuple(x.shape[-3:-1])}"
                )
            weight = region[..., None] * weight
        return x * (1 - weight) + values * weight


class Edit(_EditBase):
    """The general rule ``x * (1 - ablation) + replacement * ablation``.

    Each of ``ablation`` and ``replacement`` is a scalar, a per-unit vector
    ``[U]`` or a tensor broadcastable to the activation (NHWC, units last).
    """

    _fields = ("ablation", "replacement")

    def __init__(self, ablation, replacement=0.0):
        self._set(ablation=_as_array(ablation), replacement=_as_array(replacement))

    def __call__(self, x):
        _check_array(x, "Edit")
        a = _broadcast_operand(self.ablation, x, "Edit", "ablation")
        r = _broadcast_operand(self.replacement, x, "Edit", "replacement")
        return x * (1 - a) + r * a


class Replace(_EditBase):
    """Replace the layer's output by ``value`` (same shape), ignoring what the lower network computed.

    Under ``jit`` the ignored lower part is dead code that XLA removes; this is
    what :func:`run_from` relies on.
    """

    _fields = ("value",)

    def __init__(self, value):
        self._set(value=value)

    def __call__(self, x):
        _check_array(x, "Replace")
        if tuple(self.value.shape) != tuple(x.shape):
            raise LayerError(
                f"Replace: value of shape {tuple(self.value.shape)} does not match the layer's activation "
                f"{tuple(x.shape)}"
            )
        return jnp.asarray(self.value, x.dtype)


class FeatureEdit(_EditBase):
    """Apply a unit edit to the features of a basis: ``x + decode(params, edit(codes) - codes)``.

    ``codes = basis.encode(params, x)`` are the layer's features in
    ``basis`` (:mod:`jaxdissect.bases`: an SAE, a probe, a rotation, the
    neurons); ``edit`` is :class:`Ablate`, :class:`SetUnits`, :class:`Edit`
    or any ``codes -> codes`` pytree edit acting on them. Only the change of
    the codes is decoded and added, so the reconstruction error of a lossy
    basis stays in the layer and an edit that changes no code changes
    nothing. ``FeatureEdit(basis, params, Ablate([7]))`` removes feature 7's
    decoded contribution ``codes[..., 7] * W_dec[7]``; ``SetUnits([7], 5.0,
    region)`` inserts it with code 5 (GANPaint style). The basis is static
    (it selects the computation); its params and the edit are leaves, so
    ``jax.jit`` compiles once per basis and shape and ``jax.vmap`` maps over
    stacked edits (build the edit inside the mapped function).
    """

    _fields = ("params", "edit")

    def __init__(self, basis, params, edit):
        from jaxdissect.bases import Basis

        if not isinstance(basis, Basis):
            raise LayerError(f"FeatureEdit: basis must be a jaxdissect.bases.Basis, got {type(basis).__name__}")
        if not callable(edit):
            raise LayerError(f"FeatureEdit: edit must act on the codes (Ablate, SetUnits, ...), got {edit!r}")
        self._set(basis=basis, params=params, edit=edit)

    def _flatten(self):
        return (self.params, self.edit), self.basis

    @classmethod
    def _unflatten(cls, basis, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "basis", basis)
        object.__setattr__(obj, "params", children[0])
        object.__setattr__(obj, "edit", children[1])
        return obj

    def __call__(self, x):
        _check_array(x, "FeatureEdit")
        try:
            self.basis.check(self.params, x.shape[-1])  # shapes only: also under jit
        except ValueError as e:
            raise LayerError(f"FeatureEdit: {e}") from None
        codes = self.basis.encode(self.params, x)
        delta = self.basis.decode(self.params, self.edit(codes) - codes)
        return x + delta.astype(x.dtype)


# --------------------------------------------------------------------------
# Layer discovery


def _path(module) -> str:
    return ".".join(str(p) for p in module.path)


def _aval(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") and hasattr(x, "dtype") else x


def layer_shapes(module: nn.Module, variables, x, **apply_kwargs) -> dict[str, Any]:
    """Every layer name -> shape/dtype of its output (``jax.ShapeDtypeStruct`` pytree), in call order.

    Traced with ``jax.eval_shape``: nothing is computed. A module called
    several times maps to a tuple with one entry per call.
    """
    found: dict[str, list] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path:
            found.setdefault(_path(context.module), []).append(jax.tree.map(_aval, out))
        return out

    def trace(v, inp):
        with nn.intercept_methods(interceptor):
            return module.apply(v, inp, **apply_kwargs)

    jax.eval_shape(trace, jax.tree.map(_aval, variables), jax.tree.map(_aval, x))
    return {k: v[0] if len(v) == 1 else tuple(v) for k, v in found.items()}


def layer_names(module: nn.Module, variables, x, **apply_kwargs) -> list[str]:
    """Every capturable/editable layer name of ``module`` in the order its output is computed."""
    return list(layer_shapes(module, variables, x, **apply_kwargs))


def _unknown_layers(unknown, module, variables, x, apply_kwargs) -> LayerError:
    valid = layer_names(module, variables, x, **apply_kwargs)
    lines = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
        lines.append(f"unknown layer {name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    shown = ", ".join(valid[:60]) + (f", ... ({len(valid)} in all)" if len(valid) > 60 else "")
    return LayerError(
        "; ".join(lines) + f". {type(module).__name__} has these layers ('.'-joined module paths): {shown}"
    )


def _names(layers: str | Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(layers, str):
        return (layers,)
    names = tuple(layers)
    for n in names:
        if not isinstance(n, str):
            raise LayerError(f"{what}: layer names must be strings, got {n!r}")
    return names


# --------------------------------------------------------------------------
# Pre-activations

PRE = ":pre"
PREACT = "preact"


class PreActivation(nn.Module):
    """Identity marking a layer's value before its nonlinearity: ``PreActivation(name="preact")(y)``.

    It has no parameters (the parameter tree is unchanged); it only gives the
    pre-activation a module path, ``<layer>.preact``, that ``"<layer>:pre"``
    resolves to.
    """

    @nn.compact
    def __call__(self, x):
        return x


def _pre_activation(shapes: Mapping[str, Any], layer: str) -> str | None:
    if layer not in shapes:
        return None
    marked = f"{layer}.{PREACT}"
    if marked in shapes:
        return marked
    out = shapes[layer]
    children = [n for n in shapes if n.startswith(layer + ".") and "." not in n[len(layer) + 1:]]
    same = [n for n in children if not isinstance(shapes[n], tuple) and not isinstance(out, tuple)
            and getattr(shapes[n], "shape", None) == getattr(out, "shape", ())]
    return same[-1] if same else None


def pre_activation(module: nn.Module, variables, x, layer: str, **apply_kwargs) -> str:
    """The module path of ``layer``'s pre-activation (what ``"<layer>:pre"`` captures); see the module doc."""
    shapes = layer_shapes(module, variables, x, **apply_kwargs)
    found = _pre_activation(shapes, layer)
    if found is None:
        if layer not in shapes:
            raise _unknown_layers([layer], module, variables, x, apply_kwargs)
        raise LayerError(
            f"layer {layer!r} has no pre-activation submodule: call jaxdissect.layers.PreActivation(name='preact') "
            "on the value before its nonlinearity inside the layer's module (no parameters change), or compute the "
            "pre-activation in a child submodule"
        )
    return found


def _resolve_pre(module, variables, x, names: Iterable[str], apply_kwargs) -> dict[str, str]:
    """``{"<layer>:pre": module path}`` for the pre-activation names among ``names``."""
    wanted = [n for n in names if isinstance(n, str) and n.endswith(PRE)]
    return {n: pre_activation(module, variables, x, n[: -len(PRE)], **apply_kwargs) for n in wanted}


# --------------------------------------------------------------------------
# Capture and edit


def _apply(module, variables, x, edits: Mapping[str, Callable], capture: tuple[str, ...], apply_kwargs):
    """One forward pass with edits and captures; returns (output, captured, names of edits applied)."""
    apply_kwargs = dict(apply_kwargs)
    user_mutable = apply_kwargs.pop("mutable", False)
    wanted = frozenset(capture)
    hit: set[str] = set()

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not context.module.path:
            return out
        name = _path(context.module)
        if name in edits:
            hit.add(name)
            out = edits[name](out)
        return out

    def capture_filter(mdl, method_name):
        return method_name == "__call__" and bool(mdl.path) and _path(mdl) in wanted

    if wanted:
        if user_mutable is False:
            mutable = ["intermediates"]
        elif user_mutable is True:
            mutable = True
        else:
            mutable = list([user_mutable] if isinstance(user_mutable, str) else user_mutable) + ["intermediates"]
        apply_kwargs.update(mutable=mutable, capture_intermediates=capture_filter)
    elif user_mutable is not False:
        apply_kwargs["mutable"] = user_mutable

    if edits:
        with nn.intercept_methods(interceptor):
            result = module.apply(variables, x, **apply_kwargs)
    else:
        result = module.apply(variables, x, **apply_kwargs)

    captured = {}
    if wanted:
        output, state = result
        state = dict(state)
        inter = state.pop("intermediates", {})
        for name in capture:
            node = inter
            for part in name.split("."):
                node = node.get(part, {}) if isinstance(node, Mapping) else {}
            if isinstance(node, Mapping) and "__call__" in node:
                values = node["__call__"]
                captured[name] = values[0] if len(values) == 1 else tuple(values)
        if user_mutable is not False:
            output = (output, state)
    else:
        output = result
    return output, captured, hit


def capture(module: nn.Module, variables, x, layers: str | Iterable[str], **apply_kwargs):
    """Run ``module`` once; return ``(output, {layer: activation})``.

    ``output`` is what ``module.apply(variables, x, **apply_kwargs)`` returns
    (the top module's own output; with ``mutable=...`` the usual
    ``(output, state)`` pair). Pure and traceable: wrap it in ``jax.jit``.
    """
    names = _names(layers, "capture")
    pre = _resolve_pre(module, variables, x, names, apply_kwargs)
    paths = tuple(pre.get(n, n) for n in names)
    output, captured, _ = _apply(module, variables, x, {}, paths, apply_kwargs)
    missing = [n for n, p in zip(names, paths) if p not in captured]
    if missing:
        raise _unknown_layers(missing, module, variables, x, apply_kwargs)
    return output, {n: captured[p] for n, p in zip(names, paths)}


def run(
    module: nn.Module,
    variables,
    x,
    edits: Mapping[str, Callable] | None = None,
    capture: str | Iterable[str] = (),
    **apply_kwargs,
):
    """Run ``module`` with ``edits`` (layer name -> edit) applied to those layers' outputs.

    Returns the output, or ``(output, {layer: activation})`` when ``capture``
    names layers; captured activations are taken AFTER the edits (an edited
    layer shows its edited value; layers above it show the edit's effect).
    Edits are :class:`Ablate`, :class:`SetUnits`, :class:`Edit`,
    :class:`Replace` or any callable ``activation -> activation``. Pure and
    traceable; pass the edits as a ``jax.jit`` argument to compile once for all
    unit sets of one shape, and ``jax.vmap`` over stacked edits.
    """
    edits = dict(edits or {})
    for name, edit in edits.items():
        if not isinstance(name, str) or not callable(edit):
            raise LayerError(f"run: edits must map layer names to edits (callables), got {name!r}: {edit!r}")
    names = _names(capture, "run")
    pre = _resolve_pre(module, variables, x, list(edits) + list(names), apply_kwargs)
    edits = {pre.get(n, n): e for n, e in edits.items()}
    paths = tuple(pre.get(n, n) for n in names)
    output, captured, hit = _apply(module, variables, x, edits, paths, apply_kwargs)
    missing = [n for n in edits if n not in hit] + [n for n, p in zip(names, paths) if p not in captured]
    if missing:
        raise _unknown_layers(missing, module, variables, x, apply_kwargs)
    return (output, {n: captured[p] for n, p in zip(names, paths)}) if names else output


def _hashable_kwargs(apply_kwargs):
    items = tuple(sorted(apply_kwargs.items()))
    try:
        hash(items)
    except TypeError:
        return None
    return items


def _run_from(module, variables, layer, activation, x_aval, kwargs_items, capture):
    x = jnp.zeros(x_aval.shape, x_aval.dtype)
    return run(module, variables, x, edits={layer: Replace(activation)}, capture=capture, **dict(kwargs_items))


_run_from_jit = jax.jit(_run_from, static_argnames=("module", "layer", "x_aval", "kwargs_items", "capture"))


def run_from(module: nn.Module, variables, layer: str, activation, x_like, capture=(), **apply_kwargs):
    """Evaluate only the part of ``module`` above ``layer``, from that layer's (cached) ``activation``.

    ``x_like`` gives the shape and dtype of the model input (an array or a
    ``jax.ShapeDtypeStruct``; its values are never read). The layer's output
    is replaced by ``activation`` (:class:`Replace`); the input feeding the
    lower network is a constant, and XLA removes the now-unused lower part
    when the call is compiled, so the cost is that of the upper part alone
    (checked in tests against the compiled FLOP count). Called outside
    ``jit`` it compiles itself (once per model, layer, shape and keyword
    arguments, which must then be hashable); called inside ``jit``/``vmap``
    it is traced in place. Returns what :func:`run` returns.
    """
    x_aval = jax.ShapeDtypeStruct(tuple(x_like.shape), jnp.dtype(x_like.dtype))
    capture = _names(capture, "run_from")
    tracing = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((variables, activation)))
    items = _hashable_kwargs(apply_kwargs)
    if tracing or items is None:
        if not tracing:
            raise LayerError(
                "run_from: keyword arguments for apply are not hashable, so it cannot compile itself; "
                "call it inside your own jax.jit so the lower network is dropped"
            )
        return _run_from(module, variables, layer, activation, x_aval, tuple(apply_kwargs.items()), capture)
    return _run_from_jit(module, variables, layer, activation, x_aval, items, capture)
