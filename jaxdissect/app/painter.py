"""The painting app's model side: images, brushes, stroke stacks and uploaded photos.

A :class:`Painter` holds one generator, the brushes of one dissected layer and
the ids of the generated images; it is stateless per request (every request
carries its whole stroke stack), so browser tabs cannot see each other's
edits. Uploaded photos get unguessable ids and are inverted and adapted in one
background worker thread, with progress a client polls. All model calls go
through one lock, as the original's server did, so concurrent requests queue
instead of oversubscribing the CPU or accelerator.
"""

from __future__ import annotations

import collections
import queue
import secrets
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np

from jaxdissect.app.codec import ApiError, decode_mask, decode_photo, parse_strength
from jaxdissect.preprocess import zc_to_uint8

MAX_STROKES = 64


class Upload:
    """One uploaded photo and its inversion: ``status`` queued -> running -> done | error."""

    def __init__(self, uid: str, image: np.ndarray):
        self.id = uid
        self.image = image  # float32 [R, R, 3] in [-1, 1]
        self.status = "queued"
        self.progress = 0.0
        self.message = ""
        self.latent = None
        self.adaptation = None
        self.reconstruction = None  # uint8 [R, R, 3]
        self.created = time.time()

    def report(self) -> dict:
        return {"id": self.id, "status": self.status, "progress": round(float(self.progress), 4),
                "message": self.message}


