"""python -m jaxdissect.zoo list | fetch NAME... [--to=DIR] | verify [NAME...] | path NAME

``list``: every name, its kind, download size, what is cached, and what it is.
``fetch``: download, verify and convert (or unpack) ahead of time, e.g. on a
login node for workers without internet; ``--to=DIR`` instead downloads the
published files (verified, with ``.sha256`` pins) into ``DIR/<path of the
published URL>``, a folder that served over HTTP is a ``JAXDISSECT_MIRROR``.
``verify``: hash every cached file again against its pin and the published
checksums (exit 1 on a mismatch). ``path``: the ready folder of a name (a
model directory, or a data folder such as ``places:val`` or ``minilsun:church``),
fetched if needed. ``--offline`` is ``JAXDISSECT_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxdissect.errors import JaxDissectError


def _list(args) -> int:
    from jaxdissect.zoo import store
    from jaxdissect.zoo.registry import entries

    rows = [(e.name, e.kind, store.size_text(e), store.status(e, args.cache_dir), e.title)
            for e in entries().values()]
    widths = [max(len(r[i]) for r in rows + [("name", "kind", "size", "cached", "")]) for i in range(4)]
    print("  ".join(h.ljust(w) for h, w in zip(("name", "kind", "size", "cached"), widths)) + "  what")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    print(f"cache: {store.root(args.cache_dir)}; sizes with ~ are estimated from the tensor shapes")
    return 0


def _resolve(name: str, cache_dir) -> str:
    from jaxdissect.zoo import store
    from jaxdissect.zoo.registry import get

    if store.data_name(name):  # places, places:val, broden:227, minilsun:church ...
        return store.data_dir(name, flag="data", cache_dir=cache_dir)
    return store.fetch(get(name).name, cache_dir)  # an unknown name: the error lists the known ones


def _fetch(args) -> int:
    from jaxdissect.zoo import download
    from jaxdissect.zoo.registry import get

    for name in args.names:
        if args.to:
            for spec in get(name).files:
                target = os.path.join(os.path.abspath(args.to), spec.url_path)
                download.ensure(spec, target)
                print(target)
        else:
            print(_resolve(name, args.cache_dir))
    return 0


def _verify(args) -> int:
    from jaxdissect.zoo import download, store
    from jaxdissect.zoo.registry import entries, get

    chosen = [get(n) for n in args.names] if args.names else list(entries().values())
    bad = 0
    for entry in chosen:
        for spec in entry.files:
            path = store.file_path(spec, args.cache_dir)
            if not os.path.exists(path):
                if args.names:
                    print(f"{entry.name}: {spec.filename} not cached")
                continue
            pin = download.read_pin(path)
            sha256, md5 = download.file_hashes(path)
            try:
                if pin and pin != sha256:
                    raise download.ChecksumError(f"{path}: sha256 {sha256}, but {pin} was recorded when it was "
                                                 "verified: the file changed on disk; fetch it again")
                download.check(spec, sha256, md5, os.path.getsize(path), path)
            except download.ChecksumError as e:
                print(f"{entry.name}: MISMATCH {e}")
                bad += 1
                continue
            how = "published " + spec.expected() if (spec.sha256 or spec.sha256_prefix or spec.md5) else "pinned"
            print(f"{entry.name}: {spec.filename} ok, sha256 {sha256} ({how})")
    return 1 if bad else 0


def _path(args) -> int:
    print(_resolve(args.name, args.cache_dir))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxdissect.zoo", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", default=None, help="Per-user cache (default $JAXDISSECT_CACHE, "
                        "$XDG_CACHE_HOME/jaxdissect or ~/.cache/jaxdissect).")
    parser.add_argument("--offline", action="store_true", help="Never download (JAXDISSECT_OFFLINE=1).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="Names, sizes, what is cached.").set_defaults(run=_list)
    p = sub.add_parser("fetch", help="Download, verify, convert or unpack ahead of time.")
    p.add_argument("names", nargs="+")
    p.add_argument("--to", default=None, help="Only download the published files into DIR/<URL path> (a mirror).")
    p.set_defaults(run=_fetch)
    p = sub.add_parser("verify", help="Hash the cached files again (all, or the names given).")
    p.add_argument("names", nargs="*")
    p.set_defaults(run=_verify)
    p = sub.add_parser("path", help="The ready folder of a name, fetched if needed.")
    p.add_argument("name")
    p.set_defaults(run=_path)
    args = parser.parse_args(argv)
    if args.offline:
        os.environ["JAXDISSECT_OFFLINE"] = "1"
    try:
        return args.run(args)
    except JaxDissectError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted; what was received is kept and the same command resumes it\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
