"""Downloads a user can trust: resumed, verified, pinned, moved into place only when complete.

:func:`ensure` makes one published file present and verified under a root
folder (the per-user cache's ``zoo/downloads``, or a mirror folder):

* the file is fetched with pooch (``Pooch.fetch``: a temporary name in the
  target folder, moved into place by pooch) through :class:`Resumable`, a pooch
  downloader on requests that keeps the bytes received so far in
  ``<file>.partial`` and continues with an HTTP ``Range`` request (guarded by
  ``If-Range`` with the server's ETag) after a dropped connection, within this
  run (a few attempts) or the next; a server that ignores ``Range`` is read
  again from the start;
* the stream is hashed as it arrives and checked against the published
  checksums (a full SHA-256, the SHA-256 prefix in a torch.hub file name, an
  md5, a size) before it is moved into place; a mismatch removes what was
  received and names the file, the expected and the actual hash;
* the verified SHA-256 is written beside the file as ``<file>.sha256``
  (``sha256sum -c`` format): a file without it is never trusted, and a file
  with no published checksum is thereby pinned on first download (printed, so
  the hash can be put in a registry entry); later uses compare the pin with
  the registry, and reading the file again (to convert or unpack it) checks
  its bytes against the pin;
* a cross-process lock (:func:`jaxdissect.fileio.lock`) on the file makes a
  second process wait for the first and then use its file;
* ``JAXDISSECT_OFFLINE=1`` refuses any download, naming what is missing and
  where it would come from; ``JAXDISSECT_MIRROR=URL`` fetches every file from
  ``URL/<path of its published URL after the host>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time

from jaxdissect import fileio
from jaxdissect.errors import JaxDissectError
from jaxdissect.zoo.registry import FileSpec

ATTEMPTS = 4  # connections tried per URL, each resuming where the last stopped
CHUNK = 1 << 16  # bytes written (and lost at most, on a dropped connection) at a time
TIMEOUT = 60  # seconds without data before a connection counts as dropped


class ZooError(JaxDissectError, ValueError):
    """A published file or name that cannot be used; the message says why and what to do."""


class OfflineError(ZooError):
    """A download was needed while ``JAXDISSECT_OFFLINE=1``."""


class ChecksumError(ZooError):
    """Downloaded (or cached) bytes that do not hash to what was published or pinned."""


class DownloadError(ZooError):
    """Every URL of a file failed; the message lists each failure."""


def say(line: str) -> None:
    """One line of the zoo's news on stderr (downloads, pins, conversions)."""
    sys.stderr.write(f"jaxdissect.zoo: {line}\n")
    sys.stderr.flush()


def offline() -> bool:
    return os.environ.get("JAXDISSECT_OFFLINE", "").lower() not in ("", "0", "false", "no", "off")


def urls(spec: FileSpec) -> tuple[str, ...]:
    """The URLs to try: the mirror's only when ``$JAXDISSECT_MIRROR`` is set, else the published ones."""
    mirror = os.environ.get("JAXDISSECT_MIRROR")
    if mirror:
        return (mirror.rstrip("/") + "/" + spec.url_path,)
    return spec.urls