class Painter:
    """Generator + brushes of one layer + the served image ids; see the module docstring.

    ``z``: latents ``[N, D]`` of the generated images, id ``k`` = row ``k``
    (for ProGAN the original's ``RandomState(1)`` rows). ``mask_size``: the
    stroke grid ``(H, W)`` a client draws on (the original: 32x32 for an 8x8
    layer), pooled to the layer by the editing code. ``invert``: a function
    ``(image [1, R, R, 3], progress(fraction)) -> (x, adaptation)`` for uploaded photos
    (``x``: latents ``[1, D]`` or the layer's representation ``[1, h, w, U]``; ``adaptation``:
    ``jaxdissect.editing.adapt``'s result or None), or None when photos are not supported. ``default_strength``: the
    strength a stroke without one gets and the page preselects (GANPaint: high = 15 units; a
    layer with few units, like the toy's 16, wants low).
    """

    def __init__(self, module, variables, layer: str, brushes, z: np.ndarray, *, mask_size: tuple[int, int],
                 invert=None, pool: str = "max", default_strength: str = "high", max_uploads: int = 32,
                 max_pending: int = 4):
        self.module, self.variables, self.layer, self.brushes = module, variables, layer, brushes
        self.z = np.asarray(z, np.float32)
        self.mask_size = tuple(int(s) for s in mask_size)
        self.invert_fn, self.pool = invert, pool
        self.default_strength = default_strength
        self.max_uploads, self.max_pending = max_uploads, max_pending
        self.lock = threading.Lock()
        self._generate = jax.jit(lambda v, x: module.apply(v, x))
        self.resolution = int(self._generate(variables, self.z[:1]).shape[1])
        self.uploads: collections.OrderedDict[str, Upload] = collections.OrderedDict()
        self._uploads_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None

    # ----- read-only descriptions -------------------------------------------------------------
    def concepts(self) -> list[str]:
        return list(self.brushes.concepts)

    def image_ids(self) -> list[int]:
        return list(range(len(self.z)))

    # ----- validation -------------------------------------------------------------------------
    def parse_strokes(self, strokes) -> list:
        """The JSON stroke stack -> ``jaxdissect.editing.Stroke`` list (every field checked)."""
        from jaxdissect.editing import Stroke
        from jaxdissect.interventions.common import InterventionError, lookup

        if strokes is None:
            return []
        if not isinstance(strokes, list):
            raise ApiError(400, f"strokes must be a list of stroke objects, got {type(strokes).__name__}")
        if len(strokes) > MAX_STROKES:
            raise ApiError(413, f"{len(strokes)} strokes; at most {MAX_STROKES} per request (reset to start over)")
        names = self.concepts()
        out = []
        for i, s in enumerate(strokes):
            what = f"strokes[{i}]"
            if not isinstance(s, dict):
                raise ApiError(400, f"{what} must be an object {{concept, mask, erase, strength}}")
            unknown = set(s) - {"concept", "mask", "erase", "strength"}
            if unknown:
                raise ApiError(400, f"{what}: unknown fields {sorted(unknown)}; use concept, mask, erase, strength")
            concept = s.get("concept")
            if not isinstance(concept, str):
                raise ApiError(400, f"{what}.concept must be a concept name (GET /api/concepts lists them)")
            try:
                lookup(names, concept, "concept")
            except InterventionError as e:
                raise ApiError(422, f"{what}: {e}") from None
            erase = s.get("erase", False)
            if not isinstance(erase, bool):
                raise ApiError(400, f"{what}.erase must be true or false, got {erase!r}")
            strength = parse_strength(s.get("strength", self.default_strength), f"{what}.strength")
            if strength > self.num_units:
                raise ApiError(422, f"{what}.strength {strength} exceeds the layer's {self.num_units} units")
            if "mask" not in s:
                raise ApiError(400, f"{what}.mask is missing; send a {self.mask_size[1]}x{self.mask_size[0]} "
                                    "PNG data URL")
            mask = decode_mask(s["mask"], self.mask_size, f"{what}.mask")
            out.append(Stroke(concept, mask, erase=erase, strength=strength))
        return out

    @property
    def num_units(self) -> int:
        return int(self.brushes.num_units)

    def source(self, body: dict):
        """``(x [1, D], adaptation)`` for ``{"image": id}`` or ``{"upload": id}`` (exactly one)."""
        has_image, has_upload = "image" in body, "upload" in body
        if has_image == has_upload:
            raise ApiError(400, "give exactly one of image (a generated image id from GET /api/images) "
                                "or upload (an id from POST /api/upload)")
        if has_image:
            k = body["image"]
            if isinstance(k, bool) or not isinstance(k, int):
                raise ApiError(400, f"image must be an integer id from GET /api/images, got {k!r}")
            if not 0 <= k < len(self.z):
                raise ApiError(404, f"unknown image id {k}; ids are 0..{len(self.z) - 1}")
            return self.z[k:k + 1], None
        job = self.upload(body["upload"])
        if job.status != "done":
            raise ApiError(409, f"upload {job.id} is {job.status} ({job.progress:.0%}); poll "
                                f"GET /api/upload/{job.id} until its status is done")
        return job.latent, job.adaptation

    # ----- generation -------------------------------------------------------------------------
    def padded(self, strokes: Sequence) -> list:
        """``strokes`` led by empty strokes up to the next of 1, 2, 4, ... strokes.

        ``apply_strokes`` compiles once per stroke count; padding bounds the compiles to
        log2(MAX_STROKES) + 1 instead of one per new stroke while a user paints (seconds each
        for a ProGAN). Leading empty strokes keep the composition's accumulators exactly zero,
        so the image is the same as without them.
        """
        from jaxdissect.editing import Stroke

        strokes = list(strokes)
        if not strokes:
            return strokes
        size = 1 << (len(strokes) - 1).bit_length()
        empty = Stroke(self.concepts()[0], np.zeros(self.mask_size, np.float32), strength=1)
        return [empty] * (size - len(strokes)) + strokes

    def generate(self, x, strokes: Sequence, adaptation=None) -> np.ndarray:
        """uint8 ``[R, R, 3]``: the plain generator output for latents, else ``apply_strokes``.

        ``x``: latents ``[1, D]`` or an inverted photo's layer representation ``[1, h, w, U]``.
        """
        with self.lock:
            if not strokes and adaptation is None and np.ndim(x) == 2:
                out = self._generate(self.variables, x)
            else:
                from jaxdissect.editing import EditError, apply_strokes

                try:
                    out = apply_strokes(self.module, self.variables, x, self.padded(strokes), self.brushes,
                                        layer=self.layer, pool=self.pool, adaptation=adaptation)
                except EditError as e:
                    raise ApiError(422, str(e).splitlines()[0]) from None
            return zc_to_uint8(jax.device_get(out))[0]

    # ----- uploads ----------------------------------------------------------------------------
    def upload(self, uid) -> Upload:
        if not isinstance(uid, str):
            raise ApiError(400, f"upload must be an id string from POST /api/upload, got {uid!r}")
        with self._uploads_lock:
            job = self.uploads.get(uid)
        if job is None:
            raise ApiError(404, f"unknown upload id {uid[:40]!r}; ids expire after {self.max_uploads} newer uploads")
        return job

    def submit(self, raw: bytes) -> Upload:
        """Queue a photo (its bytes) for inversion; returns its :class:`Upload`."""
        if self.invert_fn is None:
            raise ApiError(501, "this server cannot invert photos: its generator has no inversion "
                                "(jaxdissect.editing.invert/adapt); pick a generated image instead")
        image = decode_photo(raw, self.resolution)
        with self._uploads_lock:
            pending = sum(j.status in ("queued", "running") for j in self.uploads.values())
            if pending >= self.max_pending:
                raise ApiError(429, f"{pending} photos are being inverted; wait for one to finish and retry")
            job = Upload(secrets.token_urlsafe(16), image)
            self.uploads[job.id] = job
            while len(self.uploads) > self.max_uploads:
                oldest = next((k for k, j in self.uploads.items() if j.status in ("done", "error")), None)
                if oldest is None:
                    break
                del self.uploads[oldest]
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="ganpaint-invert", daemon=True)
                self._worker.start()
        self._queue.put(job)
        return job

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            job.status = "running"

            def progress(fraction, job=job):
                job.progress = min(max(float(fraction), 0.0), 1.0)

            try:
                latent, adaptation = self.invert_fn(job.image[None], progress)
                job.latent, job.adaptation = latent, adaptation
                job.reconstruction = self.generate(latent, [], adaptation)
                job.progress, job.status = 1.0, "done"
            except Exception as e:  # the worker reports every failure to the client, then continues
                first = (str(e).splitlines() or [""])[0][:300]
                job.status, job.message = "error", f"inversion failed: {type(e).__name__}: {first}"
