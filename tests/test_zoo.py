"""Published models and data by name, against a real HTTP server on 127.0.0.1 that each test starts and stops.

The served files are made here: PyTorch state dicts with the published key names
(random values; a narrow ProGAN for speed, the converter infers the widths)
under the published file names, a small Places-layout zip, a small
Broden-layout zip. ``JAXDISSECT_REGISTRY`` points the built-in names at the
server (and gives the files' sha256, since random weights cannot match the
published hash prefixes); ``JAXDISSECT_CACHE`` is a fresh folder per test.
"""

import glob
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_reference import TorchProGAN  # noqa: E402
from zoo_server import FileServer  # noqa: E402

import jaxdissect  # noqa: E402
import jaxdissect.convert  # noqa: E402
from jaxdissect import zoo  # noqa: E402
from jaxdissect.zoo import download  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAN_PATH = "models/proggan_churchoutdoor-7e701dd5.pth"
NARROW = (32, 32, 32, 32, 16, 16, 8, 8)
WIDER = (96, 96, 96, 96, 64, 64, 32, 32)  # ~3 MB: long enough to interrupt when throttled


def state_bytes(state, legacy=False) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def gan_bytes(sizes=NARROW, seed=1, legacy=False) -> bytes:
    return state_bytes(TorchProGAN(sizes=sizes, seed=seed).state_dict(), legacy)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fresh per-user cache and registry file; ``env.registry(entries)`` writes the overrides."""
    monkeypatch.setenv("JAXDISSECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXDISSECT_PROGRESS", "0")
    for name in ("JAXDISSECT_OFFLINE", "JAXDISSECT_MIRROR"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "registry.json"

    class Env:
        cache = tmp_path / "cache"

        @staticmethod
        def registry(entries):
            path.write_text(json.dumps(entries))
            monkeypatch.setenv("JAXDISSECT_REGISTRY", str(path))

        @staticmethod
        def vars():
            return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))

    return Env


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.stop()


def serve_gan(server, env, data=None, **fields):
    data = gan_bytes() if data is None else data
    server.files[GAN_PATH] = data
    env.registry({"proggan_church": {"url": server.url(GAN_PATH), "sha256": sha(data), **fields}})
    return data


def cached_files(env) -> list[str]:
    return sorted(os.path.relpath(p, env.cache) for p in glob.glob(str(env.cache / "zoo" / "**" / "*"), recursive=True)
                  if os.path.isfile(p) and not p.endswith((".lock", ".owner")))


# --------------------------------------------------------------------------- the registry itself


def test_registry_checksums_match_the_published_file_names():
    raw = zoo.registry.builtin()
    checked = 0
    for name, entry in zoo.entries().items():
        assert name in raw
        for f in entry.files:
            assert f.urls and all(u.startswith(("http://", "https://")) for u in f.urls)
            assert len({os.path.basename(u) for u in f.urls}) == 1, f"{name}: alternative URLs name other files"
            m = re.fullmatch(r".*-([0-9a-f]{8,})\.pth", f.filename)
            if m:
                assert f.sha256_prefix == m.group(1), f"{name}: sha256_prefix {f.sha256_prefix} vs {f.filename}"
                checked += 1
            else:
                assert f.sha256_prefix is None
        if entry.kind != "dataset":
            assert jaxdissect.convert.get(entry.converter).convert
    assert checked == 15  # 3 Places365 classifiers, 8 ProGANs, 2 encoders, torchvision VGG16 and ViT-B/16
    published_md5 = {"places_val": "593bbc21590cf7c396faac2e600cd30c",
                     "places_train": "d1db6ad3fc1d69b94da325ac08886a01",
                     "minilsun": "4bf19f711555a5771220384db4c97999"}  # the issue's and the originals' md5s
    for name, md5 in published_md5.items():
        assert zoo.get(name).files[0].md5 == md5
    assert {n for n, e in zoo.entries().items() if e.kind == "dataset"} >= {"broden1_224", "broden1_227"}


def test_unknown_name_lists_the_known_ones(env):
    with pytest.raises(zoo.UnknownName) as e:
        zoo.model_dir("vgg16_place365")
    msg = str(e.value)
    assert "did you mean vgg16_places365" in msg and "proggan_church" in msg and "upp" in msg
    with pytest.raises(zoo.UnknownName, match="no such directory"):
        zoo.model_dir("models/nothing_here")
    from jaxdissect.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        jaxdissect.load_model("./nothing_here")
    with pytest.raises(zoo.UnknownName, match="did you mean proggan_church"):
        jaxdissect.load_model("proggan_chruch")
    from launch import common

    with pytest.raises(common.LaunchError, match="--model=vgg16_place365: neither .*vgg16_places365"):
        common.model_dir("vgg16_place365")
    with pytest.raises(common.LaunchError, match="--segmenter=nettpqc|give a setting"):
        common.segmenter_spec("pqc")
    assert cached_files(env) == []


# --------------------------------------------------------------------------- fetch, convert, reuse


def test_fetch_converts_once_equal_to_manual_converter_then_offline_from_cache(env, server, tmp_path):
    from jaxdissect.convert import proggan

    data = serve_gan(server, env)
    path = zoo.fetch("proggan_church")
    assert server.gets(GAN_PATH) == [(None, 200)]
    (tmp_path / "manual.pth").write_bytes(data)
    proggan.convert(str(tmp_path / "manual.pth"), str(tmp_path / "manual"))
    m1, v1 = jaxdissect.load_model(path)
    m2, v2 = jaxdissect.load_model(str(tmp_path / "manual"))
    assert m1 == m2
    flat1, flat2 = (dict(jax.tree_util.tree_leaves_with_path(v)) for v in (v1, v2))
    assert flat1.keys() == flat2.keys() and all(np.array_equal(flat1[k], flat2[k]) for k in flat1)
    pin = env.cache / "zoo" / "downloads" / "127.0.0.1_{}".format(server.httpd.server_address[1]) / (GAN_PATH + ".sha256")
    assert pin.read_text().split()[0] == sha(data)
    server.stop()  # no network from here on
    assert zoo.fetch("proggan_church") == path
    module, _ = jaxdissect.load_model("proggan_church")
    assert module.sizes == NARROW
    assert jaxdissect.load_metadata("proggan_church")["source_sha256"] == sha(data)


def test_legacy_format_file_reads_the_same(env, server, tmp_path):
    """Published research weights are mostly in torch.save's pre-1.6 format: read without PyTorch too."""
    from jaxdissect.convert import common

    gan = TorchProGAN(sizes=NARROW, seed=4).state_dict()
    for legacy in (False, True):
        (tmp_path / f"{legacy}.pth").write_bytes(state_bytes(gan, legacy))
        state = common.load_state_dict(str(tmp_path / f"{legacy}.pth"))
        assert state.keys() == gan.keys()
        assert all(np.array_equal(state[k], gan[k].numpy()) for k in gan)


