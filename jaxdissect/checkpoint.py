"""Model checkpoints: an orbax tree of variables plus the architecture that reads them.

A model directory holds

* ``model.json``: ``{"format": "jaxdissect-model", "version": 1,
  "class": "jaxdissect.models.vgg16.VGG16", "config": {...}, "metadata": {...}}``;
  ``config`` holds the module's dataclass fields, so the module can be rebuilt
  without the code that wrote it, and ``metadata`` holds anything else worth
  keeping (source file, its SHA-256, label lists, preprocessing);
* ``variables/``: the Flax variables, written by orbax's ``StandardCheckpointer``.

Only classes inside the ``jaxdissect`` package are instantiated from a
checkpoint, so a model directory cannot make us import arbitrary code.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.errors import JaxDissectError

FORMAT = "jaxdissect-model"
VERSION = 1
_MODEL_JSON = "model.json"
_VARIABLES = "variables"
_SKIPPED_FIELDS = ("parent", "name")
# Modules that moved since models were converted: the class path recorded in an older
# model.json (old module prefix) is read as the new one.
MOVED_MODULES = {"jaxdissect.segmenters.": "jaxdissect.segmentation."}


class CheckpointError(JaxDissectError, ValueError):
    """A model directory is missing, incomplete or was not written by jaxdissect."""


def _to_json(value):
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    try:
        return {"__dtype__": jnp.dtype(value).name}
    except TypeError:
        raise CheckpointError(
            f"cannot record module setting {value!r} of type {type(value).__name__} in "
            f"{_MODEL_JSON}; module fields must be numbers, strings, dtypes or tuples of them"
        ) from None


def _from_json(value):
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    if isinstance(value, dict):
        if set(value) == {"__dtype__"}:
            return jnp.dtype(value["__dtype__"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def module_config(module) -> dict[str, Any]:
    """The dataclass fields that rebuild ``module`` (Flax's ``parent`` and ``name`` left out)."""
    return {
        f.name: _to_json(getattr(module, f.name))
        for f in dataclasses.fields(module)
        if f.name not in _SKIPPED_FIELDS and f.init
    }


def require_new_directory(directory: str) -> None:
    """Raise :class:`CheckpointError` unless ``directory`` is absent or empty (outputs never overwrite)."""
    if os.path.isdir(directory) and os.listdir(directory):
        raise CheckpointError(
            f"output directory {directory} is not empty; choose a new directory or remove it first"
        )


def save_model(directory: str, module, variables, metadata: dict | None = None) -> None:
    """Write ``module``'s architecture and ``variables`` to ``directory`` (created, must be new or empty)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    require_new_directory(directory)
    os.makedirs(directory, exist_ok=True)
    cls = type(module)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "config": module_config(module),
        "metadata": _to_json(metadata or {}),
    }
    variables = jax.tree.map(np.asarray, variables)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, _VARIABLES), variables)
    checkpointer.wait_until_finished()
    # Written last, so a directory with model.json is a complete checkpoint.
    with open(os.path.join(directory, _MODEL_JSON), "w") as f:
        json.dump(record, f, indent=1)


def _read_record(directory: str) -> dict:
    path = os.path.join(directory, _MODEL_JSON)
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"model directory {directory} does not exist; convert a checkpoint first "
            "(python -m converters.vgg16_places365 --input=... --output=DIR)"
        )
    if not os.path.exists(path):
        raise CheckpointError(
            f"{directory} has no {_MODEL_JSON}: it is not a jaxdissect model directory, or its "
            "conversion did not finish; run the converter again into an empty directory"
        )
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a jaxdissect model description (format {record.get('format')!r})")
    if record.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has format version {record.get('version')}; this jaxdissect reads version {VERSION}"
        )
    return record


def model_directory(name_or_path: str) -> str:
    """``name_or_path`` as an absolute directory: a path as given, or a registered name (``"vgg16_places365"``)
    fetched and converted into the per-user cache on first use (:func:`jaxdissect.zoo.model_dir`)."""
    from jaxdissect import zoo

    value = os.path.expanduser(str(name_or_path))
    if os.path.exists(value) or zoo.looks_like_path(value):
        return os.path.abspath(value)
    return os.path.abspath(zoo.model_dir(value))


def load_metadata(directory: str) -> dict:
    """The ``metadata`` dict stored with a model (label lists, source file, preprocessing); a name works too."""
    return _from_json(_read_record(model_directory(directory))["metadata"])


def _module_class(qualified: str):
    for old, new in MOVED_MODULES.items():
        if qualified.startswith(old):
            qualified = new + qualified[len(old):]
    modname, _, clsname = qualified.rpartition(".")
    if not (modname == "jaxdissect" or modname.startswith("jaxdissect.")):
        raise CheckpointError(
            f"model class {qualified!r} is outside the jaxdissect package; refusing to import it"
        )
    try:
        return getattr(importlib.import_module(modname), clsname)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"model class {qualified!r} not found in this jaxdissect: {e}") from e


def load_model(directory: str, dtype=None):
    """Load a converted model from its directory or by name: returns ``(module, variables)``.

    ``directory`` is a model directory, or a registered name such as
    ``"vgg16_places365"`` or ``"proggan_church"`` (``python -m jaxdissect.zoo list``),
    downloaded, verified and converted into the per-user cache on first use.
    ``module.apply(variables, x)`` is the plain forward pass. ``dtype`` (e.g.
    ``jnp.bfloat16``) overrides the compute dtype of modules that have one;
    parameters stay float32.
    """
    import orbax.checkpoint as ocp

    directory = model_directory(directory)
    record = _read_record(directory)
    cls = _module_class(record["class"])
    config = {k: _from_json(v) for k, v in record["config"].items()}
    if dtype is not None:
        if "dtype" not in {f.name for f in dataclasses.fields(cls)}:
            raise CheckpointError(f"{record['class']} has no compute dtype to override")
        config["dtype"] = jnp.dtype(dtype)
    module = cls(**config)
    path = os.path.join(directory, _VARIABLES)
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory} has no {_VARIABLES}/ directory; the checkpoint is incomplete")
    try:
        variables = ocp.StandardCheckpointer().restore(path)
    except Exception as e:  # orbax raises many types for damaged trees
        raise CheckpointError(f"cannot restore variables from {path}: {e}") from e
    return module, variables
