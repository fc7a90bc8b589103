"""The generator intervention experiment end to end on a planted toy generator and segmenter.

The package's toy generator (``jaxdissect.models.toy_generator``): units 0-3 of
``layer4`` paint red, 4-7 green, 8-11 blue, and the planted 'dissection' says so.
Removing 'red' must remove every red pixel; inserting 'red' must add red area
where green or blue was; all outputs are written.
"""

import json
import os

import flax.linen as nn
import numpy as np
import pytest

from jaxdissect.models import toy_generator as T
from jaxdissect.pipelines import intervene_generator as experiment

GEN, VARS = T.toy_generator()  # 32x32 images; layer4 is 8x8 with red units 0-3, green 4-7, blue 8-11
RED = list(T.CONCEPT_UNITS["red"])


class ToySegmenter(nn.Module):
    """The toy's colour labels (0 none, 1 red, 2 green, 3 blue) as a segmenter module."""

    label_names = T.LABEL_NAMES

    def __call__(self, images, downsample=4):
        return T.color_segment(images, downsample=downsample)


def _planted_iou():
    iou = np.zeros((16, 4))
    for label, concept in enumerate(("red", "green", "blue"), start=1):
        for rank, unit in enumerate(T.CONCEPT_UNITS[concept]):
            iou[unit, label] = 0.5 - 0.1 * rank
    return iou


@pytest.mark.slow
def test_experiment_outputs(tmp_path):
    z = T.sample_z(24, seed=0)
    out = str(tmp_path / "out")
    summaries = experiment.run_experiment(
        GEN, VARS, "layer4", ToySegmenter(), {}, {"iou": _planted_iou()}, z, output_dir=out, remove="red",
        remove_units=4, insert="red", insert_units=4, insert_quantile=0.995, batch_size=8, min_samples=1)
    removed = {r["n"]: r["removed_fraction"] for r in summaries["remove"]["removed"]}
    assert removed[4] == pytest.approx(1.0, abs=0.005)  # all four red units off: no red left
    assert summaries["remove"]["units"] == RED
    contexts = {r["context"]: r for r in summaries["insert"]["contexts"]}
    # Planted: red units switched on paint red where green or blue was.
    assert contexts["green"]["added_fraction"] > 0 and contexts["blue"]["added_fraction"] > 0
    for name in ("remove_red.json", "remove_red.npz", "remove_red.png", "remove_red_grid.png",
                 "insert_red.json", "insert_red.npz", "insert_red.png", "insert_red_grid.png", "summary.json"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["remove"]["concept"] == "red"


def test_bad_inputs(tmp_path):
    z = np.zeros((4, 8), np.float32)
    with pytest.raises(experiment.ExperimentError, match="3 labels|4 labels"):
        experiment.run_experiment(GEN, VARS, "layer4", ToySegmenter(), {}, {"iou": np.zeros((16, 3))}, z,
                                  output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="did you mean 'red'"):
        experiment.run_experiment(GEN, VARS, "layer4", ToySegmenter(), {}, {"iou": np.zeros((16, 4))}, z,
                                  output_dir=str(tmp_path), remove="reed", insert=None)
    with pytest.raises(experiment.ExperimentError, match="dissect the layer first"):
        experiment.load_dissection(str(tmp_path), "layer4")