# --------------------------------------------------------------------------- faults


def test_checksum_mismatch_names_file_expected_actual_and_keeps_nothing(env, server):
    data = gan_bytes()
    server.files[GAN_PATH] = data
    wrong = "0" * 64
    env.registry({"proggan_church": {"url": server.url(GAN_PATH), "sha256": wrong}})
    with pytest.raises(zoo.ChecksumError) as e:
        zoo.fetch("proggan_church")
    msg = str(e.value)
    assert "proggan_churchoutdoor-7e701dd5.pth" in msg and wrong in msg and sha(data) in msg
    assert cached_files(env) == []
    # A published hash prefix (what the built-in entries carry) is checked the same way.
    env.registry({"proggan_church": {"url": server.url(GAN_PATH)}})
    with pytest.raises(zoo.ChecksumError, match="starting 7e701dd5 .*got sha256 " + sha(data)):
        zoo.fetch("proggan_church")
    assert cached_files(env) == []


def test_dropped_connection_resumes_in_the_same_run_and_the_next(env, server, monkeypatch):
    data = serve_gan(server, env, gan_bytes(WIDER))
    server.drop[GAN_PATH] = (len(data) // 3, 1)
    path = zoo.fetch("proggan_church")
    (first, s1), (second, s2) = server.gets(GAN_PATH)
    assert first is None and s1 == 200 and s2 == 206
    assert 0 < int(second.removeprefix("bytes=").rstrip("-")) <= len(data) // 3  # only what was lost is sent again
    assert os.path.isdir(path)

    # The next run: this one gives up after one connection, the partial file stays and is continued.
    monkeypatch.setattr(download, "ATTEMPTS", 1)
    other = "copy/" + GAN_PATH
    server.files[other] = data
    env.registry({"proggan_church": {"url": server.url(other), "sha256": sha(data)}})
    server.drop[other] = (len(data) // 2, 1)
    with pytest.raises(zoo.DownloadError, match="resumes"):
        zoo.fetch("proggan_church")
    partial = glob.glob(str(env.cache / "zoo" / "downloads" / "**" / "*.partial"), recursive=True)
    assert len(partial) == 1 and 0 < os.path.getsize(partial[0]) <= len(data) // 2
    kept = os.path.getsize(partial[0])
    assert zoo.fetch("proggan_church") == path  # same bytes, same converted folder
    assert server.gets(other) == [(None, 200), (f"bytes={kept}-", 206)]
    assert not glob.glob(str(env.cache / "zoo" / "downloads" / "**" / "*.partial*"), recursive=True)


def test_server_without_range_support_restarts(env, server):
    data = serve_gan(server, env, gan_bytes(WIDER))
    server.ignore_range = True
    server.drop[GAN_PATH] = (len(data) // 3, 1)
    zoo.fetch("proggan_church")
    assert [s for _, s in server.gets(GAN_PATH)] == [200, 200]


def _spawn(env, code):
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env.vars(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


FETCH = "from jaxdissect import zoo; print(zoo.fetch('proggan_church'))"


def _wait_for(pattern, proc, timeout=120):
    """Poll until ``pattern`` matches (a non-empty file, or a folder) while ``proc`` runs."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        hits = [p for p in glob.glob(pattern, recursive=True) if os.path.isdir(p) or os.path.getsize(p) > 0]
        if hits:
            return hits
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be killed: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    raise AssertionError(f"{pattern} never appeared")


def test_kill_during_download_leaves_nothing_trusted(env, server):
    data = serve_gan(server, env, gan_bytes(WIDER))
    server.delay = 0.05
    proc = _spawn(env, FETCH)
    _wait_for(str(env.cache / "zoo" / "downloads" / "**" / "*.partial"), proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = cached_files(env)
    assert not any(p.endswith((".pth", ".sha256")) for p in left), left
    assert not glob.glob(str(env.cache / "zoo" / "models" / "*"))
    server.delay = 0
    path = zoo.fetch("proggan_church")  # resumes the partial file and verifies the whole
    ranges = [r for r, _ in server.gets(GAN_PATH)]
    assert ranges[0] is None and ranges[-1] and ranges[-1].startswith("bytes=")
    assert jaxdissect.load_metadata(path)["source_sha256"] == sha(data)


def test_kill_during_conversion_leaves_nothing_trusted(env, server):
    serve_gan(server, env)
    proc = _spawn(env, FETCH)
    _wait_for(str(env.cache / "zoo" / "models" / ".proggan_church-*.building-*"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not [p for p in glob.glob(str(env.cache / "zoo" / "models" / "proggan_church-*"))
                if not p.endswith((".lock", ".owner"))]
    path = zoo.fetch("proggan_church")  # the file is cached and verified: only the conversion runs again
    assert len(server.gets(GAN_PATH)) == 1
    assert not glob.glob(str(env.cache / "zoo" / "models" / ".*building*"))
    jaxdissect.load_model(path)


@pytest.mark.slow
def test_two_processes_download_once_and_convert_once(env, server):
    serve_gan(server, env, gan_bytes(WIDER))
    server.delay = 0.02
    procs = [_spawn(env, FETCH) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]  # the same converted folder
    assert server.gets(GAN_PATH) == [(None, 200)]
    assert sum(o[1].count("converting proggan_church (proggan)") for o in outs) == 1, [o[1] for o in outs]


def test_offline_with_an_empty_cache(env, server):
    serve_gan(server, env)
    out = subprocess.run([sys.executable, "-m", "jaxdissect.zoo", "--offline", "fetch", "proggan_church"], cwd=REPO,
                         env=env.vars(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: offline") and server.url(GAN_PATH) in out.stderr
    assert "proggan_churchoutdoor-7e701dd5.pth" in out.stderr and "Traceback" not in out.stderr
    os.environ["JAXDISSECT_OFFLINE"] = "1"
    try:
        with pytest.raises(zoo.OfflineError, match="python -m jaxdissect.zoo fetch proggan_church"):
            jaxdissect.load_model("proggan_church")
    finally:
        del os.environ["JAXDISSECT_OFFLINE"]
    assert server.log == [] and cached_files(env) == []


def test_unpinned_file_is_pinned_on_first_download(env, server, capfd):
    data = gan_bytes()
    server.files["mine/gan.pth"] = data
    env.registry({"my_gan": {"kind": "generator", "url": server.url("mine/gan.pth"), "converter": "proggan"}})
    zoo.fetch("my_gan")
    assert f"pinned my_gan: gan.pth has sha256 {sha(data)}" in capfd.readouterr().err
    # The downloaded file may be removed to reclaim disk: the converted model does not need it.
    for p in glob.glob(str(env.cache / "zoo" / "downloads" / "**" / "gan.pth"), recursive=True):
        os.remove(p)
    server.files["mine/gan.pth"] = gan_bytes(seed=2)  # the server's bytes change
    path = zoo.fetch("my_gan")
    assert len(server.gets("mine/gan.pth")) == 1
    # Once the conversion must be made again, the new bytes are refused: the pin still holds.
    import shutil

    shutil.rmtree(path)
    with pytest.raises(zoo.ChecksumError, match=f"expected sha256 {sha(data)}.*pinned at its first download"):
        zoo.fetch("my_gan")


def test_mirror_filled_by_fetch_to(env, server, tmp_path, monkeypatch):
    from jaxdissect.zoo.__main__ import main

    data = serve_gan(server, env)
    mirror_dir = tmp_path / "mirror"
    assert main(["fetch", "proggan_church", f"--to={mirror_dir}"]) == 0
    assert (mirror_dir / GAN_PATH).read_bytes() == data
    assert not glob.glob(str(env.cache / "zoo" / "models" / "*"))  # --to only downloads
    server.stop()
    mirror = FileServer(root=str(mirror_dir))
    try:
        monkeypatch.setenv("JAXDISSECT_MIRROR", mirror.url())
        jaxdissect.load_model("proggan_church")
        assert mirror.gets(GAN_PATH) == [(None, 200)]
    finally:
        mirror.stop()
    assert main(["verify", "proggan_church"]) == 0
    cached = glob.glob(str(env.cache / "zoo" / "downloads" / "**" / os.path.basename(GAN_PATH)), recursive=True)[0]
    with open(cached, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    assert main(["verify", "proggan_church"]) == 1


# --------------------------------------------------------------------------- data by name


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _jpeg(seed) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_data_by_name_places_and_minilsun(env, server):
    from launch import common

    places = _zip({f"places/val/{c}/Places365_val_{i:08d}.jpg": _jpeg(i) for i, c in
                   enumerate(["airfield", "bedroom", "church-outdoor", "airfield"])})
    lsun = _zip({f"minilsun/church_{s}/{i}.jpg": _jpeg(i) for i, s in enumerate(["train", "train", "val"])})
    server.files.update({"datasets/places_val.zip": places, "datasets/minilsun.zip": lsun})
    env.registry({"places_val": {"url": server.url("datasets/places_val.zip"), "sha256": sha(places)},
                  "minilsun": {"url": server.url("datasets/minilsun.zip"), "sha256": sha(lsun)}})
    for spec in ("places", "places:val"):
        source, name = common.make_data(spec)
        assert name == "places" and len(source) == 4
    assert len(server.gets("datasets/places_val.zip")) == 1
    source, name = common.make_data("minilsun:church")
    assert name == "minilsun-church" and len(source) == 2
    assert common.data_root("minilsun:church_val").endswith("church_val")
    with pytest.raises(zoo.UnknownName, match="church_train, church_val"):
        common.data_root("minilsun:kitchen")


def _broden_zip(tmp_path, monkeypatch) -> bytes:
    """helpers.write_broden's planted Broden folder, with 64-pixel images (a ResNet needs at least 32), zipped."""
    from helpers import write_broden

    root = tmp_path / "b" / "broden1_224"
    write_broden(str(root), image_size=64, seg_size=32)
    return _zip({os.path.relpath(p, tmp_path / "b"): open(p, "rb").read()
                 for p in glob.glob(str(root / "**" / "*"), recursive=True) if os.path.isfile(p)})


def _tiny_resnet_bytes():
    from torch_zoo_reference import tv_resnet

    return state_bytes(tv_resnet(18, num_classes=4).state_dict())


@pytest.mark.slow
def test_launcher_downloads_verifies_converts_and_dissects_by_name(env, server, tmp_path, monkeypatch):
    """``launch.dissect --model=NAME --data=broden``: then the same names again with the server stopped."""
    from jaxdissect.convert import torchvision

    broden, weights = _broden_zip(tmp_path, monkeypatch), _tiny_resnet_bytes()
    server.files.update({"data/broden1_224.zip": broden, "mine/resnet18.pth": weights})
    env.registry({"broden1_224": {"url": server.url("data/broden1_224.zip"), "sha256": sha(broden)},
                  "tiny_resnet": {"kind": "classifier", "url": server.url("mine/resnet18.pth"), "sha256": sha(weights),
                                  "converter": "torchvision", "options": {"arch": "resnet18", "num_classes": 4}}})
    out = subprocess.run([sys.executable, "-m", "launch.dissect", "--model=tiny_resnet", "--data=broden",
                          "--layers=layer4", "--batch_size=2", f"--output_dir={tmp_path / 'run'}"], cwd=REPO,
                         env=env.vars(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.path.exists(tmp_path / "run" / "layer4" / "report.json")
    (tmp_path / "r.pth").write_bytes(weights)
    torchvision.convert(str(tmp_path / "r.pth"), str(tmp_path / "manual"), "resnet18", 4)
    _, manual = jaxdissect.load_model(str(tmp_path / "manual"))
    _, named = jaxdissect.load_model("tiny_resnet")
    leaves = jax.tree_util.tree_leaves_with_path
    assert all(np.array_equal(a, b) and pa == pb for (pa, a), (pb, b) in zip(leaves(manual), leaves(named)))
    server.stop()
    from launch import dissect as launcher

    built = launcher.build({"model": "tiny_resnet", "data": "broden", "layers": "layer4",
                            "output_dir": str(tmp_path / "again")})
    assert built["layers"] == ["layer4"]
