"""Attacks: PGD against a NumPy reference step for step, ball and box; CW against the closed-form distance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect.attacks import AttackError, carlini_wagner_l2, class_indices, pgd
from jaxdissect.interventions.common import InterventionError

N, H, W, C, K = 4, 6, 6, 3, 5
D = H * W * C


def linear_model(seed=0, k=K, scale=1.0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((D, k)) * scale).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    fn = jax.jit(lambda x: x.reshape(x.shape[0], -1) @ w + b)
    return w.astype(np.float64), b.astype(np.float64), fn


def np_pgd(w, b, x0, classes, eps, step, steps, norm, targeted):
    """Plain NumPy PGD in float64 with the analytic cross-entropy gradient of a linear model."""
    x = x0.astype(np.float64).copy()
    history = []
    for _ in range(steps):
        z = x.reshape(len(x), -1) @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(x)), classes] -= 1.0
        g = (p @ w.T).reshape(x.shape)
        if norm == "linf":
            move = np.sign(g)
        else:
            move = g / np.sqrt((g**2).reshape(len(x), -1).sum(1)).reshape(-1, 1, 1, 1)
        x = x + (-1 if targeted else 1) * step * move
        d = x - x0
        if norm == "linf":
            d = np.clip(d, -eps, eps)
        else:
            n = np.sqrt((d**2).reshape(len(x), -1).sum(1)).reshape(-1, 1, 1, 1)
            d = d * np.minimum(1.0, eps / np.maximum(n, 1e-12))
        x = np.clip(x0 + d, 0, 1)
        history.append(x.copy())
    return history


@pytest.mark.parametrize("norm,targeted", [("linf", True), ("l2", True), ("linf", False)])
def test_pgd_equals_numpy_step_for_step(norm, targeted):
    w, b, fn = linear_model(scale=0.1)  # unsaturated softmax: gradients well above float32 rounding
    rng = np.random.default_rng(1)
    x0 = rng.uniform(0, 1, (N, H, W, C)).astype(np.float32)
    classes = rng.integers(0, K, N).astype(np.int32)
    eps, step = (0.05, 0.02) if norm == "linf" else (0.8, 0.3)
    ref = np_pgd(w, b, x0, classes, eps, step, 4, norm, targeted)
    for steps in (1, 2, 4):
        kw = dict(targets=classes) if targeted else dict(targets=None, labels=classes)
        out = np.asarray(pgd(fn, x0, eps=eps, step_size=step, steps=steps, norm=norm, **kw))
        np.testing.assert_allclose(out, ref[steps - 1], atol=2e-5, err_msg=f"after {steps} steps")


def test_pgd_stays_in_ball_and_box_and_moves_toward_target():
    w, b, fn = linear_model(scale=3.0)
    rng = np.random.default_rng(2)
    x0 = rng.uniform(0, 1, (N, H, W, C)).astype(np.float32)
    targets = np.array([0, 1, 2, 3], np.int32)
    for norm, eps in (("linf", 0.03), ("l2", 0.5)):
        out = np.asarray(pgd(fn, x0, targets, eps=eps, step_size=eps / 4, steps=10, norm=norm,
                             random_start=True, key=jax.random.key(0)))
        d = out - x0
        assert out.min() >= 0 and out.max() <= 1
        if norm == "linf":
            assert np.abs(d).max() <= eps + 1e-6
        else:
            assert np.sqrt((d**2).reshape(N, -1).sum(1)).max() <= eps * (1 + 1e-5)
        before = np.asarray(fn(x0))[np.arange(N), targets] - np.asarray(fn(x0)).max(1)
        after = np.asarray(fn(out))[np.arange(N), targets] - np.asarray(fn(out)).max(1)
        assert (after >= before).all()


def test_pgd_under_vmap_equals_batched():
    _, _, fn = linear_model()
    x0 = np.random.default_rng(3).uniform(0, 1, (N, H, W, C)).astype(np.float32)
    t = np.arange(N, dtype=np.int32) % K
    batched = pgd(fn, x0, t, eps=0.05, step_size=0.01, steps=3)
    one = jax.vmap(lambda x, c: pgd(fn, x[None], c[None], eps=0.05, step_size=0.01, steps=3)[0])(x0, t)
    np.testing.assert_allclose(np.asarray(one), np.asarray(batched), atol=1e-6)


def test_cw_reaches_closed_form_distance_on_linear_two_class_model():
    rng = np.random.default_rng(4)
    n = 6
    v = rng.standard_normal(D)
    v *= 8.0 / np.linalg.norm(v)
    x0 = rng.uniform(0.3, 0.7, (n, D))
    c = -(x0 @ v) + rng.uniform(-3.0, 3.0, n)  # margins of +-0..3, distances up to 3/8
    c[np.abs(x0 @ v + c) < 0.8] += 1.5  # keep each image clearly on one side
    vj, cj = jnp.asarray(v, jnp.float32), jnp.asarray(c, jnp.float32)

    def fn(x):
        s = x.reshape(x.shape[0], -1) @ vj
        return jnp.stack([jnp.zeros_like(s), s], axis=-1)

    def fn_with_bias(x):
        return fn(x) + jnp.stack([jnp.zeros(n), cj], axis=-1)

    margin = x0 @ v + c
    targets = (margin < 0).astype(np.int32)  # the class the image is not
    closed_form = np.abs(margin) / np.linalg.norm(v)
    # the minimal perturbation stays inside the box
    assert (x0 - np.sign(margin)[:, None] * closed_form[:, None] * v / np.linalg.norm(v)).clip(0, 1).all()
    images = x0.reshape(n, H, W, C).astype(np.float32)
    adv, success = carlini_wagner_l2(fn_with_bias, images, targets)
    adv, success = np.asarray(adv), np.asarray(success)
    assert success.all()
    got = np.sqrt(((adv - images) ** 2).reshape(n, -1).sum(1))
    assert (np.asarray(fn_with_bias(adv)).argmax(1) == targets).all()
    np.testing.assert_array_less(closed_form * 0.999, got)
    np.testing.assert_array_less(got, closed_form * 1.03)


def test_parameters_as_partial_are_traced_arguments():
    w, b, _ = linear_model(scale=0.1)
    x0 = np.random.default_rng(6).uniform(0, 1, (N, H, W, C)).astype(np.float32)
    t = np.arange(N, dtype=np.int32) % K

    def f(params, x):
        return x.reshape(x.shape[0], -1) @ params[0] + params[1]

    fn = jax.tree_util.Partial(f, (jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)))
    ref = np_pgd(w, b, x0, t, 0.05, 0.02, 2, "linf", True)[-1]
    np.testing.assert_allclose(np.asarray(pgd(fn, x0, t, eps=0.05, step_size=0.02, steps=2)), ref, atol=2e-5)
    # new parameters of the same shapes reuse the compiled attack and give their own result
    fn2 = jax.tree_util.Partial(f, (jnp.asarray(-w, jnp.float32), jnp.asarray(b, jnp.float32)))
    ref2 = np_pgd(-w, b, x0, t, 0.05, 0.02, 2, "linf", True)[-1]
    np.testing.assert_allclose(np.asarray(pgd(fn2, x0, t, eps=0.05, step_size=0.02, steps=2)), ref2, atol=2e-5)


def test_cw_keeps_original_when_it_cannot_succeed():
    # the target class can never win: its logit is constant and far below
    fn = jax.jit(lambda x: jnp.stack([jnp.full(x.shape[0], 100.0), x.reshape(x.shape[0], -1).sum(1) * 0], -1))
    x0 = np.full((2, 2, 2, 3), 0.5, np.float32)
    adv, success = carlini_wagner_l2(fn, x0, np.array([1, 1], np.int32), steps=20, binary_search_steps=2)
    assert not np.asarray(success).any()
    np.testing.assert_array_equal(np.asarray(adv), x0)


def test_bad_input():
    _, _, fn = linear_model()
    x0 = np.random.default_rng(5).uniform(0, 1, (N, H, W, C)).astype(np.float32)
    t = np.zeros(N, np.int32)
    with pytest.raises(AttackError, match="eps=1.5 out of range"):
        pgd(fn, x0, t, eps=1.5, step_size=0.1, steps=1)
    with pytest.raises(AttackError, match="eps=0.0 out of range"):
        pgd(fn, x0, t, eps=0.0, step_size=0.1, steps=1)
    with pytest.raises(AttackError, match=r"pixel box \[0, 1\]"):
        pgd(fn, x0 * 255, t, eps=0.1, step_size=0.1, steps=1)
    with pytest.raises(AttackError, match=r"pixel box \[0, 1\]"):
        carlini_wagner_l2(fn, x0 - 0.5, t)
    with pytest.raises(AttackError, match=r"targets \[7\] out of range"):
        pgd(fn, x0, np.array([0, 7, 1, 2], np.int32), eps=0.1, step_size=0.1, steps=1)
    with pytest.raises(AttackError, match="logits_fn must be a function"):
        pgd("vgg16", x0, t, eps=0.1, step_size=0.1, steps=1)
    with pytest.raises(AttackError, match="norm must be"):
        pgd(fn, x0, t, eps=0.1, step_size=0.1, steps=1, norm="l1")
    with pytest.raises(AttackError, match="random_start=True needs key"):
        pgd(fn, x0, t, eps=0.1, step_size=0.1, steps=1, random_start=True)
    with pytest.raises(InterventionError, match="unknown class 'bedrom'; did you mean 'bedroom'"):
        class_indices(["bedroom", "hangar/indoor", "ski_resort"], ["ski_resort", "bedrom"])
    np.testing.assert_array_equal(class_indices(["a", "b", "c"], ["c", 0]), [2, 0])


def _cw_case():
    w, b, fn = linear_model(seed=7, scale=0.3)
    rng = np.random.default_rng(8)
    x0 = rng.uniform(0.2, 0.8, (N, H, W, C)).astype(np.float32)
    t = ((np.asarray(fn(x0)).argmax(1) + 1) % K).astype(np.int32)  # never the current class
    return w, b, fn, x0, t


def test_cw_host_chunks_equal_one_lax_program():
    """The host-driven chunks (abort-early between chunks) give the attack that one jitted lax program gives."""
    _, _, fn, x0, t = _cw_case()
    kw = {"steps": 23, "binary_search_steps": 3, "learning_rate": 0.05, "abort_early": True}
    adv, ok = carlini_wagner_l2(fn, x0, t, **kw)
    adv_j, ok_j = jax.jit(lambda x, c: carlini_wagner_l2(fn, x, c, **kw))(x0, t)
    np.testing.assert_array_equal(np.asarray(ok), np.asarray(ok_j))
    np.testing.assert_allclose(np.asarray(adv), np.asarray(adv_j), atol=1e-5)


def test_cw_equals_the_pytorch_attack_of_the_bench():
    """bench/attacks.py's PyTorch CW (torch.optim.Adam) and ours reach the same adversarials, same steps and constants."""
    torch = pytest.importorskip("torch")
    from bench.attacks import torch_cw

    w, b, fn, x0, t = _cw_case()
    wt, bt = torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)

    def net(x):  # NCHW in, flattened in NHWC order as the JAX model
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) @ wt + bt

    xt = torch.from_numpy(x0.transpose(0, 3, 1, 2).copy())
    ref, ref_ok = torch_cw(net, xt, torch.from_numpy(t.astype(np.int64)), steps=40, search=3, lr=0.05)
    adv, ok = carlini_wagner_l2(fn, x0, t, steps=40, binary_search_steps=3, learning_rate=0.05, abort_early=False)
    np.testing.assert_array_equal(np.asarray(ok), ref_ok.numpy())
    assert np.asarray(ok).any()
    np.testing.assert_allclose(np.asarray(adv), ref.numpy().transpose(0, 2, 3, 1), atol=1e-4)
