"""Generator interventions on the planted toy generator (``jaxdissect.models.toy_generator``).

``layer4`` (8x8, 16 units) has red units 0-3, green 4-7, blue 8-11 and
always-on texture units 12-15; each cell paints the 4x4 pixel block above it
(and a little of its neighbours). :func:`segment` labels every pixel of the
32x32 image with the toy's colour "segmenter" (0 none, 1 red, 2 green,
3 blue), so what each intervention must do is known: ablating the red units
removes all red, switching them on in a cell paints its block red.
"""

import numpy as np
import pytest

from helpers import toy_segment as segment
from jaxdissect import layers
from jaxdissect.interventions import generator as gi
from jaxdissect.models import toy_generator as T

RED, GREEN, BLUE = (list(T.CONCEPT_UNITS[c]) for c in ("red", "green", "blue"))


GEN, VARS = T.toy_generator()
Z = T.sample_z(24, seed=0)


def _fractions(images):
    seg = np.asarray(segment(images))[:, 0]
    return np.stack([(seg == label).mean(axis=(1, 2)) for label in range(4)], axis=1)


def test_ablating_red_units_removes_all_red():
    sets = [RED, GREEN, BLUE, RED + GREEN]
    stats = gi.ablation_segstats(GEN, VARS, "layer4", sets, Z, segment, 4, batch_size=8)
    clean = _fractions(GEN.apply(VARS, Z))
    np.testing.assert_allclose(stats.baseline.mean, clean.mean(0), rtol=1e-6)
    assert clean[:, 1:].mean(0).min() > 0.03
    removed = np.stack([stats.removed_fraction(label) for label in (1, 2, 3)])  # [label, set]
    # All but a trace (the small random cross-channel part of layers 5-8 can leak a few pixels).
    np.testing.assert_allclose(np.diag(removed[:, :3]), 1.0, atol=0.005)
    np.testing.assert_allclose(removed[:2, 3], 1.0, atol=0.005)
    off_diagonal = removed[:, :3][~np.eye(3, dtype=bool)]
    assert off_diagonal.max() < 0.005, removed  # other colours are never removed (mixed pixels may gain)
    assert stats.baseline.count == len(Z)


def test_cached_lower_part_equals_full_recomputation():
    sets = [RED, [1, 5, 13], [14]]
    stats = gi.ablation_segstats(GEN, VARS, "layer4", sets, Z, segment, 4, batch_size=10, chunk=2)
    clean = _fractions(GEN.apply(VARS, Z))
    for i, units in enumerate(sets):
        images = layers.run(GEN, VARS, Z, edits={"layer4": layers.Ablate(units)})
        naive = _fractions(images)
        np.testing.assert_allclose(stats.ablated.mean[i], naive.mean(0), atol=1e-6)
        np.testing.assert_allclose(stats.ablated.variance[i], naive.var(0, ddof=1), atol=1e-6)
        np.testing.assert_allclose(stats.delta.mean[i], (naive - clean).mean(0), atol=1e-6)


def test_insertion_context_by_what_was_there():
    cells = [(0, 1), (3, 2), (6, 5)]
    stats = gi.insertion_context(GEN, VARS, "layer4", RED, 4.0, Z, segment, 4, batch_size=8, cells=cells)
    clean = np.asarray(segment(GEN.apply(VARS, Z)))[:, 0]
    # Independent count: per image and cell, a full forward pass with the units set in that cell,
    # the label at the cell centre and the change of every label's pixel count.
    expected = {}
    for y, x in cells:
        region = np.zeros((8, 8), np.float32)
        region[y, x] = 1
        edited = layers.run(GEN, VARS, Z, edits={"layer4": layers.SetUnits(RED, 4.0, region)})
        seg = np.asarray(segment(edited))[:, 0]
        for i in range(len(Z)):
            centre = clean[i, 4 * y + 2, 4 * x + 2]
            if centre:
                expected.setdefault(int(centre), []).append(
                    [(seg[i] == k).sum() - (clean[i] == k).sum() for k in range(4)])
    for cond, deltas in expected.items():
        deltas = np.asarray(deltas, float)
        assert stats.delta.count[cond] == len(deltas)
        np.testing.assert_allclose(stats.delta.mean[cond], deltas.mean(0), atol=1e-5)
    # Planted: red appears in green and blue contexts (mixed with what was there).
    assert 2 in expected and 3 in expected
    for cond in (2, 3):
        assert stats.added(1)[cond][0] > 0


def test_unit_selection_and_bad_input():
    names = ["-", "tree", "door", "window"]
    iou = np.array([[0, 0.1, 0.0, 0], [0, 0.3, 0.2, 0], [0, 0.2, 0.5, 0]])
    np.testing.assert_array_equal(gi.top_units(iou, names, "tree", 2), [1, 2])
    with pytest.raises(gi.InterventionError, match="did you mean 'door'"):
        gi.top_units(iou, names, "dor", 2)
    with pytest.raises(gi.InterventionError, match="top 5 units of a layer with 3"):
        gi.top_units(iou, names, "tree", 5)
    with pytest.raises(gi.InterventionError, match="empty"):
        gi.ablation_segstats(GEN, VARS, "layer4", [[]], Z, segment, 4, batch_size=8)
    with pytest.raises(gi.InterventionError, match=r"unit indices \[17\] out of range; the layer has units 0..15"):
        gi.ablation_segstats(GEN, VARS, "layer4", [[0, 17]], Z, segment, 4, batch_size=8)
    with pytest.raises(gi.InterventionError, match="unknown layer 'layer9'.*layer4"):
        gi.ablation_segstats(GEN, VARS, "layer9", [[0]], Z, segment, 4, batch_size=8)
    with pytest.raises(gi.InterventionError, match="outside the 8x8"):
        gi.insertion_context(GEN, VARS, "layer4", [0], 1.0, Z, segment, 4, batch_size=8, cells=[(8, 0)])


def test_resumable_workdir(tmp_path):
    first = gi.ablation_segstats(GEN, VARS, "layer4", [RED, BLUE], Z, segment, 4, batch_size=5,
                                 workdir=str(tmp_path / "w"))
    again = gi.ablation_segstats(GEN, VARS, "layer4", [RED, BLUE], Z, segment, 4, batch_size=5,
                                 workdir=str(tmp_path / "w"))
    np.testing.assert_array_equal(first.delta.mean, again.delta.mean)
    with pytest.raises(Exception, match="different arguments"):
        gi.ablation_segstats(GEN, VARS, "layer4", [GREEN], Z, segment, 4, batch_size=5, workdir=str(tmp_path / "w"))
