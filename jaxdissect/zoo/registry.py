"""The registry of published files: ``registry.json`` in this package, plus ``$JAXDISSECT_REGISTRY``.

An entry (see ``_about`` in ``registry.json``) names one model or data set and
the files it is made from. ``$JAXDISSECT_REGISTRY=FILE`` is a JSON object
mapping names to entries in the same form: a new name adds a user's own model
or data; a built-in name has its fields replaced by the ones given (``url``,
``sha256``, ...). A ``sha256`` given there replaces the published checksums
(``sha256_prefix``, ``md5``), since it names other bytes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from importlib import resources
from urllib.parse import urlsplit

from jaxdissect.errors import JaxDissectError

KINDS = ("classifier", "generator", "encoder", "segmenter", "scorer", "dataset")
MODEL_KINDS = KINDS[:5]
_FILE_FIELDS = ("url", "sha256", "sha256_prefix", "md5", "size")
_HEX = re.compile(r"[0-9a-f]+")


class RegistryError(JaxDissectError, ValueError):
    """A registry entry that cannot be used; the message names the entry, the field and the fix."""


class UnknownName(RegistryError, KeyError):
    """A name that no registry entry has; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One published file: where it comes from and what it must hash to."""

    entry: str  # the registry name it belongs to
    role: str  # the converter's parameter (``input_path``) or ``archive``
    urls: tuple[str, ...]
    sha256: str | None = None
    sha256_prefix: str | None = None
    md5: str | None = None
    size: int | None = None

    @property
    def filename(self) -> str:
        return os.path.basename(urlsplit(self.urls[0]).path)

    @property
    def url_path(self) -> str:
        """The published URL's path after the host (``models/vgg16_places365-0bafbc55.pth``): a mirror's layout."""
        return urlsplit(self.urls[0]).path.lstrip("/")

    @property
    def cache_key(self) -> str:
        """Where the file lives under the download cache: host and path of its first URL."""
        parts = urlsplit(self.urls[0])
        return os.path.join(parts.netloc.replace(":", "_") or "local", parts.path.lstrip("/"))

    def expected(self) -> str:
        """The checksums it must match, in words (for messages)."""
        said = []
        if self.sha256:
            said.append(f"sha256 {self.sha256}")
        elif self.sha256_prefix:
            said.append(f"sha256 starting {self.sha256_prefix} (the hash in its published file name)")
        if self.md5:
            said.append(f"md5 {self.md5} (published)")
        return " and ".join(said) or "nothing (no published checksum: pinned on first download)"


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    title: str
    files: tuple[FileSpec, ...]
    converter: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)
    approx_size: int | None = None
    source: str = ""

    @property
    def size(self) -> int | None:
        """Download size in bytes: exact where every file's size is known, else the estimate (or None)."""
        sizes = [f.size for f in self.files]
        return sum(sizes) if all(s is not None for s in sizes) else self.approx_size


def _fail(name: str, problem: str, origin: str):
    raise RegistryError(f"registry entry {name!r} ({origin}): {problem}")


def _file(name: str, role: str, raw: dict, origin: str) -> FileSpec:
    if not isinstance(raw, dict):
        _fail(name, f"file {role!r} must be an object with 'url'", origin)
    unknown = sorted(set(raw) - set(_FILE_FIELDS))
    if unknown:
        _fail(name, f"file {role!r} has unknown fields {unknown}; allowed: {', '.join(_FILE_FIELDS)}", origin)
    urls = raw.get("url")
    urls = [urls] if isinstance(urls, str) else urls
    if not urls or not all(isinstance(u, str) and urlsplit(u).scheme in ("http", "https", "file") for u in urls):
        _fail(name, f"file {role!r} needs 'url': an http(s) URL or a list of them", origin)
    for field, length in (("sha256", 64), ("md5", 32), ("sha256_prefix", None)):
        value = raw.get(field)
        if value is not None and not (isinstance(value, str) and _HEX.fullmatch(value.lower())
                                      and (length is None or len(value) == length)):
            _fail(name, f"file {role!r}: {field} must be {length or 'some'} hex digits, got {value!r}", origin)
    size = raw.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        _fail(name, f"file {role!r}: size must be a byte count, got {size!r}", origin)
    lower = lambda v: v.lower() if isinstance(v, str) else v  # noqa: E731
    return FileSpec(name, role, tuple(urls), lower(raw.get("sha256")), lower(raw.get("sha256_prefix")),
                    lower(raw.get("md5")), size)


