"""PyTorch state dicts <-> Flax variables by name, for modules whose Flax paths are the PyTorch module paths.

The CLIP and ViT modules name every submodule as the PyTorch module it
mirrors, so a Flax variable ``('params', 'visual', 'conv1', 'kernel')`` is the
tensor ``visual.conv1.weight``. :func:`torch_layout` derives the exact key
and shape the state dict must have for every variable (conv kernels
``[kh, kw, in, out]`` are ``[out, in, kh, kw]``, dense kernels transposed,
LayerNorm/BatchNorm ``scale`` is ``weight``, BatchNorm statistics
``running_mean``/``running_var``, ``nn.MultiheadAttention``'s fused
``in_proj`` is ``in_proj_weight``/``in_proj_bias``, an embedding table is
``weight``; other parameters keep their name and layout);
:func:`check_state` reports every missing, unexpected and mis-shaped tensor at
once; :func:`build_variables` re-lays the tensors. Reading ``.safetensors``
needs no PyTorch (:func:`jaxdissect.convert.common.load_state_dict`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

from jaxdissect.convert.common import ConversionError, check_state_dict

_LEAF = {("params", "scale"): "weight", ("params", "bias"): "bias", ("params", "embedding"): "weight",
         ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def torch_layout(shapes) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """PyTorch key -> (Flax variable path, PyTorch shape) for a tree of variable shapes (``jax.eval_shape``)."""
    layout = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = tuple(str(getattr(p, "key", p)) for p in path)
        collection, modules, leaf_name = names[0], list(names[1:-1]), names[-1]
        shape = tuple(leaf.shape)
        if modules and modules[-1] == "in_proj":
            modules[-1] = f"in_proj_{'weight' if leaf_name == 'kernel' else 'bias'}"
            torch_name = None
        elif leaf_name == "kernel":
            torch_name = "weight"
        else:
            torch_name = _LEAF.get((collection, leaf_name), leaf_name)
        if leaf_name == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        key = ".".join(modules + ([torch_name] if torch_name else []))
        layout[key] = (names, shape)
    return layout


def check_state(state: Mapping[str, np.ndarray], layout: Mapping[str, tuple], *, what: str,
                ignore: tuple[str, ...] = ()) -> None:
    """:func:`jaxdissect.convert.common.check_state_dict` against a :func:`torch_layout`."""
    check_state_dict(state, {k: shape for k, (_, shape) in layout.items()}, what=what, ignore=ignore)


def build_variables(state: Mapping[str, np.ndarray], layout: Mapping[str, tuple]) -> dict:
    """Flax variables (float32 NumPy) from a checked ``state``: kernels re-laid, everything else as is."""
    variables: dict = {}
    for key, (names, _) in layout.items():
        value = np.asarray(state[key], np.float32)
        if names[-1] == "kernel":
            value = np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value.T
        node = variables
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = np.array(value, np.float32, order="C")  # (ascontiguousarray would make a scalar 1-D)
    return variables


def count(state: Mapping[str, np.ndarray], prefix: str, suffix: str) -> int:
    """How many distinct indices ``N`` keys ``{prefix}N.{...}{suffix}`` have (e.g. the transformer's depth)."""
    found = {k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix) and k.endswith(suffix)}
    return len(found)


def shape_of(state: Mapping[str, np.ndarray], key: str, what: str) -> tuple[int, ...]:
    """The shape of ``state[key]``, or a :class:`ConversionError` saying the file is not ``what``."""
    if key not in state:
        raise ConversionError(f"this state dict has no {key!r}, so it is not {what}; "
                              f"its first keys are {sorted(state)[:5]}")
    return tuple(np.shape(state[key]))


def save(output_dir: str, converted, source_path: str | None = None, source_sha256: str | None = None) -> dict:
    """Write ``(module, variables, metadata)`` with :func:`jaxdissect.checkpoint.save_model`, noting the source file."""
    from jaxdissect.checkpoint import save_model

    module, variables, metadata = converted
    if source_path:
        metadata["source_file"] = os.path.basename(source_path)
    if source_sha256:
        metadata["source_sha256"] = source_sha256
    save_model(output_dir, module, variables, metadata)
    return metadata
