"""Benchmark: photo-editing costs: one inversion step, one adaptation step, paint edits per second.

    python -m bench.editing [--sizes=512,512,512,512,512,256,128,64] [--steps=2] [--repeats=2]

A ProGAN (``--sizes``; default the LSUN 256-pixel layout) with random weights,
the same weights in JAX and in the PyTorch reference (``tests/torch_reference``),
float32, CPU, batch 1, measured side by side in one process:

* inversion step (``jaxdissect.editing.invert``'s step): residuals on layer1-3,
  the whole generator, VGG16 features to relu4_2 (``conv4_2``) of the image,
  pixel + perceptual L1 + residual penalty, gradient, Adam (MultiStepLR);
* adaptation step (``jaxdissect.editing.adapt``'s step): the noise network
  (the same weights in both), the generator above layer4 from a fixed r4 with
  the maps multiplied into layer8/10/12/14, masked L1 + 0.1 penalty, Adam;
* paint edit: one generator pass from a stored r4 with a 15-unit stroke
  composed at layer4 (GANPaint's per-edit cost), edits per second.

JAX steps run as the library runs them: ``--steps`` steps in one jitted
``lax.scan`` chunk (the per-step figure is the chunk's time / steps). The
fastest of ``--repeats`` warm runs counts; wall seconds and CPU seconds of the
process are both given (the machine is shared). Figures go to the
``## Photo editing (bench/editing.py)`` section of ``bench/RESULTS.md``.
:func:`gpu_figures` measures the JAX side alone on the default device, for
``bench/gpu.py``.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.results import write_section

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Photo editing (bench/editing.py)"
LSUN = (512, 512, 512, 512, 512, 256, 128, 64)


def _timed(fn, repeats):
    """(best wall s, best CPU s) of ``fn()`` over ``repeats`` warm runs (after one warm-up)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def _jax_setup(sizes, seed=0):
    """Random ProGAN + VGG16 (JAX) and the PyTorch reference modules with the same weights."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import torch_reference as R

    from jaxdissect.convert import proggan as conv_gan
    from jaxdissect.convert import vgg16_places365 as conv_vgg

    tgen = R.TorchProGAN(sizes, seed=seed)
    tvgg = R.TorchVGG16(seed=seed)
    to_np = lambda sd: {k: v.detach().numpy() for k, v in sd.items()}  # noqa: E731
    gen, gvars = conv_gan.convert_state_dict(to_np(tgen.state_dict()))
    vgg, vvars = conv_vgg.convert_state_dict(to_np(tvgg.state_dict()))
    return (gen, gvars, vgg, vvars), (tgen, tvgg)


def jax_steps(gen, gvars, vgg, vvars, steps: int):
    """Callables for one chunk of inversion and adaptation steps and one paint edit (JAX)."""
    from jaxdissect.editing import Brushes, Stroke, adaptation, inversion, optimize, strokes

    r = gen.resolution
    z = jnp.asarray(np.random.RandomState(1).standard_normal((1, gen.sizes[0])), jnp.float32)
    target = jnp.asarray(np.random.RandomState(2).uniform(-1, 1, (1, r, r, 3)), jnp.float32)
    layers = ("layer1", "layer2", "layer3")
    shapes = strokes.layer_api.layer_shapes(gen, gvars, z)
    res = {n: jnp.zeros(shapes[n].shape) for n in layers}
    data = {"gvars": gvars, "z": z, "target": target, "pvars": vvars,
            "target_features": inversion._feature_fn(vgg, "conv4_2")(vvars, target)}
    cfg = (0.01, inversion.MILESTONES, 0.5)
    inv_loss = inversion._loss_fn(gen, "layer4", layers, vgg, "conv4_2")
    inv_chunk = optimize._chunk_fn(inv_loss, cfg, steps)
    inv_state = optimize.adam(*cfg).init(res)

    def invert():
        jax.block_until_ready(inv_chunk(res, inv_state, data))

    _, acts = jax.jit(lambda v, z: strokes.layer_api.capture(gen, v, z, ["layer4"]))(gvars, z)
    r4 = acts["layer4"]
    adapt_layers = tuple(n for n in adaptation.PROGGAN_ADAPT_LAYERS if n in shapes)
    by_res = sorted(adapt_layers, key=lambda a: -shapes[a].shape[1])
    rs = [int(shapes[a].shape[1]) for a in by_res]
    net = adaptation.NoiseMaps(tuple(int(shapes[a].shape[-1]) for a in by_res),
                               tuple([1] + [a // b for a, b in zip(rs[:-1], rs[1:])]))
    noise = jnp.asarray(np.random.RandomState(1).standard_normal((1, rs[0], rs[0], 32)), jnp.float32)
    params = net.init(jax.random.PRNGKey(1), noise)
    # Non-zero heads so the step does representative work (zero heads give zero first gradients upstream).
    params = jax.tree.map(lambda p: p + 0.01, params)
    keep = jnp.ones((r, r), jnp.float32)
    adata = {"gvars": gvars, "x": r4[0], "noise": noise, "target": target[0], "keep": keep}
    ad_loss = adaptation._loss_fn(gen, "layer4", net, tuple(by_res), 0.1)
    ad_chunk = optimize._chunk_fn(ad_loss, (0.1, (), 1.0), steps)
    ad_state = optimize.adam(0.1).init(params)

    def adapt():
        jax.block_until_ready(ad_chunk(params, ad_state, adata))

    u = int(shapes["layer4"].shape[-1])
    iou = np.zeros((u, 2))
    iou[:, 1] = np.random.RandomState(3).uniform(size=u)
    brushes = Brushes("layer4", ("-", "tree"), iou, np.full(u, 5.0))
    mask = np.zeros((32, 32))
    mask[8:20, 4:16] = 1

    def paint():
        jax.block_until_ready(strokes.apply_strokes(gen, gvars, r4, [Stroke("tree", mask)], brushes))

    return invert, adapt, paint, (net, params, noise, r4, by_res)


def torch_steps(tgen, tvgg, net_info, steps: int):
    """The same three operations in PyTorch, on the same weights."""
    import torch

    net, params, noise, r4, by_res = net_info
    names = list(tgen._modules)
    r = tgen.resolution
    z = torch.from_numpy(np.random.RandomState(1).standard_normal((1, tgen.sizes[0])).astype(np.float32))
    target = torch.from_numpy(np.random.RandomState(2).uniform(-1, 1, (1, r, r, 3)).astype(np.float32))
    target = target.permute(0, 3, 1, 2).contiguous()
    feats = list(tvgg.features._modules)
    vf = torch.nn.Sequential(*[tvgg.features._modules[n] for n in feats[:feats.index("relu4_2") + 1]])
    for p in list(tgen.parameters()) + list(tvgg.parameters()):
        p.requires_grad_(False)
    with torch.no_grad():
        tf = vf(target)

    def run_gen(x, start, adds=None, mults=None):
        for name in names[start:]:
            x = tgen._modules[name](x)
            if adds and name in adds:
                x = x + adds[name]
            if mults and name in mults:
                x = x * mults[name]
        return x

    with torch.no_grad():
        init = {}
        x = z.view(1, -1, 1, 1)
        for name in names[:3]:
            x = tgen._modules[name](x)
            init[name] = x
    res = {n: torch.zeros_like(init[n], requires_grad=True) for n in names[:3]}
    opt = torch.optim.Adam(list(res.values()), lr=0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [800, 1200, 1800], 0.5)

    def invert():
        for _ in range(steps):
            img = run_gen(z.view(1, -1, 1, 1), 0, adds=res)
            loss = (img - target).abs().mean() + (vf(img) - tf).abs().mean()
            loss = loss + sum((d * d).mean() for d in res.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    # The noise network with the JAX weights.
    tparams = []
    p = params["params"]
    convs = sorted(k for k in p if "conv" in k)
    heads = sorted(k for k in p if "head" in k)

    def tconv(k, stride):
        kh, _, cin, cout = np.asarray(p[k]["kernel"]).shape
        c = torch.nn.Conv2d(cin, cout, kernel_size=kh, stride=stride, padding=kh // 2)
        with torch.no_grad():
            c.weight.copy_(torch.from_numpy(np.asarray(p[k]["kernel"]).transpose(3, 2, 0, 1).copy()))
            c.bias.copy_(torch.from_numpy(np.array(p[k]["bias"])))
        tparams.extend(c.parameters())
        return c

    stages = []
    for i, s in enumerate(net.strides):
        cs = [tconv(k, s if j == 0 else 1) for j, k in enumerate(c for c in convs if c.startswith(f"stage{i}_"))]
        stages.append((cs, tconv(heads[i], 1)))
    tnoise = torch.from_numpy(np.asarray(noise)).permute(0, 3, 1, 2).contiguous()
    tr4 = torch.from_numpy(np.asarray(r4)).permute(0, 3, 1, 2).contiguous()
    aopt = torch.optim.Adam(tparams, lr=0.1)

    def maps():
        x, out = tnoise, {}
        for (cs, head), name in zip(stages, by_res):
            for c in cs:
                x = c(x)
                x = torch.nn.functional.leaky_relu(x / torch.sqrt((x * x).mean(1, keepdim=True) + 1e-8), 0.2)
            out[name] = head(x) / net.width
        return out

    def adapt():
        for _ in range(steps):
            s = maps()
            img = run_gen(tr4, names.index("layer4") + 1, mults={k: 1 + v for k, v in s.items()})
            loss = (img - target).abs().mean() + 0.1 * sum((v * v).mean() for v in s.values())
            aopt.zero_grad()
            loss.backward()
            aopt.step()

    u = tr4.shape[1]
    alpha = torch.zeros(1, u, 8, 8)
    alpha[:, :15, 2:5, 1:4] = 1

    def paint():
        with torch.no_grad():
            x = tr4 * (1 - alpha) + 5.0 * alpha
            run_gen(x, names.index("layer4") + 1)

    return invert, adapt, paint


def gpu_figures(sizes=LSUN, steps: int = 10, repeats: int = 3) -> dict:
    """JAX-only figures on the default device (for bench/gpu.py): seconds per step, edits per second."""
    (gen, gvars, vgg, vvars), _ = _jax_setup(tuple(sizes))
    invert, adapt, paint, _ = jax_steps(gen, gvars, vgg, vvars, steps)
    inv = _timed(invert, repeats)[0] / steps
    ad = _timed(adapt, repeats)[0] / steps
    pt = _timed(paint, repeats)[0]
    return {"device": str(jax.devices()[0]), "invert_s_per_step": inv, "adapt_s_per_step": ad,
            "adapt_1000_steps_s": ad * 1000, "paint_edits_per_s": 1 / pt}


def run(sizes, steps: int, repeats: int) -> dict:
    import torch

    load = os.getloadavg()[0]
    (gen, gvars, vgg, vvars), (tgen, tvgg) = _jax_setup(sizes)
    j_inv, j_ad, j_paint, info = jax_steps(gen, gvars, vgg, vvars, steps)
    t_inv, t_ad, t_paint = torch_steps(tgen, tvgg, info, steps)
    out = {"load_before": load, "torch_threads": torch.get_num_threads()}
    for name, jf, tf, per in (("invert", j_inv, t_inv, steps), ("adapt", j_ad, t_ad, steps),
                              ("paint", j_paint, t_paint, 1)):
        jw, jc = _timed(jf, repeats)
        tw, tc = _timed(tf, repeats)
        out[name] = {"jax_wall": jw / per, "jax_cpu": jc / per, "torch_wall": tw / per, "torch_cpu": tc / per}
    out["load_after"] = os.getloadavg()[0]
    return out


def report(r: dict, sizes, steps, repeats) -> str:
    res = 4 * 2 ** (len(sizes) - 2)
    lines = [SECTION, "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
             f"{os.cpu_count()} CPUs shared with other jobs (load average {r['load_before']:.1f} before, "
             f"{r['load_after']:.1f} after), jax {jax.__version__}, torch threads {r['torch_threads']}. "
             f"ProGAN sizes {list(sizes)} ({res} px), random weights shared by both; batch 1; "
             f"{steps} steps per timed run (JAX: one jitted lax.scan chunk), fastest of {repeats}.", "",
             "| operation | JAX wall s | JAX CPU s | PyTorch wall s | PyTorch CPU s | PyTorch / JAX (wall) |",
             "|---|---|---|---|---|---|"]
    for name, label in (("invert", "inversion step"), ("adapt", "adaptation step"), ("paint", "paint edit")):
        f = r[name]
        lines.append(f"| {label} | {f['jax_wall']:.3f} | {f['jax_cpu']:.3f} | {f['torch_wall']:.3f} | "
                     f"{f['torch_cpu']:.3f} | {f['torch_wall'] / f['jax_wall']:.2f}x |")
    p = r["paint"]
    lines += ["", f"Paint edits per second: JAX {1 / p['jax_wall']:.1f}, PyTorch {1 / p['torch_wall']:.1f} "
              f"(wall). A 1000-step adaptation at these rates: JAX {1000 * r['adapt']['jax_wall']:.0f} s, PyTorch "
              f"{1000 * r['adapt']['torch_wall']:.0f} s (the reference: about 30 s on a GPU). No GPU figures "
              "here: bench/gpu.py calls gpu_figures() where a GPU is available."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    from jaxdissect.models import set_cpu_xla_flags

    set_cpu_xla_flags()
    f = flags.FLAGS
    sizes = tuple(int(s) for s in f.sizes)
    r = run(sizes, f.steps, f.repeats)
    text = report(r, sizes, f.steps, f.repeats)
    print(text)
    if f.write:
        write_section(os.path.join(REPO, "bench", "RESULTS.md"), SECTION, text)


if __name__ == "__main__":
    flags.DEFINE_list("sizes", [str(s) for s in LSUN], "ProGAN widths (latent first).")
    flags.DEFINE_integer("steps", 2, "Optimisation steps per timed run.")
    flags.DEFINE_integer("repeats", 2, "Timed runs per operation (the fastest counts).")
    flags.DEFINE_bool("write", True, "Write the figures into bench/RESULTS.md.")
    app.run(main)
