"""Inversion and image-specific adaptation on the planted toy generator (gan-editing.md 1.4, 2.2)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxdissect import capture
from jaxdissect.editing import Brushes, EditError, adapt, apply_strokes, erase, invert
from jaxdissect.editing.optimize import psnr
from jaxdissect.models import toy_generator as T


@pytest.fixture(scope="module")
def toy():
    return T.toy_generator()


class TinyFeatures(nn.Module):
    """A stand-in perceptual network: its captured layer is a 3x3 conv named like VGG16's."""

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(4, (3, 3), name="conv4_2")(x)).mean()  # only conv4_2's output is compared


@pytest.mark.slow
def test_inversion_of_generated_image_reaches_35db(toy):
    module, variables = toy
    z = T.sample_z(2, seed=21)
    image = np.asarray(module.apply(variables, z))
    # A poor start (as from an encoder): z off by noise of size 0.7 per coordinate, 12-15 dB.
    z0 = z + 0.7 * np.random.RandomState(0).standard_normal(z.shape).astype(np.float32)
    assert psnr(module.apply(variables, z0), image).max() < 20
    # 200 steps instead of 3000 (the schedule's milestones scaled alike): the toy's layer3 residual
    # reaches every layer4 representation, so the fit converges fast.
    inv = invert(module, variables, image, z=z0, steps=200, milestones=(100, 150), progress=False)
    assert inv.psnr.min() > 35, inv.psnr
    np.testing.assert_allclose(inv.psnr, psnr(inv.reconstruction, image))
    assert inv.representation.shape == (2, 8, 8, 16) and inv.losses.shape == (200, 2)
    assert inv.losses[-1].mean() < 0.1 * inv.losses[0].mean()
    # The representation renders the reconstruction from layer4 up.
    again = apply_strokes(module, variables, inv.representation, [], _brushes())
    np.testing.assert_allclose(np.asarray(again), np.asarray(inv.reconstruction), atol=1e-5)


def _brushes():
    iou = np.zeros((16, 4))
    for k, units in enumerate(T.CONCEPT_UNITS.values()):
        iou[list(units), k + 1] = 0.5
    return Brushes("layer4", T.LABEL_NAMES, iou, np.full(16, 2.5))


def test_initial_loss_is_pixel_plus_perceptual_l1(toy):
    module, variables = toy
    z = T.sample_z(2, seed=4)
    target = np.asarray(module.apply(variables, T.sample_z(2, seed=5)))
    net = TinyFeatures()
    pvars = net.init(jax.random.PRNGKey(0), target)
    inv = invert(module, variables, target, z=z, steps=1, perceptual=(net, pvars), progress=False)
    start = np.asarray(module.apply(variables, z))
    k = np.asarray(pvars["params"]["conv4_2"]["kernel"])
    b = np.asarray(pvars["params"]["conv4_2"]["bias"])

    def feats(x):  # independent 3x3 'SAME' conv in NumPy
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return sum(xp[:, i:i + 32, j:j + 32] @ k[i, j] for i in range(3) for j in range(3)) + b

    expected = np.abs(start - target).mean(axis=(1, 2, 3)) + np.abs(feats(start) - feats(target)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(inv.losses[0], expected, rtol=1e-4)
    with pytest.raises(EditError, match="give z="):
        invert(module, variables, target, steps=1)


@pytest.mark.slow
def test_adaptation_fits_a_colour_shift_outside_the_mask(toy):
    module, variables = toy
    z = T.sample_z(1, seed=31)
    image, acts = capture(module, variables, z, ["layer4"])
    # The generator cannot make this image from the fixed representation: a colour shift.
    target = np.clip(np.asarray(image) * np.array([0.8, 1.0, 1.15]) + np.array([0.1, -0.05, 0.0]), -1, 1)
    target = target.astype(np.float32)
    mask = np.zeros((32, 32))
    mask[4:12, 4:12] = 1
    before = psnr(image, target)
    ad = adapt(module, variables, acts["layer4"], target, adapt_layers=T.ADAPT_LAYERS, mask=mask, steps=150,
               progress=False)
    assert ad.psnr[0] >= before[0] + 5, (before, ad.psnr)
    keep = np.asarray(ad.keep[0]) > 0.999
    assert keep.sum() > 500 and not keep[4:12, 4:12].any()
    err = np.abs(np.asarray(ad.reconstruction)[0] - target[0])[keep]
    assert err.mean() < 0.02 and np.quantile(err, 0.99) < 0.1, (err.mean(), np.quantile(err, 0.99))
    assert sorted(ad.maps) == ["layer6", "layer8"] and ad.maps["layer8"].shape == (1, 32, 32, 16)

    # Editing the adapted generator: the maps are switched off inside the edited region.
    brushes = _brushes()
    region = np.zeros((8, 8))
    region[2:6, 2:6] = 1
    adapted = np.asarray(erase(module, variables, acts["layer4"], "red", region, brushes, strength=4,
                               adaptation=ad))[0]
    plain = np.asarray(erase(module, variables, acts["layer4"], "red", region, brushes, strength=4))[0]
    inner = np.zeros((32, 32), bool)
    inner[12:20, 12:20] = True  # 4 px inside the region's 8..24 px square
    np.testing.assert_allclose(adapted[inner], plain[inner], atol=1e-5)
    far = np.ones((32, 32), bool)
    far[2:30, 2:30] = False
    np.testing.assert_allclose(adapted[far], np.asarray(ad.reconstruction)[0][far], atol=1e-5)
