"""The layer API (capture, run, edits, run_from) against NumPy forward passes of toy Linen models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect.layers import (
    Ablate,
    Edit,
    LayerError,
    Replace,
    SetUnits,
    capture,
    layer_names,
    layer_shapes,
    run,
    run_from,
)

U = 64  # units of the edited layer


class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(self.features, (3, 3), padding="SAME", name="conv")(x))


class Net(nn.Module):
    """Nested blocks, a Dense applied twice (shared) and a head."""

    @nn.compact
    def __call__(self, x):
        x = Block(16, name="b1")(x)
        shared = nn.Dense(16, name="shared")
        x = shared(x)
        x = shared(nn.relu(x))
        x = Block(U, name="b2")(x)
        return nn.Dense(5, name="head")(x.mean(axis=(1, 2)))


# ---- NumPy reference ------------------------------------------------------


def np_conv(x, kernel, bias):
    """3x3 SAME correlation, NHWC x HWIO."""
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nhwc,co->nhwo", xp[:, i : i + h, j : j + w], kernel[i, j])
    return out + bias


def np_forward(p, x, b2_edit=lambda a: a):
    """Returns every layer's activation and the output; ``b2_edit`` edits block b2's output."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    acts = {}
    acts["b1.conv"] = np_conv(x, p["b1"]["conv"]["kernel"], p["b1"]["conv"]["bias"])
    acts["b1"] = np.maximum(acts["b1.conv"], 0)
    s1 = acts["b1"] @ p["shared"]["kernel"] + p["shared"]["bias"]
    s2 = np.maximum(s1, 0) @ p["shared"]["kernel"] + p["shared"]["bias"]
    acts["shared"] = (s1, s2)
    acts["b2.conv"] = np_conv(s2, p["b2"]["conv"]["kernel"], p["b2"]["conv"]["bias"])
    acts["b2"] = b2_edit(np.maximum(acts["b2.conv"], 0))
    acts["head"] = acts["b2"].mean(axis=(1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]
    return acts["head"], acts


@pytest.fixture(scope="module")
def net():
    model = Net()
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    variables = model.init(jax.random.key(0), x)
    return model, variables, x


def close(a, b, tol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


# ---- discovery and capture ------------------------------------------------


def test_layer_names_in_call_order_with_shapes(net):
    model, variables, x = net
    assert layer_names(model, variables, x) == ["b1.conv", "b1", "shared", "b2.conv", "b2", "head"]
    shapes = layer_shapes(model, variables, x)
    assert shapes["b2"].shape == (2, 6, 6, U)
    assert isinstance(shapes["shared"], tuple) and len(shapes["shared"]) == 2


def test_capture_matches_numpy(net):
    model, variables, x = net
    ref_out, ref = np_forward(variables["params"], np.asarray(x, np.float64))
    out, acts = jax.jit(lambda v, x: capture(model, v, x, ["b1.conv", "b2", "shared", "head"]))(variables, x)
    close(out, ref_out)
    for name in ("b1.conv", "b2", "head"):
        close(acts[name], ref[name])
    # A module called twice gives its outputs in call order.
    assert isinstance(acts["shared"], tuple) and len(acts["shared"]) == 2
    close(acts["shared"][0], ref["shared"][0])
    close(acts["shared"][1], ref["shared"][1])


def test_capture_keeps_user_mutable_collections():
    class BN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4, name="dense")(x)
            return nn.BatchNorm(use_running_average=False, name="bn")(x)

    model, x = BN(), jnp.arange(12.0).reshape(3, 4)
    variables = model.init(jax.random.key(0), x)
    (out, state), acts = capture(model, variables, x, ["dense"], mutable=["batch_stats"])
    ref_out, ref_state = model.apply(variables, x, mutable=["batch_stats"])
    close(out, ref_out)
    assert set(state) == {"batch_stats"}
    close(state["batch_stats"]["bn"]["mean"], ref_state["batch_stats"]["bn"]["mean"])
    close(state["batch_stats"]["bn"]["mean"], np.asarray(acts["dense"]).mean(0) * 0.01)


def test_sequential_layers_are_named():
    model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    x = jnp.ones((1, 3))
    variables = model.init(jax.random.key(0), x)
    assert layer_names(model, variables, x) == ["layers_0", "layers_2"]
    out = run(model, variables, x, edits={"layers_0": Ablate(np.ones(4, bool))})
    close(out, np.broadcast_to(variables["params"]["layers_2"]["bias"], (1, 2)))


# ---- edits ------------------------------------------------------------------


def test_ablate_matches_numpy_and_mask_equals_indices(net):
    model, variables, x = net
    units = [0, 5, 17, 63]

    def zero(a):
        a = a.copy()
        a[..., units] = 0
        return a

    ref_out, _ = np_forward(variables["params"], np.asarray(x, np.float64), zero)
    by_index = run(model, variables, x, edits={"b2": Ablate(units)})
    mask = np.zeros(U, bool)
    mask[units] = True
    by_mask = run(model, variables, x, edits={"b2": Ablate(mask)})
    close(by_index, ref_out)
    np.testing.assert_array_equal(np.asarray(by_index), np.asarray(by_mask))


def test_vmapped_single_unit_ablations_equal_separate_calls(net):
    model, variables, x = net
    f = jax.jit(lambda e: run(model, variables, x, edits={"b2": e}))
    stacked = jax.jit(jax.vmap(f))(Ablate(np.eye(U, dtype=bool)))
    assert stacked.shape == (U, 2, 5)
    for u in range(U):
        np.testing.assert_allclose(np.asarray(stacked[u]), np.asarray(f(Ablate([u]))), rtol=1e-6, atol=1e-6)
    # Index-array edits vmap too.
    by_index = jax.vmap(f)(Ablate(np.arange(U)[:, None]))
    np.testing.assert_allclose(np.asarray(by_index), np.asarray(stacked), rtol=1e-6, atol=1e-6)


def test_one_compiled_function_serves_every_unit_set(net):
    model, variables, x = net
    f = jax.jit(lambda v, e: run(model, v, x, edits={"b2": e}))
    rng = np.random.default_rng(0)
    outs = [f(variables, Ablate(rng.random(U) < 0.3)) for _ in range(4)]
    outs += [f(variables, Ablate(rng.choice(U, 5, replace=False))) for _ in range(3)]
    assert f._cache_size() == 2  # one for bool masks [U], one for 5-index lists
    assert not np.allclose(outs[0], outs[1])


def test_set_units_with_region(net):
    model, variables, x = net
    region = np.zeros((6, 6), bool)
    region[1:3, 2:5] = True
    weight = np.linspace(0, 1, 36).reshape(6, 6)

    def ref(units, values, w):
        def edit(a):
            a = a.copy()
            for u, val in zip(units, values):
                a[..., u] = a[..., u] * (1 - w) + val * w
            return a

        return np_forward(variables["params"], np.asarray(x, np.float64), edit)[1]["b2"]

    _, got = run(model, variables, x, edits={"b2": SetUnits([3, 9], [5.0, -2.0], region)}, capture="b2")
    close(got["b2"], ref([3, 9], [5.0, -2.0], region.astype(float)))
    _, got = run(model, variables, x, edits={"b2": SetUnits([3, 9], 7.0, weight)}, capture=["b2"])
    close(got["b2"], ref([3, 9], [7.0, 7.0], weight))
    mask = np.zeros(U, bool)
    mask[[1, 2]] = True
    values = np.arange(U, dtype=np.float32)
    _, got = run(model, variables, x, edits={"b2": SetUnits(mask, values)}, capture=["b2"])
    close(got["b2"], ref([1, 2], [1.0, 2.0], np.ones((6, 6))))


def test_general_edit_forms(net):
    model, variables, x = net
    rng = np.random.default_rng(1)
    base = np_forward(variables["params"], np.asarray(x, np.float64))[1]["b2"]
    cases = [
        (0.5, 3.0),
        (rng.random(U), rng.normal(size=U)),
        (rng.random((2, 6, 6, U)), rng.normal(size=(2, 6, 6, U))),
        (rng.random((6, 6, 1)), 0.0),
    ]
    for a, r in cases:
        _, got = run(model, variables, x, edits={"b2": Edit(a, r)}, capture=["b2"])
        close(got["b2"], base * (1 - a) + r * a)


def test_edit_applies_at_every_call_of_a_shared_module_and_capture_is_after_edit(net):
    model, variables, x = net
    out, acts = run(model, variables, x, edits={"shared": Ablate(np.ones(16, bool))}, capture=["shared", "b2.conv"])
    assert all(np.all(np.asarray(a) == 0) for a in acts["shared"])
    p = variables["params"]["b2"]["conv"]
    np.testing.assert_allclose(np.asarray(acts["b2.conv"]), np.broadcast_to(p["bias"], (2, 6, 6, U)), atol=1e-6)


def test_callable_edit(net):
    model, variables, x = net
    _, plain = capture(model, variables, x, ["b2"])
    _, acts = run(model, variables, x, edits={"b2": lambda a: 2 * a}, capture=["b2"])
    close(acts["b2"], 2 * np.asarray(plain["b2"]))


# ---- run_from ---------------------------------------------------------------


def test_run_from_equals_full_pass_and_drops_lower_network(net):
    model, variables, x = net
    out, acts = capture(model, variables, x, ["b2"])
    np.testing.assert_allclose(np.asarray(run_from(model, variables, "b2", acts["b2"], x)), np.asarray(out), atol=1e-6)
    # Ablation on cached activations equals ablation in the full pass.
    edited = run_from(model, variables, "b2", Ablate([4, 8])(acts["b2"]), jax.ShapeDtypeStruct(x.shape, x.dtype))
    np.testing.assert_allclose(
        np.asarray(edited), np.asarray(run(model, variables, x, edits={"b2": Ablate([4, 8])})), atol=1e-6
    )
    # The compiled upper part costs a tiny fraction of the whole network (mean + head only).
    upper = jax.jit(lambda a: run_from(model, variables, "b2", a, x)).lower(acts["b2"]).compile()
    full = jax.jit(lambda x: model.apply(variables, x)).lower(x).compile()
    upper_flops, full_flops = upper.cost_analysis()["flops"], full.cost_analysis()["flops"]
    head_flops = 2 * 6 * 6 * U + 2 * 2 * U * 5 + 10
    assert upper_flops < 4 * head_flops < full_flops / 10, (upper_flops, head_flops, full_flops)


def test_replace_shape_is_checked(net):
    model, variables, x = net
    with pytest.raises(LayerError, match=r"does not match the layer's activation \(2, 6, 6, 64\)"):
        run(model, variables, x, edits={"b2": Replace(jnp.zeros((2, 6, 6, 3)))})


# ---- errors -----------------------------------------------------------------


def test_unknown_layer_names_list_close_matches_first(net):
    model, variables, x = net
    with pytest.raises(LayerError, match=r"unknown layer 'b2.cnv' \(did you mean 'b2.conv'.*b1.conv, b1, shared"):
        capture(model, variables, x, ["b2.cnv"])
    with pytest.raises(LayerError, match="unknown layer 'conv5_3'"):
        run(model, variables, x, edits={"conv5_3": Ablate([1])})
    with pytest.raises(LayerError, match="unknown layer 'hed'.*'head'"):
        run(model, variables, x, capture=["hed"])


def test_bad_units_are_reported(net):
    model, variables, x = net
    with pytest.raises(LayerError, match=r"unit indices \[64, 70\] out of range; the layer has units 0..63"):
        run(model, variables, x, edits={"b2": Ablate([1, 64, 70])})
    with pytest.raises(LayerError, match="unit mask has 10 entries but the layer has 64 units"):
        run(model, variables, x, edits={"b2": Ablate(np.zeros(10, bool))})
    with pytest.raises(LayerError, match="bool mask or integer indices"):
        Ablate([0.5, 1.5])
    with pytest.raises(LayerError, match="needs jax.vmap"):
        run(model, variables, x, edits={"b2": Ablate(np.eye(U, dtype=bool))})
    with pytest.raises(LayerError, match=r"region of shape \(4, 4\).*\[h, w\] = \(6, 6\)"):
        run(model, variables, x, edits={"b2": SetUnits([1], 1.0, np.ones((4, 4), bool))})
    with pytest.raises(LayerError, match="2 values for 3 listed units"):
        run(model, variables, x, edits={"b2": SetUnits([1, 2, 3], [1.0, 2.0])})
    with pytest.raises(LayerError, match=r"ablation of shape \(7,\) does not broadcast"):
        run(model, variables, x, edits={"b2": Edit(np.ones(7), 0.0)})


# ---- against the PyTorch reference models (published key names) -------------


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def converted(torch_model, converter):
    """Flax model from the torch weights through the converter (in memory: no 0.5 GB file round trip)."""
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    return converter.convert_state_dict(state)


@pytest.mark.slow
def test_ablation_matches_pytorch_vgg16_conv5_3():
    pytest.importorskip("torch")
    import jaxdissect.convert.vgg16_places365 as vgg_converter
    from tests.torch_reference import TorchVGG16, run_torch

    torch_model = TorchVGG16(seed=3)
    model, variables = converted(torch_model, vgg_converter)
    # 64x64 keeps the conv stack cheap; pool5 is then 2x2 and avgpool really resamples to 7x7.
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
    # Weights as an argument, not closed over: XLA would fold 0.5 GB of constants (13 s of compiling).
    f = jax.jit(lambda v, e: run(model, v, x, edits={"conv5_3": e}, capture=["conv5_3", "fc7"]))
    for units in ([0, 100, 200, 300, 511], list(range(0, 512, 2))):
        out, acts = f(variables, Ablate(np.isin(np.arange(512), units)))
        ref_out, ref = run_torch(torch_model, x, capture=["conv5_3", "fc7"], zero_units={"conv5_3": units})
        assert np.all(np.asarray(acts["conv5_3"])[..., units] == 0)
        assert rel_err(acts["conv5_3"], ref["conv5_3"]) < 1e-4
        assert rel_err(acts["fc7"], ref["fc7"]) < 1e-4
        assert rel_err(out, ref_out) < 1e-4
    assert f._cache_size() == 1
    assert rel_err(out, run_torch(torch_model, x)[0]) > 1e-3  # the ablation changed the logits


def test_ablation_matches_pytorch_proggan_layer4():
    pytest.importorskip("torch")
    import jaxdissect.convert.proggan as proggan_converter
    from tests.torch_reference import TorchProGAN, run_torch

    # layer4 as published (8x8, 512 units); fewer upper blocks keep the test fast.
    torch_model = TorchProGAN(sizes=(512, 512, 512, 256, 64), seed=5)
    model, variables = converted(torch_model, proggan_converter)
    z = np.random.RandomState(1).standard_normal((2, 512)).astype(np.float32)
    f = jax.jit(lambda v, e: run(model, v, z, edits={"layer4": e}, capture=["layer5"]))
    for units in ([3], [1, 50, 300, 511], list(range(100))):
        out, acts = f(variables, Ablate(np.isin(np.arange(512), units)))
        ref_out, ref = run_torch(torch_model, z, capture=["layer5"], zero_units={"layer4": units})
        assert rel_err(acts["layer5"], ref["layer5"]) < 1e-4
        assert rel_err(out, ref_out) < 1e-4
    assert rel_err(out, run_torch(torch_model, z)[0]) > 1e-3
