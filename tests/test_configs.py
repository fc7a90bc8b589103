"""The one dissection config: defaults and checks written once, flags and identity derived; the config files."""

import glob
import os
import re

import pytest

from jaxdissect import config as config_lib
from jaxdissect.config import ConfigError, DissectConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(REPO, "configs", "[a-z]*.py")))


def test_defaults_checks_and_overrides():
    c = DissectConfig()
    assert c.level_quantile == 0.01 and c.replace(method="netdissect2017").level_quantile == 0.005
    assert config_lib.create(None, topk=5).topk == 5 and config_lib.create({"topk": 7}).topk == 7
    with pytest.raises(ConfigError, match=r"^topk=0: must be a positive integer$") as e:
        c.replace(topk=0)
    assert e.value.render("--") == "--topk=0: must be a positive integer"
    with pytest.raises(ConfigError, match="unknown setting.*qunatile"):
        c.replace(qunatile=0.1)
    with pytest.raises(ConfigError, match=r"quantile=1.5: must lie in \(0, 1\)"):
        c.replace(quantile=1.5)
    with pytest.raises(ConfigError, match="exact_formulas needs formulas=N"):
        c.replace(exact_formulas=True)
    with pytest.raises(ConfigError, match="method must be one of pnas, netdissect2017"):
        c.replace(method="2017")
    with pytest.raises(ConfigError, match="ALPHA"):
        c.replace(rotation="x")


def test_identity_holds_results_settings_and_addons_only_when_on():
    plain = DissectConfig().identity()
    assert {"quantile", "miniou", "topk", "model", "data", "layers"} <= set(plain)
    assert not {"checkpoint_every", "activation_cache_mb", "segmentation_cache_mb"} & set(plain)
    assert not {"formulas", "significance", "permutations", "label_metrics"} & set(plain)
    assert DissectConfig(checkpoint_every=3).identity() == plain     # run settings never change it
    explain = DissectConfig(formulas=2).identity()
    assert {"formulas", "exact_formulas", "significance", "permutations", "q"} <= set(explain)
    assert DissectConfig(label_metrics=True).identity()["label_metrics"] is True


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.basename(p))
def test_config_files(path):
    """Every config file: its docstring gives the command that runs it, and every variant is a valid config."""
    import ast

    doc = ast.get_docstring(ast.parse(open(path).read()))
    name = os.path.relpath(path, REPO)
    assert f"python -m launch.dissect --config={name}" in doc, doc
    variants = set(re.findall(re.escape(name) + r":(\w+)", doc)) | {"tiny", ""}
    for v in variants:
        c = config_lib.load(f"{path}:{v}" if v else path)
        assert isinstance(c, DissectConfig)
    tiny = config_lib.load(f"{path}:tiny")
    assert tiny.topk <= 5 and (tiny.num_images or int(tiny.data.rpartition(":")[2])) <= 32
    with pytest.raises(ConfigError, match="variants"):
        config_lib.load(f"{path}:nope")


@pytest.mark.slow
def test_tiny_variants_build_and_one_runs(tmp_path):
    """The tiny variants (with a random-weight classifier) build in the launcher; the 2017 one runs end to end,
    a command-line flag overriding the file."""
    import json

    from jaxdissect.checkpoint import save_model
    from jaxdissect.models.small_cnn import SmallCNN
    from launch import dissect as launcher
    from helpers import numpy_init

    module = SmallCNN(widths=(4, 8, 8, 8))
    model = str(tmp_path / "m")
    save_model(model, module, numpy_init(module, (1, 64, 64, 3)), metadata={"model": "m", "preprocessing": {
        "normalization": "zc", "resize": 64, "crop": 64}})
    for path in FILES:
        if "gandissect" in path:
            continue   # needs a generator
        config = config_lib.load(f"{path}:tiny").replace(model=model, layers="conv3,conv4")
        built = launcher.build(dict(config.as_dict(), output_dir=str(tmp_path / os.path.basename(path))))
        assert built["layers"] == ["conv3", "conv4"] and built["config"].topk == config.topk
    tiny = config_lib.load(os.path.join(REPO, "configs", "netdissect2017_alexnet.py:tiny"))
    out = str(tmp_path / "run")
    results, _ = launcher.run(dict(tiny.replace(model=model, layers="conv4", num_images=8).as_dict(),
                                   output_dir=out))
    assert results["conv4"].config["method"] == "netdissect2017" and results["conv4"].images == 8
    assert os.path.exists(os.path.join(out, "conv4", "conv4-result.csv"))
    assert json.load(open(os.path.join(out, "launch.json")))["method"] == "netdissect2017"


def test_launcher_flags_come_from_the_config(monkeypatch):
    """Every flagged field of DissectConfig is a launch.dissect flag with the field's default."""
    from launcher_cli import cli

    monkeypatch.chdir(REPO)
    code, out, _ = cli("dissect", "--help")
    assert code == 0
    for name in DissectConfig.flag_names():
        assert f"\n  --{name}: " in out, name
    assert "\n  --config: " in out
    # A flag given on the command line overrides the file (topk=5 there): checked before any work.
    code, _, err = cli("dissect", "--config=configs/netdissect2017_alexnet.py:tiny", "--topk=0")
    assert code == 1 and err == "error: --topk=0: must be a positive integer\n", err


@pytest.mark.slow
def test_launcher_traces_the_model_once(tmp_path, monkeypatch):
    """launch.dissect's layer list and the dissection's shapes come from one trace of the model."""
    import jaxdissect.layers
    import jaxdissect.pipelines.dissect as pipeline
    from jaxdissect.checkpoint import save_model
    from jaxdissect.models.small_cnn import SmallCNN
    from launch import dissect as launcher
    from helpers import numpy_init

    module = SmallCNN(widths=(4, 4, 4, 4))
    model = str(tmp_path / "m")
    save_model(model, module, numpy_init(module, (1, 64, 64, 3)), metadata={"model": "m", "preprocessing": {
        "normalization": "zc", "resize": 64, "crop": 64}})
    traced, real = [], jaxdissect.layers.layer_shapes
    monkeypatch.setattr(jaxdissect.layers, "layer_shapes", lambda *a, **k: traced.append(1) or real(*a, **k))
    pipeline._traced.cache_clear()
    launcher.run(dict(model=model, data="synthetic:8", layers="conv4", batch_size=8, topk=2, thumbsize=8,
                      output_dir=str(tmp_path / "out")))
    assert len(traced) == 1
