"""Time of getting a published model by name: download (from a server on 127.0.0.1), verify, convert; then cached.

    python -m bench.zoo [--names=vgg16_places365,proggan_church]

The files are random weights of the published sizes and key names (made with
PyTorch, served from this machine), so the figures are what the zoo itself
costs on top of the network: hashing, the torch-free reader, the conversion and
the orbax write; a real download adds its transfer time. Prints the load
average, since the machine may be shared.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def _state(name: str):
    import torch

    from jaxdissect.convert import proggan, vgg16_places365
    from jaxdissect.models.proggan import LSUN_SIZES

    shapes = (vgg16_places365.expected_shapes() if name == "vgg16_places365"
              else proggan.expected_shapes(LSUN_SIZES))
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()}


def main(argv):
    import torch
    from zoo_server import FileServer

    names = (argv[0].removeprefix("--names=").split(",") if argv else ["vgg16_places365", "proggan_church"])
    os.environ["JAXDISSECT_PROGRESS"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JAXDISSECT_CACHE"] = os.path.join(tmp, "cache")
        server = FileServer()
        overrides = {}
        from jaxdissect import zoo

        for name in names:
            spec = zoo.get(name).files[0]
            buf = io.BytesIO()
            torch.save(_state(name), buf, _use_new_zipfile_serialization=False)  # the published files' era
            data = buf.getvalue()
            server.files[spec.url_path] = data
            overrides[name] = {"url": server.url(spec.url_path), "sha256": hashlib.sha256(data).hexdigest()}
        with open(os.path.join(tmp, "registry.json"), "w") as f:
            json.dump(overrides, f)
        os.environ["JAXDISSECT_REGISTRY"] = os.path.join(tmp, "registry.json")
        print(f"load average {os.getloadavg()[0]:.1f} (shared machine)")
        for name in names:
            t0 = time.perf_counter()
            zoo.fetch(name)
            t1 = time.perf_counter()
            zoo.fetch(name)
            t2 = time.perf_counter()
            size = len(server.files[zoo.get(name).files[0].url_path]) / 1e6
            print(f"{name}: {size:.0f} MB; first use (loopback download, verify, convert) {t1 - t0:.1f} s; "
                  f"cached {1000 * (t2 - t1):.0f} ms")
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
