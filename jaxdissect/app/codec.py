"""Request decoding for the painting app: data URLs, PNG masks, uploaded photos, stroke stacks.

Pure functions of request data, so every check is testable without a server.
Each failure raises :class:`ApiError` with the HTTP status and a one-line
message that names the problem and the fix; the server turns it into
``{"error": message}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np

from jaxdissect.errors import JaxDissectError

# Formats accepted for an uploaded photo (what Pillow sniffs from the bytes, not the claimed type).
PHOTO_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"^data:(?P<mime>[a-z]+/[a-z0-9.+-]+)?(?P<params>(;[a-z0-9-]+=[^;,]*)*)"
                       r"(?P<b64>;base64)?,(?P<data>.*)$", re.IGNORECASE | re.DOTALL)
STRENGTHS = {"low": 4, "med": 10, "high": 15}


class ApiError(JaxDissectError, ValueError):
    """A request the server refuses: ``status`` is the HTTP code, the message says why and what to send."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_data_url(value, what: str, *, max_bytes: int) -> tuple[str, bytes]:
    """``data:<mime>;base64,<data>`` -> ``(mime, bytes)``; a malformed or oversized URL -> 400/413."""
    if not isinstance(value, str):
        raise ApiError(400, f"{what} must be a data URL string (data:image/png;base64,...), "
                            f"got {type(value).__name__}")
    m = _DATA_URL.match(value)
    if not m:
        raise ApiError(400, f"{what} is not a data URL; send data:image/png;base64,<base64 bytes>")
    if not m.group("b64"):
        raise ApiError(400, f"{what}: only base64 data URLs are accepted (data:image/png;base64,...)")
    data = m.group("data")
    if len(data) * 3 // 4 > max_bytes:
        raise ApiError(413, f"{what} is about {len(data) * 3 // 4} bytes; the limit is {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what}: the data URL's base64 payload is malformed") from None
    return (m.group("mime") or "").lower(), raw


def _open_image(raw: bytes, what: str, formats=PHOTO_FORMATS, max_pixels: int = 40_000_000):
    """Pillow image of ``raw``: 415 when it is not an image of ``formats``, 413 when it has over ``max_pixels``.

    The size is read from the header before any pixel is decoded (Pillow's own
    decompression-bomb check, which refuses huge images while opening them,
    is answered as too large, not as unreadable).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise ApiError(413, f"{what} is too large: over {max_pixels} pixels (the limit); send a smaller image") \
            from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ApiError(415, f"{what} is not a readable image; send a PNG or JPEG photo") from None
    if image.format not in formats:
        raise ApiError(415, f"{what} is a {image.format} image; send one of {', '.join(formats)}")
    if image.width * image.height > max_pixels:
        raise ApiError(413, f"{what} is {image.width}x{image.height} pixels; the limit is {max_pixels} pixels")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ApiError(415, f"{what} is not a readable image; send a PNG or JPEG photo") from None
    return image


def decode_mask(value, shape: tuple[int, int], what: str = "mask", *, max_bytes: int = 1 << 20) -> np.ndarray:
    """A stroke mask -> float32 ``[H, W]`` in {0, 1}.

    Accepted forms: a PNG data URL of exactly ``shape`` (``[H, W]``) pixels
    where any pixel with non-zero alpha is painted (the original's
    convention), or a nested list of ``H`` rows of ``W`` numbers in [0, 1].
    """
    h, w = shape
    if isinstance(value, list):
        try:  # float64 first: JSON numbers beyond float32's range are refused below, not overflowed to inf
            mask = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise ApiError(400, f"{what}: a list mask must be {h} rows of {w} numbers") from None
        if mask.shape != (h, w):
            raise ApiError(422, f"{what} has shape {list(mask.shape)}; this model's strokes are {h}x{w} "
                                "(see mask_size in GET /api/concepts)")
        if not np.all(np.isfinite(mask)) or mask.min(initial=0) < 0 or mask.max(initial=0) > 1:
            raise ApiError(422, f"{what}: values must be finite numbers in [0, 1]")
        return mask.astype(np.float32)
    _, raw = decode_data_url(value, what, max_bytes=max_bytes)
    image = _open_image(raw, what, formats=("PNG",))
    if image.size != (w, h):
        raise ApiError(422, f"{what} is {image.width}x{image.height} pixels; this model's strokes are {w}x{h} "
                            "(see mask_size in GET /api/concepts)")
    if "A" in image.getbands():
        alpha = np.asarray(image.getchannel("A"))
    elif image.mode == "P" and "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    else:
        alpha = np.asarray(image.convert("L"))  # no alpha: any non-black pixel is painted
    return (alpha > 0).astype(np.float32)


def encode_png(image: np.ndarray) -> str:
    """uint8 ``[H, W, 3]`` -> ``data:image/png;base64,...`` (lossless, so clients see the exact pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(url: str) -> np.ndarray:
    """The inverse of :func:`encode_png` (for tests and the benchmark): uint8 ``[H, W, 3]``."""
    _, raw = decode_data_url(url, "image", max_bytes=1 << 30)
    return np.asarray(_open_image(raw, "image", formats=("PNG",)).convert("RGB"))


def decode_photo(raw: bytes, resolution: int, what: str = "upload") -> np.ndarray:
    """Photo bytes -> float32 ``[R, R, 3]`` in [-1, 1]: centre crop to a square, bilinear resize to ``R``."""
    from PIL import Image

    image = _open_image(raw, what).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BILINEAR)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def parse_strength(value, what: str) -> int:
    """Brush strength -> number of units: ``low``/``med``/``high`` (4/10/15) or a positive integer."""
    if isinstance(value, str) and value in STRENGTHS:
        return STRENGTHS[value]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(422, f"{what} must be one of {', '.join(STRENGTHS)} or a positive unit count, got {value!r}")
    return value
