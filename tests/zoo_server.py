"""A file server on 127.0.0.1 for the download tests: Range/If-Range/ETag, dropped connections, throttling, a log.

Started and stopped by the test that uses it; it binds the loopback address only.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """Serves ``files`` (URL path -> bytes) at ``url(path)``.

    ``drop[path] = (after, times)``: the next ``times`` responses for ``path``
    close the connection after ``after`` body bytes. ``ignore_range``: answer
    every request with the whole file. ``delay``: seconds slept per 64 KiB sent.
    ``log``: ``(path, Range header, status)`` of every request.
    """

    def __init__(self, files: dict[str, bytes] | None = None, root: str | None = None):
        self.files = dict(files or {})
        self.root = root
        self.drop: dict[str, tuple[int, int]] = {}
        self.ignore_range = False
        self.delay = 0.0
        self.log: list[tuple[str, str | None, int]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path.lstrip('/')}"

    def body(self, path: str) -> bytes | None:
        if path in self.files:
            return self.files[path]
        if self.root:
            full = os.path.join(self.root, path)
            if os.path.isfile(full) and os.path.abspath(full).startswith(os.path.abspath(self.root) + os.sep):
                with open(full, "rb") as f:
                    return f.read()
        return None

    def gets(self, path: str) -> list[tuple[str | None, int]]:
        with self.lock:
            return [(r, s) for p, r, s in self.log if p == path]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _handler(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            path = self.path.split("?")[0].lstrip("/")
            data = server.body(path)
            rng = self.headers.get("Range")
            if data is None:
                self._status(path, rng, 404)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            start = 0
            if rng and not server.ignore_range and self.headers.get("If-Range", etag) == etag:
                start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data) and start:
                self._status(path, rng, 416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206 if start else 200
            self._status(path, rng, status)
            self.send_response(status)
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            limit = len(data)
            with server.lock:
                after, times = server.drop.get(path, (0, 0))
                if times:
                    server.drop[path] = (after, times - 1)
                    limit = min(len(data), start + after)
            pos = start
            try:
                while pos < limit:
                    end = min(limit, pos + 65536)
                    self.wfile.write(data[pos:end])
                    pos = end
                    if server.delay:
                        time.sleep(server.delay)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
            if limit < len(data):  # drop the connection mid-file
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def _status(self, path, rng, status):
            with server.lock:
                server.log.append((path, rng, status))

    return Handler
