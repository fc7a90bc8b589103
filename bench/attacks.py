"""Benchmark: attacked images per second of PGD and Carlini-Wagner L2 on VGG16 at 224, JAX vs PyTorch.

    python -m bench.attacks [--images=2] [--pgd_steps=10] [--cw_steps=10] [--cw_search=1] [--repeats=2]

VGG16 (365 classes, random He-normal weights, the same weights on both
sides), ``--images`` random 224x224 images in the [0, 1] box with the ImageNet
normalisation inside the model, float32, CPU. Side by side in one process,
alternating, the fastest of ``--repeats`` warm runs (compilation excluded):

* PGD: L-inf, ``eps = 8/255``, step ``2/255``, ``--pgd_steps`` steps, targeted;
  JAX: :func:`jaxdissect.attacks.pgd`; PyTorch: the same loop with autograd.
* CW: :func:`jaxdissect.attacks.carlini_wagner_l2` with ``--cw_search``
  binary-search rounds of ``--cw_steps`` Adam steps (abort_early off, so both
  sides do the same number of steps); PyTorch: the same tanh-space Adam loop
  (``torch.optim.Adam``), per-image constants, best adversarial kept (tests/test_attacks.py checks that
  both reach the same adversarials on a linear model). The
  paper's setting is 5 x 1000 steps; the per-step cost is what is measured,
  and the images/s for that setting is the measured rate / (5000 / steps).

Figures (CPU seconds of the process, all threads, and wall seconds) go to the
``## Attacks (bench/attacks.py)`` section of ``bench/RESULTS.md``.
:func:`gpu_section` is the JAX-only measurement for a GPU machine (bench/gpu.py
was not in the tree when this was written; call it from there).
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Attacks (bench/attacks.py)"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def random_variables(model, x):
    import jax

    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * np.sqrt(2.0 / max(1, np.prod(s.shape[:-1]))))
                        .astype(np.float32) if len(s.shape) > 1 else np.zeros(s.shape, np.float32), shapes)


def jax_logits_fn(variables):
    from jax.tree_util import Partial

    from jaxdissect.models.vgg16 import VGG16

    model = VGG16()

    def logits(v, x):
        return model.apply(v, (x - MEAN) / STD)

    return Partial(logits, variables)


def torch_vgg16(variables):
    """A PyTorch VGG16 with the same weights (NHWC flatten before fc6, as the Flax model)."""
    import torch
    from torch import nn

    from jaxdissect.models.vgg16 import CONV_LAYERS

    p = variables["params"]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList()
            for name in CONV_LAYERS:
                k = np.asarray(p[name]["kernel"])
                c = nn.Conv2d(k.shape[2], k.shape[3], 3, padding=1)
                c.weight.data = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))
                c.bias.data = torch.from_numpy(np.asarray(p[name]["bias"]).copy())
                self.convs.append(c)
            self.fcs = nn.ModuleList()
            for name in ("fc6", "fc7", "fc8"):
                k = np.asarray(p[name]["kernel"])
                f = nn.Linear(k.shape[0], k.shape[1])
                f.weight.data = torch.from_numpy(np.ascontiguousarray(k.T))
                f.bias.data = torch.from_numpy(np.asarray(p[name]["bias"]).copy())
                self.fcs.append(f)
            self.register_buffer("mean", torch.from_numpy(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.from_numpy(STD).view(1, 3, 1, 1))

        def forward(self, x):  # x: NCHW in [0, 1]
            x = (x - self.mean) / self.std
            for i, c in enumerate(self.convs):
                if i in (2, 4, 7, 10):
                    x = nn.functional.max_pool2d(x, 2)
                x = torch.relu(c(x))
            x = nn.functional.max_pool2d(x, 2).permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            x = torch.relu(self.fcs[0](x))
            x = torch.relu(self.fcs[1](x))
            return self.fcs[2](x)

    net = Net().eval()
    for q in net.parameters():
        q.requires_grad_(False)
    return net


def torch_pgd(net, x0, targets, eps, step, steps):
    import torch

    x = x0.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(net(x), targets, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x - step * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    return x.detach()


def torch_cw(net, x0, targets, steps, search, lr=5e-3, initial_const=1e-2):
    """The same tanh-space CW loop (abort_early off): Adam, per-image constants, best adversarial kept."""
    import torch

    n = x0.shape[0]
    w0 = torch.atanh((x0 * 2 - 1) * 0.999999)
    recon = (torch.tanh(w0) + 1) / 2
    const = torch.full((n,), initial_const)
    lower, upper = torch.zeros(n), torch.full((n,), float("inf"))
    best, best_d = x0.clone(), torch.full((n,), float("inf"))
    for _ in range(search):
        pert = torch.zeros_like(x0, requires_grad=True)
        opt = torch.optim.Adam([pert], lr=lr)
        found = torch.zeros(n, dtype=torch.bool)
        for _ in range(steps):
            x = (torch.tanh(w0 + pert) + 1) / 2
            logits = net(x)
            onehot = torch.nn.functional.one_hot(targets, logits.shape[1]).bool()
            other = logits.masked_fill(onehot, -float("inf")).amax(1)
            tl = logits.gather(1, targets[:, None])[:, 0]
            dist = ((x - recon) ** 2).flatten(1).sum(1)
            loss = (dist + const * (other - tl).clamp(min=0)).sum()
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                adv = logits.argmax(1) == targets
                better = adv & (dist < best_d)
                best[better], best_d[better] = x[better], dist[better]
                found |= adv
            opt.step()
        upper = torch.where(found, const, upper)
        lower = torch.where(found, lower, const)
        const = torch.where(torch.isinf(upper), const * 10, (lower + upper) / 2)
    return best, torch.isfinite(best_d)


def measure(images: int, pgd_steps: int, cw_steps: int, cw_search: int, repeats: int) -> dict:
    import jax
    import torch

    from jaxdissect import attacks
    from jaxdissect.models.vgg16 import VGG16

    load = os.getloadavg()
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (images, 224, 224, 3)).astype(np.float32)
    t = rng.integers(0, 365, images).astype(np.int32)
    variables = random_variables(VGG16(), x[:1])
    fn = jax_logits_fn(variables)
    net = torch_vgg16(variables)
    xt, tt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t.astype(np.int64))
    eps, step = 8 / 255, 2 / 255
    runs = {
        "pgd/jax": lambda: jax.block_until_ready(attacks.pgd(fn, x, t, eps=eps, step_size=step, steps=pgd_steps)),
        "pgd/torch": lambda: torch_pgd(net, xt, tt, eps, step, pgd_steps),
        "cw/jax": lambda: jax.block_until_ready(attacks.carlini_wagner_l2(
            fn, x, t, steps=cw_steps, binary_search_steps=cw_search, abort_early=False)),
        "cw/torch": lambda: torch_cw(net, xt, tt, cw_steps, cw_search),
    }
    with torch.no_grad():  # agreement of the two models, once
        agree = float(np.abs(np.asarray(fn(x)) - net(xt).numpy()).max())
    for f in runs.values():  # compile / warm up
        f()
    best = {k: (np.inf, np.inf) for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            c, w = time.process_time(), time.perf_counter()
            f()
            c, w = time.process_time() - c, time.perf_counter() - w
            best[k] = (min(best[k][0], c), min(best[k][1], w))
    return {"best": best, "images": images, "load": (load, os.getloadavg()), "agree": agree,
            "pgd_steps": pgd_steps, "cw_steps": cw_steps, "cw_search": cw_search, "repeats": repeats}


def report(r: dict) -> str:
    import jax
    import torch

    b, n = r["best"], r["images"]
    lines = [SECTION, "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
             f"{os.cpu_count()} CPUs shared with other jobs (load average {r['load'][0][0]:.1f} at the start, "
             f"{r['load'][1][0]:.1f} at the end: busy, so wall times are noisy; CPU seconds are the steadier "
             f"figure), jax {jax.__version__} (XLA_FLAGS `{os.environ.get('XLA_FLAGS', '')}`), torch "
             f"{torch.__version__} ({torch.get_num_threads()} threads). "
             f"VGG16 at 224, {n} images, random weights shared by both sides (logits agree to "
             f"{r['agree']:.1e}); fastest of {r['repeats']} warm runs, alternating.", "",
             "| attack | implementation | images per CPU-s | images/s (wall) |", "|---|---|---|---|"]
    names = {"pgd": f"PGD L-inf, {r['pgd_steps']} steps",
             "cw": f"CW L2, {r['cw_search']} x {r['cw_steps']} steps"}
    for k, (c, w) in b.items():
        a, impl = k.split("/")
        lines.append(f"| {names[a]} | {'JAX (jaxdissect.attacks)' if impl == 'jax' else 'PyTorch'} | "
                     f"{n / c:.3f} | {n / w:.3f} |")
    lines.append("")
    for a in ("pgd", "cw"):
        lines.append(f"- {names[a]}: JAX / PyTorch throughput {b[a + '/torch'][0] / b[a + '/jax'][0]:.2f}x per "
                     f"CPU-second, {b[a + '/torch'][1] / b[a + '/jax'][1]:.2f}x in wall time.")
    per_step = b["cw/jax"][1] / (r["cw_steps"] * r["cw_search"])
    lines.append(f"- The paper's CW setting (5 x 1000 steps, abort_early off as an upper bound) at this JAX "
                 f"per-step cost: {n / (per_step * 5000):.2e} images/s on this machine. No GPU figures: no GPU "
                 "was lent to this task (see gpu_section).")
    return "\n".join(lines) + "\n"


def gpu_section(images: int = 32, pgd_steps: int = 10, cw_steps: int = 1000, cw_search: int = 5) -> dict:
    """JAX-only attack throughput on the default (GPU) device, for bench/gpu.py: images/s of PGD and CW."""
    import jax

    from jaxdissect import attacks
    from jaxdissect.models.vgg16 import VGG16

    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (images, 224, 224, 3)).astype(np.float32)
    t = rng.integers(0, 365, images).astype(np.int32)
    fn = jax_logits_fn(jax.device_put(random_variables(VGG16(), x[:1])))
    out = {"device": str(jax.devices()[0]), "images": images}
    for name, f in (("pgd", lambda: attacks.pgd(fn, x, t, eps=8 / 255, step_size=2 / 255, steps=pgd_steps)),
                    ("cw", lambda: attacks.carlini_wagner_l2(fn, x, t, steps=cw_steps, binary_search_steps=cw_search,
                                                             abort_early=False))):
        jax.block_until_ready(f())
        w = time.perf_counter()
        jax.block_until_ready(f())
        out[f"{name}_images_per_s"] = images / (time.perf_counter() - w)
    return out


def main(argv):
    del argv
    from jaxdissect.models import set_cpu_xla_flags

    set_cpu_xla_flags()
    f = flags.FLAGS
    r = measure(f.images, f.pgd_steps, f.cw_steps, f.cw_search, f.repeats)
    text = report(r)
    print(text)
    from bench.results import write_section

    write_section(os.path.join(REPO, "bench", "RESULTS.md"), SECTION, text)


def define_flags() -> None:
    flags.DEFINE_integer("images", 2, "Images attacked together.")
    flags.DEFINE_integer("pgd_steps", 10, "PGD steps.")
    flags.DEFINE_integer("cw_steps", 10, "CW Adam steps per binary-search round.")
    flags.DEFINE_integer("cw_search", 1, "CW binary-search rounds.")
    flags.DEFINE_integer("repeats", 2, "Warm runs per implementation (the fastest counts).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