def _entry(name: str, raw: dict, origin: str) -> Entry:
    kind = raw.get("kind")
    if kind not in KINDS:
        _fail(name, f"kind must be one of {', '.join(KINDS)}, got {kind!r}", origin)
    if "files" in raw:
        if not isinstance(raw["files"], dict) or not raw["files"]:
            _fail(name, "'files' must map converter parameters (e.g. encoder_path) to files", origin)
        files = tuple(_file(name, role, f, origin) for role, f in raw["files"].items())
    else:
        role = "archive" if kind == "dataset" else "input_path"
        files = (_file(name, role, {k: raw[k] for k in _FILE_FIELDS if k in raw}, origin),)
    if kind == "dataset":
        data = raw.get("data")
        if not isinstance(data, dict) or data.get("reader") not in ("places", "broden", "folder"):
            _fail(name, "a dataset needs 'data': {'reader': places|broden|folder, 'root': folder in the archive}",
                  origin)
    elif not isinstance(raw.get("converter"), str):
        _fail(name, "a model needs 'converter': the module name under jaxdissect.convert", origin)
    return Entry(name, kind, str(raw.get("title", "")), files, raw.get("converter"), dict(raw.get("options") or {}),
                 dict(raw.get("data") or {}), raw.get("approx_size"), str(raw.get("source", "")))


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    if "sha256" in override:  # other bytes: the published checksums no longer apply
        merged.pop("sha256_prefix", None)
        merged.pop("md5", None)
    if "files" in override and "files" in base:
        files = dict(base["files"])
        for role, f in override["files"].items():
            old = dict(files.get(role, {}))
            if "sha256" in f:
                old.pop("sha256_prefix", None)
                old.pop("md5", None)
            files[role] = {**old, **f}
        override = {**override, "files": files}
    merged.update(override)
    return merged


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise RegistryError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise RegistryError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise RegistryError(f"{what} {path} must be a JSON object mapping names to entries")
    return raw


def builtin() -> dict:
    """The raw built-in registry (``registry.json``), without ``_about``."""
    text = resources.files(__package__).joinpath("registry.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def entries() -> dict[str, Entry]:
    """Every entry: the built-in ones merged with ``$JAXDISSECT_REGISTRY``'s."""
    raw = {k: (v, "built in") for k, v in builtin().items()}
    path = os.environ.get("JAXDISSECT_REGISTRY")
    if path:
        for name, value in _read_json(path, "JAXDISSECT_REGISTRY").items():
            if name.startswith("_"):
                continue
            if not isinstance(value, dict):
                raise RegistryError(f"JAXDISSECT_REGISTRY {path}: entry {name!r} must be an object")
            base = raw.get(name, ({}, ""))[0]
            raw[name] = (_merge(base, value), f"JAXDISSECT_REGISTRY={path}")
    return {name: _entry(name, value, origin) for name, (value, origin) in raw.items()}


def get(name: str, kinds=KINDS) -> Entry:
    """The entry ``name`` of one of ``kinds``; :class:`UnknownName` lists the known ones otherwise."""
    known = {n: e for n, e in entries().items() if e.kind in kinds}
    if name in known:
        return known[name]
    raise UnknownName(unknown_message(f"{name!r} is not a known name", name, sorted(known)))


def unknown_message(problem: str, name: str, known: list[str]) -> str:
    """``problem``, the close matches of ``name`` among ``known`` (like a mistyped flag), and all of them."""
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else "."
    return (f"{problem}{hint} Known names: {', '.join(known)} (python -m jaxdissect.zoo list; add your own with "
            "JAXDISSECT_REGISTRY=FILE)")
