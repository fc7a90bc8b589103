"""The generator intervention experiment end to end on a planted toy generator and segmenter.

Unit 0 of ``layer1`` paints red blocks (label 1), unit 2 green ones (label
2); the 'dissection' says so. Removing 'red' must remove every red pixel;
inserting 'red' must add red area in every context; all outputs are written.
"""

import json
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import test_interventions_generator as interventions_test
from jaxdissect.pipelines import intervene_generator as experiment


GEN = interventions_test.ToyGenerator(scale=16)  # 64x64 images, segmented at 16x16


class ToySegmenter(nn.Module):
    label_names = ("-", "red", "green")

    def __call__(self, images, downsample=4):
        small = images[:, ::downsample, ::downsample]
        labels = jnp.where(small[..., 0] > 0.5, 1, jnp.where(small[..., 1] > 0.5, 2, 0))
        return labels[:, None].astype(jnp.int32)


def test_experiment_outputs(tmp_path):
    z = np.random.RandomState(1).standard_normal((40, 3)).astype(np.float32)
    iou = np.array([[0, 0.5, 0], [0, 0.01, 0.02], [0, 0, 0.6]])
    out = str(tmp_path / "out")
    summaries = experiment.run_experiment(
        GEN, {}, "layer1", ToySegmenter(), {}, {"iou": iou}, z, output_dir=out, remove="red",
        remove_units=2, insert="red", insert_units=1, insert_quantile=0.995, batch_size=16, min_samples=1)
    removed = {r["n"]: r["removed_fraction"] for r in summaries["remove"]["removed"]}
    assert removed == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}
    assert summaries["remove"]["units"] == [0, 1]
    contexts = {r["context"]: r for r in summaries["insert"]["contexts"]}
    # A red block is 4x4 = 16 segmentation pixels; on green it is all new.
    baseline_red = (np.asarray(ToySegmenter().apply({}, GEN.apply({}, z))) == 1).sum((1, 2, 3)).mean()
    assert contexts["green"]["added_fraction"] == pytest.approx(16 / baseline_red)
    for name in ("remove_red.json", "remove_red.npz", "remove_red.png", "remove_red_grid.png",
                 "insert_red.json", "insert_red.npz", "insert_red.png", "insert_red_grid.png", "summary.json"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["remove"]["concept"] == "red"


def test_bad_inputs(tmp_path):
    z = np.zeros((4, 3), np.float32)
    with pytest.raises(experiment.ExperimentError, match="2 labels|3 labels"):
        experiment.run_experiment(GEN, {}, "layer1", ToySegmenter(), {}, {"iou": np.zeros((3, 2))}, z,
                                  output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="did you mean 'red'"):
        experiment.run_experiment(GEN, {}, "layer1", ToySegmenter(), {}, {"iou": np.zeros((3, 3))}, z,
                                  output_dir=str(tmp_path), remove="reed", insert=None)
    with pytest.raises(experiment.ExperimentError, match="dissect the layer first"):
        experiment.load_dissection(str(tmp_path), "layer1")
