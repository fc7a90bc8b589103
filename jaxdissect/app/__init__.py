"""A GANPaint-style web app: paint and erase dissected concepts in a generator's images.

* :func:`build_painter` loads a generator and its dissection (or the embedded toy default).
* :class:`Painter` holds them and answers requests (stateless per request; uploads in a worker).
* :func:`create_app` is the Starlette ASGI app; ``python -m launch.ganpaint`` serves it with uvicorn.
"""

from jaxdissect.app.build import AppError, build_painter, default_cache_dir
from jaxdissect.app.codec import ApiError
from jaxdissect.app.painter import Painter
from jaxdissect.app.server import create_app

__all__ = ["AppError", "ApiError", "Painter", "build_painter", "create_app", "default_cache_dir"]