def human(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def file_hashes(path: str) -> tuple[str, str]:
    """``(sha256, md5)`` of a file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def check(spec: FileSpec, sha256: str, md5: str | None, size: int, where: str) -> None:
    """Raise :class:`ChecksumError` unless the hashes and size match what ``spec`` expects."""
    wrong = []
    if spec.sha256 and sha256 != spec.sha256:
        wrong.append(f"expected sha256 {spec.sha256}, got sha256 {sha256}")
    if spec.sha256_prefix and not sha256.startswith(spec.sha256_prefix):
        wrong.append(f"expected a sha256 starting {spec.sha256_prefix} (the hash in its published file name), "
                     f"got sha256 {sha256}")
    if spec.md5 and md5 is not None and md5 != spec.md5:
        wrong.append(f"expected md5 {spec.md5} (published), got md5 {md5}")
    if spec.size is not None and size != spec.size:
        wrong.append(f"expected {spec.size} bytes, got {size}")
    if wrong:
        raise ChecksumError(f"checksum mismatch for {spec.entry}: {spec.filename} from {where}: {'; '.join(wrong)}. "
                            "Nothing of it was kept. Run again to download it anew; if it fails again the file on "
                            "the server differs from the published one (give its sha256 in a JAXDISSECT_REGISTRY "
                            "entry only if you trust it)")


def read_pin(path: str) -> str | None:
    """The SHA-256 recorded beside ``path`` (None if there is none)."""
    try:
        with open(path + ".sha256", encoding="ascii") as f:
            digest = f.read().split()[0].lower()
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    return digest if len(digest) == 64 else None


def write_pin(path: str, sha256: str) -> None:
    fileio.write_text(path + ".sha256", f"{sha256}  {os.path.basename(path)}\n")


def _discard(path: str, *, pin: bool = False) -> None:
    """Remove a cached file that cannot be trusted (and its pin with ``pin``: it names other bytes)."""
    for p in (path, path + ".sha256") if pin else (path,):
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


def published(spec: FileSpec) -> bool:
    return bool(spec.sha256 or spec.sha256_prefix or spec.md5)


def expected(spec: FileSpec, path: str) -> FileSpec:
    """What the bytes at ``path`` must hash to: the published checksums, else the pin of a first download."""
    pin = None if published(spec) else read_pin(path)
    return dataclasses.replace(spec, sha256=pin) if pin else spec


class Resumable:
    """A pooch downloader (``(url, output_file, pooch)``) that resumes into ``partial`` and verifies on the fly.

    After a successful call, :attr:`sha256` holds the verified hash of the bytes
    moved to ``output_file``.
    """

    def __init__(self, spec: FileSpec, partial: str):
        self.spec, self.partial, self.meta = spec, partial, partial + ".json"
        self.sha256: str | None = None
        self.bar, self.shown = None, 0

    def _show(self, have: int, total: int | None) -> None:
        """The progress bar (size, rate, ETA) from ``have`` bytes on; a restart from 0 opens a fresh one."""
        from jaxdissect import progress

        if self.bar is not None and have < self.shown:
            self.bar.close()
            self.bar = None
        if self.bar is None:
            self.bar = progress.progress(total=total, initial=have, desc=self.spec.filename, unit="B",
                                         unit_scale=True, unit_divisor=1024)
            self.shown = have
        elif have > self.shown:
            self.bar.update(have - self.shown)
            self.shown = have

    def _resume_state(self, url: str) -> tuple[int, dict]:
        try:
            with open(self.meta, encoding="utf-8") as f:
                meta = json.load(f)
            size = os.path.getsize(self.partial)
        except (OSError, ValueError):
            return 0, {}
        if meta.get("url") != url:
            return 0, {}
        return size, meta

    def _attempt(self, url: str) -> bool:
        """One connection; returns True when the whole file is in ``partial``."""
        import requests

        have, meta = self._resume_state(url)
        headers = {}
        if have:
            headers["Range"] = f"bytes={have}-"
            if meta.get("etag") or meta.get("last_modified"):
                headers["If-Range"] = meta.get("etag") or meta.get("last_modified")
        with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
            if r.status_code == 416 and have and meta.get("total") == have:
                return True
            r.raise_for_status()
            if have and r.status_code != 206:
                have = 0  # the server ignored the range (or the file changed): start over
            total = meta.get("total") if have else None
            if r.status_code == 206:
                total = int(r.headers.get("Content-Range", "").rpartition("/")[2] or 0) or total
            elif r.headers.get("Content-Length"):
                total = int(r.headers["Content-Length"])
            fileio.write_json(self.meta, {"url": url, "etag": r.headers.get("ETag"),
                                          "last_modified": r.headers.get("Last-Modified"), "total": total})
            self._show(have, total)
            with open(self.partial, "ab" if have else "wb") as f:
                f.truncate(have)
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    self.bar.update(len(chunk))
                    self.shown += len(chunk)
            got = os.path.getsize(self.partial)
            if total is not None and got < total:
                raise requests.ConnectionError(f"connection closed after {got} of {total} bytes")
            return True

    def __call__(self, url: str, output_file: str, pooch=None) -> None:
        import requests

        try:
            for attempt in range(ATTEMPTS):
                try:
                    if self._attempt(url):
                        break
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                    if attempt == ATTEMPTS - 1:
                        raise
                    received = os.path.getsize(self.partial) if os.path.exists(self.partial) else 0
                    say(f"{self.spec.filename}: connection lost after {human(received)} ({type(e).__name__}); "
                        f"resuming (attempt {attempt + 2} of {ATTEMPTS})")
                    time.sleep(min(2 ** attempt, 10) * 0.25)
        finally:
            if self.bar is not None:
                self.bar.close()
        sha256, md5 = file_hashes(self.partial)
        try:
            check(self.spec, sha256, md5, os.path.getsize(self.partial), url)
        except ChecksumError:
            for p in (self.partial, self.meta):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
            raise
        os.replace(self.partial, output_file)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.meta)
        self.sha256 = sha256


def _trusted(spec: FileSpec, path: str, rehash: bool) -> str | None:
    """The pinned SHA-256 of a cached ``path`` if it can be used as is; stale or damaged copies are removed."""
    pin = read_pin(path)
    if pin and ((spec.sha256 and pin != spec.sha256)
                or (spec.sha256_prefix and not pin.startswith(spec.sha256_prefix))):
        say(f"{path}: its recorded sha256 {pin} is not the registry's ({spec.expected()}); downloading it again")
        _discard(path, pin=True)
        return None
    if not os.path.exists(path):
        return None
    if pin is None:
        if not published(spec):
            say(f"{path} has no recorded sha256 (its download did not finish verifying); downloading it again")
            _discard(path)
            return None
        rehash = True
    if rehash:
        sha256, md5 = file_hashes(path)
        try:
            if pin is not None and sha256 != pin:
                raise ChecksumError(f"{path} changed on disk since it was verified (sha256 {sha256}, recorded {pin})")
            check(spec, sha256, md5, os.path.getsize(path), path)
        except ChecksumError as e:
            say(f"{e}; downloading it again")
            _discard(path)
            return None
        if pin is None:
            write_pin(path, sha256)
        pin = sha256
    return pin


def ensure(spec: FileSpec, path: str, *, rehash: bool = False) -> tuple[str, bool]:
    """Make ``path`` a verified copy of ``spec``: returns ``(sha256, downloaded now)``.

    ``rehash`` checks a cached copy's bytes against its pin (pass it when the
    file is about to be read anyway).
    """
    digest = _trusted(spec, path, rehash)
    if digest:
        return digest, False
    if offline():
        raise OfflineError(missing_message([(spec, path)]))
    with fileio.lock(path + ".lock", what=f"the download of {spec.filename}", log=say):
        digest = _trusted(spec, path, rehash)
        if digest:
            return digest, False
        return _download(spec, path), True


def missing_message(missing: list[tuple[FileSpec, str]]) -> str:
    listed = "; ".join(f"{s.entry}: {s.filename}" + (f" ({human(s.size)})" if s.size else "")
                       + f" from {urls(s)[0]} into {p}" for s, p in missing)
    names = " ".join(sorted({s.entry for s, _ in missing}))
    return (f"offline (JAXDISSECT_OFFLINE=1) and not in the cache: {listed}. Fetch it where the network is "
            f"reachable (python -m jaxdissect.zoo fetch {names}), or serve a folder filled by python -m "
            "jaxdissect.zoo fetch --to=DIR and set JAXDISSECT_MIRROR, or unset JAXDISSECT_OFFLINE")


def _download(spec: FileSpec, path: str) -> str:
    import pooch
    import requests

    pooch.get_logger().setLevel("WARNING")  # its "Downloading ..." line: ours says it, with the entry's name
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    failures = []
    must = expected(spec, path)  # a file pinned before (then removed or damaged) must come back the same
    for url in urls(spec):
        say(f"downloading {spec.entry}: {url}" + (f" ({human(spec.size)})" if spec.size else ""))
        downloader = Resumable(must, path + ".partial")
        fetcher = pooch.create(path=folder, base_url="", registry={name: None}, urls={name: url})
        try:
            fetcher.fetch(name, downloader=downloader)
        except requests.RequestException as e:
            failures.append(f"{url}: {e}")
            continue
        except ChecksumError as e:
            if must is spec:
                raise
            raise ChecksumError(f"{e} (the expected sha256 was pinned at its first download, in {path}.sha256; "
                                "remove that file to accept the new bytes)") from None
        write_pin(path, downloader.sha256)
        if not published(must):
            say(f"pinned {spec.entry}: {spec.filename} has sha256 {downloader.sha256} (no published checksum; "
                f"recorded in {path}.sha256 and checked from now on; add \"sha256\": \"{downloader.sha256}\" to a "
                "JAXDISSECT_REGISTRY entry to require it everywhere)")
        return downloader.sha256
    raise DownloadError(f"cannot download {spec.filename} of {spec.entry}: " + "; ".join(failures)
                        + ". Check the network (or JAXDISSECT_MIRROR); a later run resumes what was received")
