"""The painting app's JSON API through Starlette's TestClient: every endpoint, valid and invalid requests.

References are independent of the app: the plain generator (``module.apply``)
rendered with the closed-form uint8 formula, and ``jaxdissect.editing`` called
directly with the same masks.
"""

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from jaxdissect.app import build_painter, create_app


def to_uint8(images):
    return np.clip((np.asarray(images, np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def png_url(array, mode=None) -> str:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mask_url(mask: np.ndarray) -> str:
    """A stroke mask as the page sends it: RGBA PNG, painted cells opaque."""
    rgba = np.zeros(mask.shape + (4,), np.uint8)
    rgba[mask > 0] = (11, 198, 212, 255)
    return png_url(rgba)


def decode(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def block_mask(size, y0, y1, x0, x1):
    m = np.zeros(size, np.float32)
    m[y0:y1, x0:x1] = 1
    return m


class FakeInvert:
    """Stands in for inversion: reports progress in steps, returns a fixed latent (row 5 of the image z's)."""

    def __init__(self, z, delay=0.02):
        self.z, self.delay, self.calls = z, delay, 0

    def __call__(self, image, progress):
        assert image.shape[0] == 1 and image.shape[-1] == 3
        self.calls += 1
        for i in range(5):
            time.sleep(self.delay)
            progress((i + 1) / 5)
        return self.z[5:6], None


def shared_cache(tmp_path_factory) -> str:
    """One cache (the toy dissection) for all app tests of the session."""
    path = tmp_path_factory.getbasetemp() / "ganpaint-cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="module")
def painter(tmp_path_factory):
    p = build_painter(cache_dir=shared_cache(tmp_path_factory), num_images=6)
    p.invert_fn = FakeInvert(p.z)
    return p


@pytest.fixture(scope="module")
def client(painter):
    with TestClient(create_app(painter, max_upload_bytes=200_000), raise_server_exceptions=False) as c:
        yield c


def check_error(response, status, *words):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert "Traceback" not in body["error"] and "\n" not in body["error"]
    for w in words:
        assert w.lower() in body["error"].lower(), body["error"]


def test_page_and_static_files_only(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "/static/app.js" in r.text
    assert "textContent" in client.get("/static/app.js").text
    assert client.get("/static/app.css").status_code == 200
    for path in ("/static/painter.py", "/static/..%2Fserver.py", "/static/../server.py", "/static/index.html",
                 "/etc/passwd", "/static/%2e%2e/%2e%2e/setup.cfg"):
        check_error(client.get(path), 404)
    check_error(client.post("/"), 405)


def test_concepts_and_images(client, painter):
    info = client.get("/api/concepts").json()
    assert {"red", "green", "blue"} <= set(info["concepts"])
    assert info["strengths"] == {"low": 4, "med": 10, "high": 15} and info["default_strength"] == "low"
    assert info["layer"] == "layer4" and info["mask_size"] == [32, 32] and info["image_size"] == [32, 32]
    assert client.get("/api/images").json() == {"images": list(range(6))}


def test_plain_image_equals_generator_output(client, painter):
    from jaxdissect.models import toy_generator as toy

    module, variables = toy.toy_generator()
    z = toy.sample_z(6, seed=1)
    expected = to_uint8(module.apply(variables, z))
    for k in (0, 4):
        r = client.post("/api/generate", json={"image": k, "strokes": [], "request": 7})
        assert r.status_code == 200 and r.json()["request"] == 7
        np.testing.assert_array_equal(decode(r.json()["image"]), expected[k])


def test_edit_equals_editing_called_directly(client, painter):
    from jaxdissect import editing
    from jaxdissect.models import toy_generator as toy

    module, variables = toy.toy_generator()
    z = toy.sample_z(6, seed=1)
    paint_mask = block_mask((32, 32), 4, 12, 16, 28)
    erase_mask = block_mask((32, 32), 20, 30, 2, 10)
    strokes = [{"concept": "red", "mask": mask_url(paint_mask), "strength": "high"},
               {"concept": "green", "mask": erase_mask.tolist(), "erase": True, "strength": 4}]
    r = client.post("/api/generate", json={"image": 2, "strokes": strokes})
    assert r.status_code == 200, r.text
    got = decode(r.json()["image"])
    direct = editing.apply_strokes(
        module, variables, z[2:3],
        [editing.Stroke("red", paint_mask, strength=15), editing.Stroke("green", erase_mask, erase=True, strength=4)],
        painter.brushes, layer="layer4")
    np.testing.assert_array_equal(got, to_uint8(direct)[0])
    one = client.post("/api/generate", json={"image": 2, "strokes": strokes[:1]}).json()["image"]
    np.testing.assert_array_equal(decode(one), to_uint8(editing.paint(
        module, variables, z[2:3], "red", paint_mask, painter.brushes, layer="layer4", strength=15))[0])
    plain = decode(client.post("/api/generate", json={"image": 2}).json()["image"])
    changed = np.abs(decode(one).astype(int) - plain).max(-1) > 0
    assert changed[4:12, 16:28].mean() > 0.5 and not changed[20:, :10].any()


def test_padded_stacks_equal_the_direct_call(client, painter):
    """Stacks of 3 and 5 strokes (padded to 4 and 8 by the server) give the unpadded direct call's pixels."""
    from jaxdissect import editing

    rng = np.random.RandomState(3)
    masks = [rng.uniform(0, 1, (32, 32)).astype(np.float32) * (rng.uniform(0, 1, (32, 32)) < 0.3) for _ in range(5)]
    concepts = ["red", "green", "blue", "green", "red"]
    for n in (3, 5):
        body = {"image": 3, "strokes": [{"concept": c, "mask": m.tolist(), "erase": i == 1, "strength": 4}
                                        for i, (c, m) in enumerate(zip(concepts[:n], masks))]}
        got = decode(client.post("/api/generate", json=body).json()["image"])
        direct = editing.apply_strokes(painter.module, painter.variables, painter.z[3:4],
                                       [editing.Stroke(c, m, erase=i == 1, strength=4)
                                        for i, (c, m) in enumerate(zip(concepts[:n], masks))],
                                       painter.brushes, layer="layer4")
        np.testing.assert_array_equal(got, to_uint8(direct)[0])
    assert [len(painter.padded([None] * k)) for k in (0, 1, 2, 3, 5, 9, 64)] == [0, 1, 2, 4, 8, 16, 64]


@pytest.mark.parametrize("body,status,words", [
    ({"image": 99}, 404, ["unknown image id 99"]),
    ({"image": -1}, 404, ["unknown image id"]),
    ({"image": "3"}, 400, ["integer id"]),
    ({"image": True}, 400, ["integer id"]),
    ({}, 400, ["exactly one of image"]),
    ({"image": 1, "upload": "x"}, 400, ["exactly one"]),
    ({"upload": "nope"}, 404, ["unknown upload id"]),
    ({"image": 1, "strokes": {}}, 400, ["list"]),
    ({"image": 1, "extra": 1}, 400, ["unknown fields"]),
    ({"image": 1, "strokes": ["red"]}, 400, ["strokes[0]"]),
    ({"image": 1, "strokes": [{"concept": "rde", "mask": [[0] * 32] * 32}]}, 422, ["unknown concept 'rde'", "red"]),
    ({"image": 1, "strokes": [{"concept": 3, "mask": [[0] * 32] * 32}]}, 400, ["concept"]),
    ({"image": 1, "strokes": [{"concept": "red"}]}, 400, ["mask is missing"]),
    ({"image": 1, "strokes": [{"concept": "red", "mask": [[0] * 16] * 16}]}, 422, ["16, 16", "32x32"]),
    ({"image": 1, "strokes": [{"concept": "red", "mask": [[2] * 32] * 32}]}, 422, ["[0, 1]"]),
    ({"image": 1, "strokes": [{"concept": "red", "mask": "data:image/png;base64,@@@"}]}, 400, ["malformed"]),
    ({"image": 1, "strokes": [{"concept": "red", "mask": "hello"}]}, 400, ["not a data URL"]),
    ({"image": 1, "strokes": [{"concept": "red", "mask": "data:image/png,abc"}]}, 400, ["base64"]),
    ({"image": 1, "strokes": [{"concept": "red", "mask": "data:image/png;base64,aGVsbG8="}]}, 415, ["not a readable"]),
    ({"image": 1, "strokes": [{"concept": "red", "mask": [[0] * 32] * 32, "strength": "huge"}]}, 422, ["strength"]),
    ({"image": 1, "strokes": [{"concept": "red", "mask": [[0] * 32] * 32, "strength": 999}]}, 422, ["exceeds"]),
    ({"image": 1, "strokes": [{"concept": "red", "mask": [[0] * 32] * 32, "erase": "yes"}]}, 400, ["erase"]),
    ({"image": 1, "strokes": [{"concept": "red", "mask": [[0] * 32] * 32, "colour": 1}]}, 400, ["unknown fields"]),
    ({"image": 1, "strokes": [{"concept": "red", "mask": [[0] * 32] * 32}] * 65}, 413, ["at most 64"]),
])
def test_generate_rejects_bad_requests(client, body, status, words):
    check_error(client.post("/api/generate", json=body), status, *words)


def test_generate_rejects_bad_bodies_and_masks(client):
    check_error(client.post("/api/generate", content=b"{not json", headers={"content-type": "application/json"}),
                400, "not valid JSON")
    check_error(client.post("/api/generate", content=b"[1]", headers={"content-type": "application/json"}),
                400, "object")
    check_error(client.post("/api/generate", content=b"image=1"), 415, "application/json")
    big = b'{"image": 1, "pad": "' + b"x" * (5 << 20) + b'"}'
    check_error(client.post("/api/generate", content=big, headers={"content-type": "application/json"}), 413, "limit")
    wrong = mask_url(np.zeros((8, 8), np.float32))
    check_error(client.post("/api/generate", json={"image": 0, "strokes": [{"concept": "red", "mask": wrong}]}),
                422, "8x8", "32x32")
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32)).save(jpeg, format="JPEG")
    jpeg_url = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()
    check_error(client.post("/api/generate", json={"image": 0, "strokes": [{"concept": "red", "mask": jpeg_url}]}),
                415, "PNG")


def photo_bytes(size=(48, 40), fmt="PNG"):
    rng = np.random.RandomState(0)
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def wait_done(client, uid, timeout=30):
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.get(f"/api/upload/{uid}")
        assert r.status_code == 200, r.text
        seen.append(r.json()["progress"])
        if r.json()["status"] in ("done", "error"):
            return r.json(), seen
        time.sleep(0.01)
    raise AssertionError("upload did not finish")


def test_upload_progress_and_edit(client, painter):
    r = client.post("/api/upload", content=photo_bytes(fmt="JPEG"), headers={"content-type": "image/jpeg"})
    assert r.status_code == 202, r.text
    uid = r.json()["id"]
    assert r.json()["status"] in ("queued", "running") and len(uid) >= 16
    check_error(client.post("/api/generate", json={"upload": uid}), 409, "poll")
    job, seen = wait_done(client, uid)
    assert job["status"] == "done" and job["progress"] == 1.0 and seen == sorted(seen)
    # The fake inversion returns image 5's latent, so the reconstruction and edits equal image 5's.
    sample = client.post("/api/generate", json={"image": 5}).json()["image"]
    np.testing.assert_array_equal(decode(job["image"]), decode(sample))
    stroke = [{"concept": "blue", "mask": mask_url(block_mask((32, 32), 0, 16, 0, 16))}]
    a = client.post("/api/generate", json={"upload": uid, "strokes": stroke}).json()["image"]
    b = client.post("/api/generate", json={"image": 5, "strokes": stroke}).json()["image"]
    np.testing.assert_array_equal(decode(a), decode(b))
    # As a data URL in JSON too.
    url = "data:image/png;base64," + base64.b64encode(photo_bytes()).decode()
    r = client.post("/api/upload", json={"image": url})
    assert r.status_code == 202 and r.json()["id"] != uid
    assert wait_done(client, r.json()["id"])[0]["status"] == "done"


def test_upload_rejects_bad_photos(client):
    check_error(client.post("/api/upload", content=b"not an image at all", headers={"content-type": "image/png"}),
                415, "not a readable image")
    check_error(client.post("/api/upload", json={"image": "data:text/plain;base64,aGVsbG8="}), 415, "not a readable")
    check_error(client.post("/api/upload", json={"image": "data:image/png;base64,***"}), 400, "malformed")
    check_error(client.post("/api/upload", json={"image": 5}), 400, "data URL")
    check_error(client.post("/api/upload", json={"photo": "x"}), 400, "image")
    check_error(client.post("/api/upload", content=b"", headers={"content-type": "image/png"}), 400, "empty")
    check_error(client.post("/api/upload", content=b"abc", headers={"content-type": "text/plain"}), 415, "raw image")
    huge = photo_bytes(size=(400, 400))
    assert len(huge) > 200_000
    check_error(client.post("/api/upload", content=huge, headers={"content-type": "image/png"}), 413, "limit")
    huge_url = "data:image/png;base64," + base64.b64encode(huge).decode()
    check_error(client.post("/api/upload", json={"image": huge_url}), 413, "limit")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    check_error(client.post("/api/upload", content=buf.getvalue(), headers={"content-type": "image/tiff"}), 415, "TIFF")
    check_error(client.get("/api/upload/doesnotexist"), 404, "unknown upload id")
    check_error(client.get("/api/nothing"), 404, "not found")
    check_error(client.get("/api/generate"), 405, "not allowed")


def test_upload_without_inversion_is_501(painter):
    saved, painter.invert_fn = painter.invert_fn, None
    try:
        with TestClient(create_app(painter)) as c:
            assert c.get("/api/concepts").json()["uploads"] is False
            check_error(c.post("/api/upload", content=photo_bytes(), headers={"content-type": "image/png"}),
                        501, "cannot invert")
    finally:
        painter.invert_fn = saved


def test_two_sessions_do_not_mix(painter):
    """Two clients painting different images at the same time each get exactly their own result."""
    from jaxdissect import editing
    from jaxdissect.models import toy_generator as toy

    module, variables = toy.toy_generator()
    z = toy.sample_z(6, seed=1)
    jobs = {"a": (1, "red", block_mask((32, 32), 0, 12, 0, 12)), "b": (3, "blue", block_mask((32, 32), 16, 32, 8, 30))}
    expected = {k: to_uint8(editing.apply_strokes(module, variables, z[i:i + 1], [editing.Stroke(c, m, strength=4)],
                                                  painter.brushes, layer="layer4"))[0]
                for k, (i, c, m) in jobs.items()}
    results, errors = {k: [] for k in jobs}, []

    def session(key):
        i, concept, mask = jobs[key]
        try:
            with TestClient(create_app(painter)) as c:
                for _ in range(4):
                    stroke = {"concept": concept, "mask": mask_url(mask)}
                    r = c.post("/api/generate", json={"image": i, "strokes": [stroke]})
                    results[key].append(decode(r.json()["image"]))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=session, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in jobs:
        assert len(results[k]) == 4
        for got in results[k]:
            np.testing.assert_array_equal(got, expected[k])
    assert not np.array_equal(expected["a"], expected["b"])


def test_real_photo_inversion_and_edit(client, painter):
    """The app's inversion (editing.invert) of a photo no sample matches: progress, a better fit, edits."""
    from jaxdissect import editing
    from jaxdissect.app.build import PhotoInversion
    from jaxdissect.models import toy_generator as toy

    module, variables = toy.toy_generator()
    photo = to_uint8(module.apply(variables, toy.sample_z(6, seed=1)[2:3]))[0, :, ::-1]  # mirrored sample
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(photo)).save(buf, format="PNG")
    saved = painter.invert_fn
    painter.invert_fn = PhotoInversion(module, variables, "layer4", painter.z, adapt_layers=toy.ADAPT_LAYERS,
                                       invert_steps=40, adapt_steps=0)
    try:
        r = client.post("/api/upload", content=buf.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 202, r.text
        job, seen = wait_done(client, r.json()["id"], timeout=300)
    finally:
        painter.invert_fn = saved
    assert job["status"] == "done", job["message"]
    assert seen == sorted(seen) and seen[-1] == 1.0
    target = photo.astype(float)
    errors = [np.abs(to_uint8(module.apply(variables, painter.z[i:i + 1]))[0] - target).mean()
              for i in range(len(painter.z))]
    assert np.abs(decode(job["image"]) - target).mean() < 0.8 * min(errors)  # better than the best start
    upload = painter.uploads[job["id"]]
    assert upload.latent.shape == (1, 8, 8, 16) and upload.adaptation is None
    mask = block_mask((32, 32), 8, 24, 8, 24)
    stroke = {"concept": "green", "mask": mask_url(mask)}
    r = client.post("/api/generate", json={"upload": job["id"], "strokes": [stroke]})
    direct = editing.apply_strokes(module, variables, upload.latent, [editing.Stroke("green", mask, strength=4)],
                                   painter.brushes, layer="layer4")
    np.testing.assert_array_equal(decode(r.json()["image"]), to_uint8(direct)[0])


def test_adapt_called_with_its_signature(monkeypatch, painter):
    """PhotoInversion's call of editing.adapt binds to adapt's real signature, and its result is what edits use."""
    import inspect

    from jaxdissect import editing
    from jaxdissect.app.build import PhotoInversion
    from jaxdissect.models import toy_generator as toy

    calls = []
    real = inspect.signature(editing.adapt)

    def fake_adapt(*args, **kwargs):
        calls.append(real.bind(*args, **kwargs).arguments)
        return "adapted"

    monkeypatch.setattr(editing, "adapt", fake_adapt)
    inv = PhotoInversion(painter.module, painter.variables, "layer4", painter.z, adapt_layers=toy.ADAPT_LAYERS,
                         invert_steps=40, adapt_steps=3)  # 40: the chunk size compiled above
    reports = []
    image = to_uint8(painter.module.apply(painter.variables, painter.z[:1])).astype(np.float32) / 127.5 - 1
    representation, adaptation = inv(image, reports.append)
    assert adaptation == "adapted" and representation.shape == (1, 8, 8, 16)
    (args,) = calls
    assert args["adapt_layers"] == toy.ADAPT_LAYERS and args["steps"] == 3 and args["layer"] == "layer4"
    assert reports[-1] == 40 / 43  # the adaptation's own reports were faked away


class FakeAdaptation:
    """Stands in for editing.adapt's result: multiplicative maps on the toy's adapted layers."""

    def __init__(self):
        rng = np.random.RandomState(0)
        self.maps = {"layer6": rng.uniform(-0.3, 0.3, (1, 16, 16, 16)).astype(np.float32),
                     "layer8": rng.uniform(-0.3, 0.3, (1, 32, 32, 16)).astype(np.float32)}


def test_adapted_upload_edits_equal_direct_call(client, painter):
    """An upload's adaptation reaches apply_strokes: API reconstruction and edit equal the direct calls."""
    from jaxdissect import editing
    from jaxdissect.layers import capture

    _, acts = capture(painter.module, painter.variables, painter.z[4:5], ["layer4"])
    adaptation = FakeAdaptation()
    saved = painter.invert_fn
    painter.invert_fn = lambda image, progress: (np.asarray(acts["layer4"]), adaptation)
    try:
        r = client.post("/api/upload", content=photo_bytes(), headers={"content-type": "image/png"})
        job, _ = wait_done(client, r.json()["id"])
    finally:
        painter.invert_fn = saved
    rec = editing.apply_strokes(painter.module, painter.variables, acts["layer4"], [], painter.brushes,
                                layer="layer4", adaptation=adaptation)
    np.testing.assert_array_equal(decode(job["image"]), to_uint8(rec)[0])
    plain = to_uint8(painter.module.apply(painter.variables, painter.z[4:5]))[0]
    assert not np.array_equal(decode(job["image"]), plain)
    mask = block_mask((32, 32), 0, 16, 16, 32)
    r = client.post("/api/generate", json={"upload": job["id"], "strokes": [
        {"concept": "red", "mask": mask_url(mask), "erase": True}]})
    direct = editing.apply_strokes(painter.module, painter.variables, acts["layer4"],
                                   [editing.Stroke("red", mask, erase=True, strength=4)], painter.brushes,
                                   layer="layer4", adaptation=adaptation)
    np.testing.assert_array_equal(decode(r.json()["image"]), to_uint8(direct)[0])


def test_failed_inversion_is_reported_and_the_worker_goes_on(client, painter):
    def broken(image, progress):
        progress(0.5)
        raise RuntimeError("diverged\nsecond line")

    saved = painter.invert_fn
    painter.invert_fn = broken
    try:
        r = client.post("/api/upload", content=photo_bytes(), headers={"content-type": "image/png"})
        job, _ = wait_done(client, r.json()["id"])
    finally:
        painter.invert_fn = saved
    assert job["status"] == "error" and job["message"] == "inversion failed: RuntimeError: diverged"
    check_error(client.post("/api/generate", json={"upload": job["id"]}), 409, "error")
    r = client.post("/api/upload", content=photo_bytes(), headers={"content-type": "image/png"})
    assert wait_done(client, r.json()["id"])[0]["status"] == "done"


def test_allowed_hosts_refuse_other_host_headers(painter):
    with TestClient(create_app(painter, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1") as c:
        assert c.get("/api/images").status_code == 200
        assert c.get("/api/images", headers={"host": "evil.example:8080"}).status_code == 400


def _blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels (a few kB however large)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\0" * ((width + 7) // 8 + 1) * height, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_a_huge_valid_image_is_too_large_not_unreadable(client):
    """Item 6 of issue 23: a valid 20000x20000 PNG is refused as too large (413), before it is decoded."""
    raw = _blank_png(20000, 20000)
    assert len(raw) < 200_000   # within the upload limit: refused for its pixels, not its bytes
    small = Image.open(io.BytesIO(_blank_png(64, 48)))
    small.load()
    assert small.size == (64, 48)   # the writer makes valid PNG files
    check_error(client.post("/api/upload", content=raw, headers={"content-type": "image/png"}), 413, "too large")
    check_error(client.post("/api/upload", content=_blank_png(7000, 7000), headers={"content-type": "image/png"}),
                413, "7000x7000 pixels")


def test_an_enormous_mask_value_is_refused_without_a_warning(client):
    """Item 6 of issue 23: 1e308 in a list mask is refused (422) with no NumPy overflow warning logged."""
    import warnings

    from jaxdissect.app.codec import ApiError, decode_mask

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ApiError, match=r"\[0, 1\]"):
            decode_mask([[1e308] * 32] * 32, (32, 32))
        check_error(client.post("/api/generate", json={"image": 0, "strokes": [{"concept": "red",
                                                                                "mask": [[1e308] * 32] * 32}]}),
                    422, "[0, 1]")
