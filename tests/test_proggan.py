"""Progressive GAN: converted random PyTorch weights reproduce the PyTorch reference; the z sampler.

The reference is ``tests/torch_reference.TorchProGAN`` (written from spec 1.6
with torch.nn), at the full LSUN 256x256 widths.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_reference import TorchProGAN, run_torch, save_state_dict  # noqa: E402

import jaxdissect  # noqa: E402
from jaxdissect.convert import proggan as proggan_converter  # noqa: E402
from jaxdissect.data.latents import standard_z_sample  # noqa: E402
from jaxdissect.models import ProgressiveGenerator  # noqa: E402


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("proggan")
    torch_model = TorchProGAN(seed=0)
    pth = str(d / "proggan_test.pth")
    save_state_dict(torch_model, pth)
    meta = proggan_converter.convert(pth, str(d / "flax"))
    os.unlink(pth)
    module, variables = jaxdissect.load_model(str(d / "flax"))
    return torch_model, module, variables, meta


@pytest.fixture(scope="module")
def z():
    return np.random.RandomState(7).standard_normal((1, 512)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(models, z):
    torch_model = models[0]
    return run_torch(torch_model, z, capture=torch_model.layer_names)


def test_image_and_every_layer_match_pytorch(models, z, reference):
    torch_model, module, variables, meta = models
    assert isinstance(module, ProgressiveGenerator) and module.sizes == (512, 512, 512, 512, 512, 256, 128, 64)
    assert meta["resolution"] == 256 and meta["output"]["normalization"] == "zc"
    f = jax.jit(lambda v, z: module.apply(v, z, capture_intermediates=True, mutable=["intermediates"]))
    out, state = f(variables, z)
    ref_out, ref = reference
    assert out.shape == (1, 256, 256, 3)
    assert rel_err(out, ref_out) < 1e-4
    assert module.layers == torch_model.layer_names
    for name in torch_model.layer_names:
        act = state["intermediates"][name]["__call__"][0]
        assert act.shape == ref[name].shape, name
        assert rel_err(act, ref[name]) < 1e-4, name
    # Block outputs are after LeakyReLU(0.2): negative values exist but are damped.
    assert float(state["intermediates"]["layer6"]["__call__"][0].min()) < 0


def test_zeroing_units_of_a_block_matches_pytorch(models, z, reference):
    torch_model, module, variables, _ = models
    units = jnp.asarray([1, 50, 300, 511])

    def zero(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "layer4" and context.method_name == "__call__":
            out = out.at[..., units].set(0)
        return out

    with nn.intercept_methods(zero):
        out = jax.jit(module.apply)(variables, z)
    ref_out, _ = run_torch(torch_model, z, zero_units={"layer4": [1, 50, 300, 511]})
    assert rel_err(out, ref_out) < 1e-4
    assert rel_err(ref_out, reference[0]) > 1e-3


def test_z_with_trailing_unit_axes_and_bfloat16(models, z, reference):
    _, module, variables, _ = models
    out = jax.jit(module.clone(dtype=jnp.bfloat16).apply)(variables, z.reshape(1, 512, 1, 1))
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 256, 256, 3)
    assert rel_err(np.asarray(out, np.float32), reference[0]) < 0.1


@pytest.mark.parametrize("shape", [(2, 511), (2, 512, 2, 2), (512,), (2, 1, 1, 512)])
def test_wrong_z_shape_is_a_clear_error(models, shape):
    _, module, variables, _ = models
    with pytest.raises(ValueError, match=r"expects latents z of shape \[N, 512\]") as e:
        module.apply(variables, jnp.zeros(shape))
    assert str(shape) in str(e.value)


def test_small_generator_layout():
    module = ProgressiveGenerator(sizes=(16, 16, 8, 4))
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16)))["params"]
    assert list(shapes) == ["layer1", "layer2", "layer3", "layer4", "layer5", "layer6", "output_16x16"]
    assert shapes["layer1"]["kernel"].shape == (4, 4, 16, 16)
    assert shapes["layer5"]["kernel"].shape == (3, 3, 8, 4)
    assert shapes["output_16x16"]["kernel"].shape == (1, 1, 4, 3)
    assert jax.eval_shape(module.apply, {"params": shapes}, jnp.ones((3, 16))).shape == (3, 16, 16, 3)


# ---- latents (netdissect/zdataset.py) ---------------------------------------


def test_standard_z_sample_is_the_originals_and_prefix_stable():
    z = standard_z_sample(5, seed=1)
    assert z.shape == (5, 512) and z.dtype == np.float32
    ref = np.random.RandomState(1).standard_normal(5 * 512).reshape(5, 512).astype(np.float32)
    np.testing.assert_array_equal(z, ref)
    assert z[0, 0] == np.float32(1.6243453636632417)  # the well-known first draw of RandomState(1)
    np.testing.assert_array_equal(standard_z_sample(2, seed=1), z[:2])
    np.testing.assert_array_equal(standard_z_sample(3, depth=8, seed=4),
                                  np.random.RandomState(4).standard_normal(24).reshape(3, 8).astype(np.float32))
    assert not np.array_equal(standard_z_sample(1, seed=2), z[:1])
