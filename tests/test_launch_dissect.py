"""``python -m launch.dissect``: kill and resume, flag parsing, bad inputs with clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxdissect.segmentation import SegmenterError
from launch import dissect as launcher
from helpers import launcher_config as _config
from helpers import numpy_init, write_broden
from launcher_cli import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-weight SmallCNN saved as a jaxdissect model directory."""
    from jaxdissect.checkpoint import save_model
    from jaxdissect.models.small_cnn import SmallCNN

    module = SmallCNN(widths=(8, 16, 16, 16))
    variables = numpy_init(module, (1, 64, 64, 3))
    path = str(tmp_path_factory.mktemp("models") / "tiny_cnn")
    save_model(path, module, variables, metadata={"model": "tiny_cnn", "preprocessing": {
        "normalization": "zc", "resize": 64, "crop": 64}})
    return path


def _command(model_dir, output_dir):
    return [sys.executable, "-m", "launch.dissect", f"--model={model_dir}", "--data=synthetic:48",
            "--segmenter=dataset", "--layers=conv3..conv4", "--batch_size=4", "--checkpoint_every=3",
            "--topk=5", "--thumbsize=20", f"--output_dir={output_dir}"]


def _env(cache=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    if cache:  # the three runs of the resume test share compiled programs
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _checkpoints(output_dir, name):
    d = os.path.join(output_dir, "work", name, "checkpoints")
    return [n for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []


@pytest.mark.slow
def test_kill_during_iou_pass_then_resume(model_dir, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    env = _env(cache=str(tmp_path / "jax_cache"))
    done = subprocess.run(_command(model_dir, full), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"report: {os.path.join(full, 'index.html')}" in done.stdout

    proc = subprocess.Popen(_command(model_dir, killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not _checkpoints(killed, "pass3") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert _checkpoints(killed, "pass3"), "the run was not killed during the IoU pass"
    assert not os.path.exists(os.path.join(killed, "work", "results.done"))

    again = subprocess.run(_command(model_dir, killed), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at batch" in again.stderr
    for layer in ("conv3", "conv4"):
        a = json.load(open(os.path.join(full, layer, "report.json")))
        b = json.load(open(os.path.join(killed, layer, "report.json")))
        assert a == b
        with np.load(os.path.join(full, layer, "arrays.npz")) as x, \
                np.load(os.path.join(killed, layer, "arrays.npz")) as y:
            for key in ("thresholds", "intersection", "top_index"):
                np.testing.assert_array_equal(x[key], y[key])
    assert os.path.exists(os.path.join(killed, "index.html"))


DISSECTABLE = ["conv1.conv", "conv1", "conv2.conv", "conv2", "pool", "conv3.conv", "conv3", "layer1",
               "layer2", "layer3", "layer10", "block.layer4"]


def test_parse_layers():
    assert launcher.parse_layers("conv", DISSECTABLE) == ["conv1", "conv2", "conv3", "layer1", "layer2",
                                                          "layer3", "layer10"]
    assert launcher.parse_layers("all", DISSECTABLE) == [n for n in DISSECTABLE if "." not in n]
    assert launcher.parse_layers("layer2..layer10", DISSECTABLE) == ["layer2", "layer3", "layer10"]
    assert launcher.parse_layers("conv3,conv1.conv,conv3", DISSECTABLE) == ["conv3", "conv1.conv"]
    with pytest.raises(launcher.LaunchError, match=r"unknown layer 'conv9'.*valid layers: conv1.conv, conv1"):
        launcher.parse_layers("conv9", DISSECTABLE)
    with pytest.raises(launcher.LaunchError, match="backwards"):
        launcher.parse_layers("layer3..layer1", DISSECTABLE)


def test_default_results_name(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # build() claims the default results directory
    built = launcher.build(_config(model=model_dir, data="synthetic:8", segmenter="dataset", layers="conv4"))
    assert built["output_dir"] == os.path.join("results", "tiny_cnn-synthetic-dataset-conv4-10")
    assert built["layers"] == ["conv4"]
    built = launcher.build(_config(model=model_dir, data="synthetic:8", segmenter="dataset",
                                   layers="conv1..conv3", quantile=0.005, thumbsize=64))
    assert built["output_dir"] == os.path.join("results", "tiny_cnn-synthetic-dataset-conv1..conv3-t64")
    assert built["layers"] == ["conv1", "conv2", "conv3"]


def test_bad_inputs(model_dir, tmp_path):
    with pytest.raises(launcher.LaunchError, match="no such directory.*convert"):
        launcher.build(_config(model=str(tmp_path / "missing"), data="synthetic:8"))
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(launcher.LaunchError, match="not_a_model"):
        launcher.build(_config(model=str(tmp_path / "not_a_model"), data="synthetic:8"))
    with pytest.raises(launcher.LaunchError, match=r"unknown layer 'conv5'.*valid layers:.*conv4"):
        launcher.build(_config(model=model_dir, data="synthetic:8", segmenter="dataset", layers="conv5"))
    with pytest.raises(launcher.LaunchError, match="--data is required"):
        launcher.build(_config(model=model_dir))
    with pytest.raises(launcher.LaunchError, match="unknown kind 'imagenet'"):
        launcher.build(_config(model=model_dir, data="imagenet:/x"))
    with pytest.raises(launcher.LaunchError, match="z vectors, but the model is a classifier"):
        launcher.build(_config(model=model_dir, data="z:10"))
    from jaxdissect.data.folders import DataSourceError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no .jpg/.jpeg/.png images"):
        launcher.build(_config(model=model_dir, data=f"folder:{tmp_path / 'empty'}", segmenter="dataset"))
    (tmp_path / "file").write_text("x")
    with pytest.raises((DataSourceError, launcher.LaunchError), match="not a directory"):
        launcher.build(_config(model=model_dir, data=f"places:{tmp_path / 'file'}", segmenter="dataset"))
    with pytest.raises(SegmenterError, match="upp directory .* does not exist"):
        launcher.build(_config(model=model_dir, data="synthetic:8", segmenter=f"upp={tmp_path / 'nope'}"))
    with pytest.raises(SegmenterError, match="cannot read 'colour"):
        launcher.build(_config(model=model_dir, data="synthetic:8", segmenter="colour=x"))


def test_main_prints_clear_error(tmp_path):
    code, _, err = cli("dissect", f"--model={tmp_path / 'missing'}", f"--cache_dir={tmp_path / 'cache'}")
    assert code != 0
    assert "error: --model=" in err and "no such directory" in err


@pytest.mark.slow
def test_broden_data_with_image_level_labels(model_dir, tmp_path):
    """--data=broden:<dir> (labels from the dataset, incl. image-level scene/texture labels) end to end."""
    root = str(tmp_path / "broden")
    write_broden(root)
    out = str(tmp_path / "out")
    results, output_dir = launcher.run(_config(model=model_dir, data=f"broden:{root}", layers="conv1,conv2",
                                               batch_size=2, topk=3, thumbsize=16, output_dir=out))
    assert output_dir == out
    for layer, units in (("conv1", 8), ("conv2", 16)):
        report = json.load(open(os.path.join(out, layer, "report.json")))
        assert len(report["units"]) == units
        assert report["header"]["name"] == "tiny_cnn on broden, dataset labels"
        assert results[layer].images == 3                     # the val split
        assert results[layer].iou.shape[1] == len(results[layer].label_names)
        kitchen = results[layer].label_names.index("kitchen")   # scene label of val images 0 and 2
        assert results[layer].label_pixels[kitchen] == 2 * 8 * 8
    assert os.path.exists(os.path.join(out, "index.html"))
