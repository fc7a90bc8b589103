"""The GANPaint-style web app: a Starlette ASGI application over a :class:`~jaxdissect.app.painter.Painter`.

Routes (JSON API documented in the README, section "Painting app"):

* ``GET /`` the page; ``GET /static/app.js``, ``/static/app.css`` its code (only these files are served).
* ``GET /api/concepts`` brushes, strengths, the stroke grid size.
* ``GET /api/images`` the generated image ids.
* ``POST /api/generate`` ``{image: id | upload: id, strokes: [...]}`` -> ``{image: PNG data URL}``.
* ``POST /api/upload`` a photo (raw image body, or JSON ``{image: data URL}``) -> ``{id, status, ...}``.
* ``GET /api/upload/{id}`` the upload's status and progress; the reconstruction once done.

Every refused request gets a 4xx ``{"error": message}``; an unexpected failure
gets a 500 with a one-line message and no traceback.
"""

from __future__ import annotations

import json
import logging
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jaxdissect.app.codec import STRENGTHS, ApiError, decode_data_url, encode_png

MAX_JSON_BYTES = 4 << 20
MAX_UPLOAD_BYTES = 8 << 20
_STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
           "index.html": "text/html; charset=utf-8"}
_log = logging.getLogger(__name__)


def _static(name: str) -> bytes:
    return resources.files("jaxdissect.app").joinpath("static", name).read_bytes()


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or actual)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "malformed Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, f"{what} is {int(declared)} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: Request, limit: int = MAX_JSON_BYTES) -> dict:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, f"send JSON (Content-Type: application/json), got {ctype or 'no content type'!r}")
    raw = await _read_body(request, limit, "request body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def create_app(painter, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, allowed_hosts=None) -> Starlette:
    """The ASGI app serving ``painter``; run it with uvicorn on 127.0.0.1 (see ``launch.ganpaint``).

    ``allowed_hosts``: Host header values accepted (others get a 400), which keeps a web page from
    reaching a localhost server through DNS rebinding; None accepts any.
    """

    async def page(request):
        return Response(_static("index.html"), media_type=_STATIC["index.html"],
                        headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:",
                                 "X-Content-Type-Options": "nosniff"})

    async def static(request):
        name = request.path_params["name"]
        if name not in _STATIC or name == "index.html":
            raise ApiError(404, f"no such file: {name[:80]!r}")
        return Response(_static(name), media_type=_STATIC[name], headers={"X-Content-Type-Options": "nosniff"})

    async def concepts(request):
        h, w = painter.mask_size
        return JSONResponse({"layer": painter.layer, "units": painter.num_units, "concepts": painter.concepts(),
                             "strengths": STRENGTHS, "default_strength": painter.default_strength,
                             "mask_size": [h, w], "image_size": [painter.resolution, painter.resolution],
                             "uploads": painter.invert_fn is not None})

    async def images(request):
        return JSONResponse({"images": painter.image_ids()})

    async def generate(request):
        body = await _json_body(request)
        unknown = set(body) - {"image", "upload", "strokes", "request"}
        if unknown:
            raise ApiError(400, f"unknown fields {sorted(unknown)}; use image or upload, strokes, request")
        x, adaptation = painter.source(body)
        strokes = painter.parse_strokes(body.get("strokes"))
        image = await run_in_threadpool(painter.generate, x, strokes, adaptation)
        reply = {"image": encode_png(image)}
        if "request" in body:
            reply["request"] = body["request"]
        return JSONResponse(reply)

    async def upload(request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            body = await _json_body(request, limit=max_upload_bytes * 4 // 3 + 4096)
            if set(body) != {"image"}:
                raise ApiError(400, "send {\"image\": \"data:image/...;base64,...\"} or the raw image bytes")
            _, raw = decode_data_url(body["image"], "image", max_bytes=max_upload_bytes)
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            raw = await _read_body(request, max_upload_bytes, "upload")
        else:
            raise ApiError(415, f"upload a photo as raw image bytes (Content-Type: image/png, image/jpeg) or as JSON "
                                f"{{\"image\": data URL}}; got {ctype or 'no content type'!r}")
        if not raw:
            raise ApiError(400, "the upload is empty; send a PNG or JPEG photo")
        job = await run_in_threadpool(painter.submit, raw)
        return JSONResponse(job.report(), status_code=202)

    async def upload_status(request):
        job = painter.upload(request.path_params["uid"])
        reply = job.report()
        if job.reconstruction is not None:
            reply["image"] = encode_png(job.reconstruction)
        return JSONResponse(reply)

    async def api_error(request, exc: ApiError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def http_error(request, exc: HTTPException):
        message = {404: f"not found: {request.url.path[:100]}",
                   405: f"method {request.method} not allowed on {request.url.path[:100]}"}.get(exc.status_code,
                                                                                              str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code)

    async def server_error(request, exc: Exception):
        _log.exception("ganpaint: unexpected failure on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has details"},
                            status_code=500)

    routes = [
        Route("/", page),
        Route("/static/{name}", static),
        Route("/api/concepts", concepts),
        Route("/api/images", images),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/upload/{uid}", upload_status),
    ]
    middleware = []
    if allowed_hosts is not None:
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})


__all__ = ["create_app", "MAX_UPLOAD_BYTES"]
