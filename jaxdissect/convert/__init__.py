"""Converters of published PyTorch weights into jaxdissect model directories (library side, no PyTorch needed).

Convention (every converter follows it; the model registry relies on it):

* One module per published architecture, ``jaxdissect/convert/<name>.py``,
  importing no command-line code (no absl) and no PyTorch. It exposes

  - ``convert(<role>_path, ..., output_dir, **options) -> dict``: reads the
    input files (one parameter ``<role>_path`` per file, e.g. ``input_path``,
    or ``encoder_path``/``decoder_path``/``labels_path``), checks every key and
    shape, writes the model directory with
    :func:`jaxdissect.checkpoint.save_model` (``output_dir`` must be new or
    empty) and returns the metadata it wrote (with the source file names and
    their ``source_sha256``);
  - ``convert_state_dict(state, ...) -> (module, variables)``: the same in
    memory, from NumPy arrays;
  - errors as :class:`jaxdissect.convert.common.ConversionError`.

  Shared pieces (reading ``.pth`` files without PyTorch, key/shape checks,
  re-layout helpers) are in :mod:`jaxdissect.convert.common`.

* Registration is by name only: a registry entry (``jaxdissect/zoo/registry.json``)
  ``{"converter": "<name>", "files": {"<role>_path": {"url": ..., ...}}, "options": {...}}``
  is converted by ``jaxdissect.convert.<name>.convert(output_dir=DIR,
  <role>_path=<downloaded file>, ..., **options)``; :func:`get` imports it.

* The command line is a thin ``converters/<name>.py``: ``define_flags()`` and a
  ``main`` that calls ``convert`` and prints one line, run by the launchers'
  runner ``launch.common.run`` (``--help``, one-line ``error: ...``).
"""

from __future__ import annotations

import importlib
import pkgutil

from jaxdissect.errors import JaxDissectError


class UnknownConverter(JaxDissectError, KeyError):
    """A registry entry names a converter module that does not exist."""

    def __str__(self) -> str:
        return str(self.args[0])


def names() -> list[str]:
    """The converters of this jaxdissect (module names under ``jaxdissect.convert``)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("common", "state", "torchfile"))


def get(name: str):
    """The converter module ``jaxdissect.convert.<name>`` (its ``convert`` follows the convention above)."""
    if name not in names():
        raise UnknownConverter(f"no converter {name!r} in jaxdissect.convert; known: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")
