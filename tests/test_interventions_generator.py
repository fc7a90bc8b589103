"""Generator interventions on a planted toy generator whose units draw known objects.

``layer1`` is a 4x4 map of three units: unit 0 ("red") fires in the top row
when z[0] > 0, unit 2 ("green") in the bottom row when z[1] > 0, unit 1 never
matters. The output nearest-upsamples it 4x to a 16x16 image whose red channel
shows unit 0 and green channel unit 2. The "segmenter" labels red pixels 1 and
green pixels 2, so what each intervention must do is known exactly.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import layers
from jaxdissect.interventions import generator as gi


class _Layer1(nn.Module):
    @nn.compact
    def __call__(self, z):
        n = z.shape[0]
        top = jnp.zeros((4, 4)).at[0].set(1.0)
        bottom = jnp.zeros((4, 4)).at[3].set(1.0)
        red = nn.relu(z[:, 0])[:, None, None] * top
        green = nn.relu(z[:, 1])[:, None, None] * bottom
        noise = jnp.broadcast_to(z[:, 2, None, None], (n, 4, 4))
        return jnp.stack([red, noise, green], axis=-1)


class _Output(nn.Module):
    scale: int = 4

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, self.scale, axis=1), self.scale, axis=2)
        r, g = jnp.tanh(4 * x[..., 0]), jnp.tanh(4 * x[..., 2])
        return jnp.stack([r, g, -jnp.ones_like(r)], axis=-1)


class ToyGenerator(nn.Module):
    scale: int = 4  # image pixels per layer1 cell

    @nn.compact
    def __call__(self, z):
        return _Output(self.scale, name="output")(_Layer1(name="layer1")(z))


def segment(images):
    labels = jnp.where(images[..., 0] > 0.5, 1, jnp.where(images[..., 1] > 0.5, 2, 0))
    return labels[:, None].astype(jnp.int32)


GEN = ToyGenerator()
VARS = {}
Z = np.random.RandomState(0).standard_normal((24, 3)).astype(np.float32)


def _fractions(images):
    seg = np.asarray(segment(images))[:, 0]
    return np.stack([(seg == label).mean(axis=(1, 2)) for label in range(3)], axis=1)


def test_ablating_red_unit_removes_all_red():
    stats = gi.ablation_segstats(GEN, VARS, "layer1", [[0], [1], [2], [0, 2]], Z, segment, 3, batch_size=8)
    clean = _fractions(GEN.apply(VARS, Z))
    np.testing.assert_allclose(stats.baseline.mean, clean.mean(0))
    assert clean[:, 1].mean() > 0.1
    np.testing.assert_allclose(stats.removed_fraction(1), [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(stats.removed_fraction(2), [0.0, 0.0, 1.0, 1.0])
    assert stats.baseline.count == len(Z)


def test_cached_lower_part_equals_full_recomputation():
    sets = [[0], [1, 2], [2]]
    stats = gi.ablation_segstats(GEN, VARS, "layer1", sets, Z, segment, 3, batch_size=10, chunk=2)
    for i, units in enumerate(sets):
        images = layers.run(GEN, VARS, Z, edits={"layer1": layers.Ablate(units)})
        naive = _fractions(images)
        np.testing.assert_allclose(stats.ablated.mean[i], naive.mean(0), atol=1e-6)
        np.testing.assert_allclose(stats.ablated.variance[i], naive.var(0, ddof=1), atol=1e-6)
        clean = _fractions(GEN.apply(VARS, Z))
        np.testing.assert_allclose(stats.delta.mean[i], (naive - clean).mean(0), atol=1e-6)


def test_insertion_context_by_what_was_there():
    cells = [(0, 1), (3, 2), (1, 1)]
    stats = gi.insertion_context(GEN, VARS, "layer1", [0], 5.0, Z, segment, 3, batch_size=8, cells=cells)
    clean = np.asarray(segment(GEN.apply(VARS, Z)))[:, 0]
    # Independent count: per image and cell, the label at the cell centre and the change.
    expected = {}
    for seg in clean:
        for y, x in cells:
            block = seg[4 * y:4 * y + 4, 4 * x:4 * x + 4]
            centre = seg[4 * y + 2, 4 * x + 2]
            if centre:
                expected.setdefault(int(centre), []).append(
                    [-(block == 0).sum(), 16 - (block == 1).sum(), -(block == 2).sum()])
    for cond, deltas in expected.items():
        deltas = np.asarray(deltas, float)
        assert stats.delta.count[cond] == len(deltas)
        np.testing.assert_allclose(stats.delta.mean[cond], deltas.mean(0))
    # Green (label 2) cells get the red object painted over them: +16 red, -16 green.
    assert stats.added(1)[2][0] == 16.0
    np.testing.assert_allclose(stats.delta.mean[2, 2], -16.0)
    assert stats.delta.count[0] == 0


def test_unit_selection_and_bad_input():
    names = ["-", "tree", "door", "window"]
    iou = np.array([[0, 0.1, 0.0, 0], [0, 0.3, 0.2, 0], [0, 0.2, 0.5, 0]])
    np.testing.assert_array_equal(gi.top_units(iou, names, "tree", 2), [1, 2])
    with pytest.raises(gi.InterventionError, match="did you mean 'door'"):
        gi.top_units(iou, names, "dor", 2)
    with pytest.raises(gi.InterventionError, match="top 5 units of a layer with 3"):
        gi.top_units(iou, names, "tree", 5)
    with pytest.raises(gi.InterventionError, match="empty"):
        gi.ablation_segstats(GEN, VARS, "layer1", [[]], Z, segment, 3, batch_size=8)
    with pytest.raises(gi.InterventionError, match=r"unit indices \[7\] out of range; the layer has units 0..2"):
        gi.ablation_segstats(GEN, VARS, "layer1", [[0, 7]], Z, segment, 3, batch_size=8)
    with pytest.raises(gi.InterventionError, match="unknown layer 'layer9'.*layer1"):
        gi.ablation_segstats(GEN, VARS, "layer9", [[0]], Z, segment, 3, batch_size=8)
    with pytest.raises(gi.InterventionError, match="outside the 4x4"):
        gi.insertion_context(GEN, VARS, "layer1", [0], 1.0, Z, segment, 3, batch_size=8, cells=[(4, 0)])


def test_resumable_workdir(tmp_path):
    first = gi.ablation_segstats(GEN, VARS, "layer1", [[0], [2]], Z, segment, 3, batch_size=5,
                                 workdir=str(tmp_path / "w"))
    again = gi.ablation_segstats(GEN, VARS, "layer1", [[0], [2]], Z, segment, 3, batch_size=5,
                                 workdir=str(tmp_path / "w"))
    np.testing.assert_array_equal(first.delta.mean, again.delta.mean)
    with pytest.raises(Exception, match="different arguments"):
        gi.ablation_segstats(GEN, VARS, "layer1", [[1]], Z, segment, 3, batch_size=5, workdir=str(tmp_path / "w"))
