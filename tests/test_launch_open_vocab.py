"""``launch.dissect --scorer=...`` as a user types it (issue 24): open-vocabulary labels beside the IoU labels,
a vision transformer dissected on its patch grid, and every bad input of the issue as one line.

Runs in-process through ``tests/launcher_cli.py`` on the small demo model and on a random-weight ViT
(torchvision's layout, written by the PyTorch reference and converted with ``jaxdissect.convert.vit``).
"""

import json
import os

import numpy as np
import pytest

from launcher_cli import cli, tiny_demo_cache


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    tiny_demo_cache(cache)
    return cache


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A random-weight torchvision-layout ViT for 64-pixel images (4x4 patch grid), converted."""
    torch = pytest.importorskip("torch")
    import torch_clip_reference as ref
    from jaxdissect.convert import vit as convert_vit

    d = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    model = ref.randomize(ref.ViT(64, 16, 2, 2, 32, 64, 6), seed=3)
    torch.save(model.state_dict(), d / "vit.pth")
    convert_vit.convert(str(d / "vit.pth"), str(d / "model"), heads=2)
    return str(d / "model")


def one_line_error(code, err, expected):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1, err[-2000:]
    assert lines[-1].startswith("error: ") and expected in lines[-1], err[-2000:]
    assert "Traceback" not in err


@pytest.mark.slow
def test_labels_scorer_beside_iou_labels_on_the_demo(user):
    code, out, err = cli("dissect", "--scorer=labels", "--layers=conv4,fc", "--data=synthetic:32",
                         "--similarity_top_k=8", "--topk=5", "--thumbsize=16", "--batch_size=16",
                         "--label_metrics", "--output_dir=ov")
    assert code == 0, err[-3000:]
    assert "conv4: open-vocabulary labels name" in out and "fc: open-vocabulary labels name" in out
    report = json.load(open(user / "ov" / "fc" / "report.json"))["units"]
    assert len(report) == 6 and all(isinstance(u["ov_label"], str) and "ov_top" in u for u in report)
    page = (user / "ov" / "index.html").read_text()
    assert "<th>open-vocabulary label</th>" in page and "<th>soft_wpmi</th>" in page
    launch = json.load(open(user / "ov" / "launch.json"))
    assert launch["scorer"] == "labels" and launch["similarity_top_k"] == 8


@pytest.mark.slow
def test_vit_patch_grid_dissected_as_a_feature_map(user, vit_dir):
    """The ViT's grid view through the launcher equals the block's tokens laid on the grid in NumPy and
    dissected as any [N, h, w, U] map (``dissect_activations``); its CLS token is labelled too."""
    from jaxdissect import load_model
    from jaxdissect.data.synthetic import SyntheticScenes
    from jaxdissect.layers import capture
    from jaxdissect.statistics import dissect_activations

    block = "encoder.layers.encoder_layer_1"
    code, out, err = cli("dissect", f"--model={vit_dir}", "--data=synthetic:32", f"--layers={block}.residual,"
                         f"{block}.residual_cls", "--scorer=labels", "--similarity_top_k=8", "--topk=5",
                         "--thumbsize=16", "--batch_size=8", "--quantile=0.05", "--output_dir=vit")
    assert code == 0, err[-3000:]
    assert os.path.exists(user / "vit" / "index.html")
    grid = np.load(user / "vit" / f"{block}.residual" / "arrays.npz")
    module, variables = load_model(vit_dir)
    data = SyntheticScenes(32, seed=0)
    batches = []
    for start in range(0, 32, 8):
        b = data.get_batch(range(start, start + 8))
        _, acts = capture(module, variables, b["image"], [block])
        tokens = np.asarray(acts[block])                                     # [8, 1 + 16, 32]
        batches.append((tokens[:, 1:].reshape(8, 4, 4, 32), b["seg"]))
    ref = dissect_activations(lambda: iter(batches), len(data.label_names), quantile=0.05, topk=5, progress=False)
    # Two compiled programs (the pipeline's jitted forward, eager capture here) round 1 ulp apart, so a pixel
    # at a threshold may count on one side only: counts within 2 pixels, everything else equal to rounding.
    np.testing.assert_allclose(grid["thresholds"], ref.thresholds, rtol=1e-5, atol=1e-6)
    assert np.abs(grid["active"] - ref.active).max() <= 2
    assert np.abs(grid["intersection"].astype(np.int64) - ref.intersection).max() <= 2
    np.testing.assert_array_equal(grid["top_index"], ref.top_index)
    np.testing.assert_array_equal(grid["label_pixels"], ref.label_pixels)
    cls = json.load(open(user / "vit" / f"{block}.residual_cls" / "report.json"))["units"]
    assert len(cls) == 32 and all("ov_label" in u for u in cls)


def test_bad_inputs_are_one_line_errors(user, vit_dir):
    (user / "dup.txt").write_text("red\nblue\nred\n")
    (user / "empty.txt").write_text("red\n\nblue\n")
    (user / "latin1.txt").write_bytes("red\ncaf\xe9\n".encode("latin-1"))
    base = ("--data=synthetic:20", "--layers=conv4")
    cases = [
        (("--scorer=labels", "--vocabulary=dup.txt"), "dup.txt line 3: 'red' repeats line 1"),
        (("--scorer=labels", "--vocabulary=empty.txt"), "empty.txt line 2 is empty"),
        (("--scorer=clip:ViT-B/16", "--vocabulary=latin1.txt"), "latin1.txt line 2: byte b'\\xe9' at column 4 is "
                                                                "not UTF-8"),
        (("--scorer=clip:ViT-L/14",), "--scorer=clip:ViT-L/14: neither a known scorer nor a converted CLIP "
                                      "directory; known scorers: labels, clip:ViT-B/16, clip:RN50"),
        (("--scorer=labels", "--similarity_top_k=50"), "--similarity_top_k=50 is more than the 20 images"),
        (("--scorer=labels",), "--similarity_top_k=100 (soft_wpmi's default, CLIP-Dissect's) is more than the 20"),
        (("--vocabulary=20k",), "--vocabulary sets the open-vocabulary labels, which need --scorer"),
        (("--scorer=labels", "--similarity=cos_similarity", "--similarity_top_k=5"),
         "--similarity_top_k applies to soft_wpmi and wpmi"),
    ]
    for args, expected in cases:
        code, _, err = cli("dissect", *base, *args)
        one_line_error(code, err, expected)
    code, _, err = cli("dissect", f"--model={vit_dir}", "--data=synthetic:20",
                       "--layers=encoder.layers.encoder_layer_0")
    one_line_error(code, err, "layer encoder.layers.encoder_layer_0 holds tokens [N, 17, 32] (a transformer's "
                              "sequence: CLS and patch tokens), which cannot be laid on a grid as they are; dissect "
                              "its patch-grid views encoder.layers.encoder_layer_0.attention, "
                              "encoder.layers.encoder_layer_0.mlp.neurons, encoder.layers.encoder_layer_0.residual")
    assert not os.path.exists(user / "results")   # refused before any work
