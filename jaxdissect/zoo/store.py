"""Names to ready folders: download (:mod:`.download`), then convert or unpack once into the per-user cache.

Layout under ``<cache>/zoo`` (``<cache>``: :func:`jaxdissect.fileio.default_cache_dir`):

* ``downloads/<host>/<path>``: the published files as fetched, each with its
  ``.sha256`` pin;
* ``models/<name>-<hash>/``: the converted model directory;
* ``data/<name>-<hash>/``: the unpacked archive.

``<hash>`` is the start of the SHA-256 of the files it was made from, so other
bytes (a ``JAXDISSECT_REGISTRY`` override) make another folder. Conversions and
unpacking go through :func:`jaxdissect.fileio.build_once`: one process builds
into a temporary folder renamed into place when complete, others wait for it
and use it; a killed build leaves nothing that a later run trusts.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

from jaxdissect import fileio
from jaxdissect.zoo import download
from jaxdissect.zoo.download import ZooError, human, say
from jaxdissect.zoo.registry import MODEL_KINDS, Entry, FileSpec, UnknownName, entries, get, unknown_message


def root(cache_dir: str | None = None) -> str:
    """``<cache>/zoo``."""
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else fileio.default_cache_dir(),
                        "zoo")


def file_path(spec: FileSpec, cache_dir: str | None = None) -> str:
    return os.path.join(root(cache_dir), "downloads", spec.cache_key)


def _built_path(entry: Entry, digests: list[str], cache_dir: str | None) -> str:
    combined = hashlib.sha256("".join(digests).encode()).hexdigest()[:12]
    folder = "data" if entry.kind == "dataset" else "models"
    return os.path.join(root(cache_dir), folder, f"{entry.name}-{combined}")


def _files(entry: Entry, cache_dir: str | None, *, rehash: bool = False) -> list[tuple[str, str, bool]]:
    """``(path, sha256, downloaded now)`` of each file of ``entry``; offline, one error names every missing file."""
    paths = [file_path(f, cache_dir) for f in entry.files]
    if download.offline():
        missing = [(f, p) for f, p in zip(entry.files, paths) if download.read_pin(p) is None or not os.path.exists(p)]
        if missing:
            raise download.OfflineError(download.missing_message(missing))
    return [(p, *download.ensure(f, p, rehash=rehash)) for f, p in zip(entry.files, paths)]


def built(name: str, cache_dir: str | None = None) -> str | None:
    """The converted/unpacked folder of ``name`` if it is complete in the cache (nothing fetched)."""
    entry = get(name)
    digests = []
    for f in entry.files:
        pin = download.read_pin(file_path(f, cache_dir))
        if pin is None or (f.sha256 and pin != f.sha256) or (f.sha256_prefix and not pin.startswith(f.sha256_prefix)):
            return None  # not fetched, or fetched from other bytes than the registry now names
        digests.append(pin)
    target = _built_path(entry, digests, cache_dir)
    return target if os.path.isdir(target) else None


def fetch(name: str, cache_dir: str | None = None) -> str:
    """The ready folder of a registry ``name``: the converted model directory, or the unpacked data set's root.

    Downloads what is missing (verified), converts or unpacks once; a second
    call (any process) finds it in the cache and touches no network.
    """
    entry = get(name)
    target = built(name, cache_dir)  # ready: the downloaded files themselves are not needed (nor read) again
    if target is None:
        files = _files(entry, cache_dir)
        target = _built_path(entry, [sha for _, sha, _ in files], cache_dir)

        def build(tmp: str) -> None:
            # The files are read now: check a cached copy's bytes against its pin first.
            checked = [(p, sha) if fresh else (p, download.ensure(f, p, rehash=True)[0])
                       for f, (p, sha, fresh) in zip(entry.files, files)]
            if [sha for _, sha in checked] != [sha for _, sha, _ in files]:
                raise ZooError(f"the files of {name} changed while it was being built; run again")
            if entry.kind == "dataset":
                _unpack(entry, checked[0][0], tmp)
            else:
                _convert(entry, [p for p, _ in checked], tmp)

        what = f"the {'unpacking' if entry.kind == 'dataset' else 'conversion'} of {name}"
        fileio.build_once(target, build, what=what, log=say)
    if entry.kind == "dataset":
        return os.path.join(target, entry.data.get("root", ""))
    return target


def _convert(entry: Entry, paths: list[str], output_dir: str) -> None:
    from jaxdissect import convert

    say(f"converting {entry.name} ({entry.converter}) into the cache")
    module = convert.get(entry.converter)
    module.convert(output_dir=output_dir, **{f.role: p for f, p in zip(entry.files, paths)}, **entry.options)


def _unpack(entry: Entry, archive: str, output_dir: str) -> None:
    from jaxdissect import progress

    say(f"unpacking {entry.name} ({os.path.basename(archive)}) into the cache")
    try:
        with zipfile.ZipFile(archive) as z:
            members = z.infolist()
            with progress.progress(total=sum(m.file_size for m in members), desc=f"unpack {entry.name}", unit="B",
                                   unit_scale=True, unit_divisor=1024) as bar:
                for m in members:
                    z.extract(m, output_dir)  # zipfile drops absolute paths and '..' components
                    bar.update(m.file_size)
    except zipfile.BadZipFile as e:
        raise ZooError(f"{archive} is not a readable zip archive ({e}); remove it and fetch {entry.name} again") from None
    inner = os.path.join(output_dir, entry.data.get("root", ""))
    if not os.path.isdir(inner):
        raise ZooError(f"{archive} has no folder {entry.data.get('root')!r}, where {entry.name}'s data should be; "
                       "the registry entry's data.root is wrong")


# --------------------------------------------------------------------------- names where a path is accepted


def looks_like_path(value: str) -> bool:
    """A value meant as a path (has a separator, or starts with . or ~), not a registry name."""
    return os.sep in value or "/" in value or value.startswith((".", "~"))


def model_dir(name_or_path: str, *, flag: str = "model", kind: str | None = None, fetch_now: bool = True,
              cache_dir: str | None = None) -> str:
    """The one way to get a model: an existing path as given, else a registry name fetched and converted.

    ``kind`` (e.g. ``'encoder'``) also accepts the short name ``<x>`` for
    ``<x>_<kind>`` (``--encoder=church``). With ``fetch_now=False`` nothing is
    fetched (the check a launcher makes before any work) and the value is
    returned unchanged. Anything else raises :class:`UnknownName`, which says
    how to get a model: the known names, and the converter for a file of one's own.
    """
    value = os.path.expanduser(str(name_or_path))
    if os.path.exists(value):
        return value
    kinds = (kind,) if kind in MODEL_KINDS else MODEL_KINDS
    known = {n: e for n, e in entries().items() if e.kind in kinds}
    name = value if value in known else f"{value}_{kind}" if kind and f"{value}_{kind}" in known else None
    if name is None:
        if looks_like_path(value):
            raise UnknownName(f"--{flag}={name_or_path}: no such directory. Give a converted model directory (python "
                              "-m converters.<architecture> --input=FILE --output=DIR) or a known name: "
                              + ", ".join(sorted(known)))
        raise UnknownName(unknown_message(f"--{flag}={name_or_path}: neither an existing path nor a known name",
                                          value, sorted(known))
                          + "; or give a converted model directory (python -m converters.<architecture> "
                            "--input=FILE --output=DIR)")
    return fetch(name, cache_dir) if fetch_now else value


def data_name(spec: str) -> tuple[str, str] | None:
    """``(registry name, subfolder)`` a ``--data`` spec names (``places``, ``places:val``, ``broden:227``,
    ``minilsun:church``), or None when it names no registered data set. Nothing is fetched."""
    scheme, _, arg = str(spec).partition(":")
    for entry in entries().values():
        if entry.kind != "dataset":
            continue
        for pattern in entry.data.get("specs", []):
            if pattern == spec:
                return entry.name, ""
            if "<" in pattern and pattern.split(":")[0] == scheme and arg:
                return entry.name, arg
    return None


def data_dir(spec: str, *, flag: str = "data", cache_dir: str | None = None) -> str:
    """The folder a registered ``--data`` spec reads, fetched and unpacked on first use."""
    named = data_name(spec)
    if named is None:
        specs = sorted(p for e in entries().values() if e.kind == "dataset" for p in e.data.get("specs", []))
        raise UnknownName(f"--{flag}={spec}: not a registered data set; known: {', '.join(specs)}")
    name, sub = named
    folder = fetch(name, cache_dir)
    if not sub:
        return folder
    for candidate in (f"{sub}_train", sub):
        if os.path.isdir(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    present = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    raise UnknownName(f"--{flag}={spec}: {name} has no folder {sub}_train or {sub}; it has: {', '.join(present)}")


def segmenter_spec(spec: str, *, fetch_now: bool = True, cache_dir: str | None = None) -> str:
    """A ``--segmenter`` value with names resolved: ``upp=<dir>[,color=<dir>],setting=<s>``.

    Accepted: a setting of the original (``netpqc``, ``netpq``, ``netc``, ...:
    the published UPP segmenter, plus the colour one for a ``c``), ``upp``
    (the UPP segmenter alone, setting ``net``), ``color`` (UPP with colours,
    ``netc``: the colour labels are merged into UPP's), ``dataset``, or
    ``upp=<dir or name>,color=<dir or name>,setting=<s>`` as before.
    """
    spec = str(spec).strip()
    if spec == "dataset":
        return spec
    if "=" not in spec:
        setting = {"upp": "net", "color": "netc"}.get(spec, spec)
        if not setting.startswith("net"):
            raise UnknownName(f"--segmenter={spec}: give a setting of the original (netpqc, netpq, netc, ...), upp, "
                              "color, dataset, or upp=<dir>,color=<dir>,setting=<setting>")
        fields = {"upp": "upp", "setting": setting}
        if "c" in setting[3:]:
            fields["color"] = "color"
    else:
        fields = dict(item.partition("=")[::2] for item in spec.split(","))
    known = [n for n, e in entries().items() if e.kind == "segmenter"]
    for key in ("upp", "color"):
        value = fields.get(key, "").strip()
        if value in known and not os.path.exists(value):  # a path (even a missing one) is left to the loader
            fields[key] = fetch(value, cache_dir) if fetch_now else value
    return ",".join(f"{k}={v}" for k, v in fields.items())


def status(entry: Entry, cache_dir: str | None = None) -> str:
    """``ready`` (converted/unpacked), ``downloaded`` (files only), ``partial`` or ``-`` (nothing cached)."""
    try:
        if built(entry.name, cache_dir):
            return "ready"
    except UnknownName:
        return "-"
    paths = [file_path(f, cache_dir) for f in entry.files]
    if all(download.read_pin(p) for p in paths):
        return "downloaded"
    if any(os.path.exists(p) or os.path.exists(p + ".partial") for p in paths):
        return "partial"
    return "-"


def size_text(entry: Entry) -> str:
    if all(f.size is not None for f in entry.files):
        return human(entry.size)
    return f"~{human(entry.approx_size)}" if entry.approx_size else "?"
