"""Benchmark: the original's own dissection (davidbau/dissect, PyTorch on CPU) against ``jaxdissect.dissect``.

    python -m bench.vs_original --original=/path/to/davidbau/dissect --results=bench/RESULTS.md

(defaults ``--images=24 --images_b=24 --layers_b=conv1_1,conv5_3 --batch=8``:
an estimated 8 minutes on 2 quiet CPUs, 23 measured at load 6-10;
``--layers_b=all`` runs the original on every layer, an estimated 17 minutes more;
``--images_small=N`` runs both cases again over N images, about half as long again
for N = half the images.)

(``--original`` is a local checkout of https://github.com/davidbau/dissect;
nothing is fetched.) Both sides dissect the same synthetic JPEGs (smooth
noise, 256x256, in ``--workdir``) with the same random weights: VGG16
(tests/torch_reference.py's ``TorchVGG16``, the module tree and key names of
the original's ``experiment/oldvgg16.py``) and a unified-parsing segmenter
(tests/torch_segmenter_reference.py, published key names), saved as ``.pth``
and converted with ``converters.vgg16_places365`` and ``converters.segmenter``
for our side. Segmenter setting ``netp`` (UPP at 256 pixels, every object's
parts, no quadrants, no colour), quantile 0.01, label maps at 56x56.

* Case A: VGG16 ``conv5_3`` over ``--images`` images.
* Case B: all 13 conv layers over ``--images_b`` images. The original runs
  its experiment once per layer (model and segmenter again each time); we run
  all layers in one ``dissect`` call. ``--layers_b`` names the layers the
  ORIGINAL runs (our side always does all 13; default conv1_1 and conv5_3,
  the cheapest and a dearest: its per-layer cost grows with the unit count);
  the original's time for the other layers is ESTIMATED as the mean of the
  layers it ran (an underestimate: 6 of the 13 layers have 512 units), and
  the report says so. With ``--images_b`` equal to ``--images`` case A's
  conv5_3 run of the original counts as its conv5_3 run here.

Original side (one subprocess): its ``dissect_experiment.py`` work for one
layer, up to the IoU table, through its own library: ``nethook``
(``retain_layer('features.<layer>')``), ``upsample.upsampler((56, 56),
source=dataset)``, ``tally.tally_quantile`` (r=8192) of the upsampled
activations, ``tally.tally_topk`` of per-image maxima (batch 50),
``segmenter.UnifiedParsingSegmenter(segsizes=[256], all_parts=True)`` on
``renormalize``-d images with ``downsample=4``, ``tally.conditional_samples`` +
``tally.tally_conditional_mean`` (batch 1) and
``tally.iou_from_conditional_indicator_mean``, with its ``.npz`` cache files
written to a fresh results directory; its data set is
``parallelfolder.ParallelImageFolders`` with the Places transform (resize
256x256, centre crop 224, ImageNet normalisation). Changes needed to run it on
this CPU: ``.cuda()`` of tensors and modules returns them unchanged; data
loaders use ``num_workers=0`` and no pinned memory (the original asks for 100,
30 and 3 worker processes, which a 2-core machine cannot use);
``bench/prroi_torch.py`` replaces its CUDA-only PrRoI pooling; minimal
stand-ins for missing packages (only if not installed): ``torchvision``
(``transforms.Compose/Resize/CenterCrop/ToTensor/Normalize``, the
``RandomCrop``/``RandomResizedCrop`` classes its ``isinstance`` checks name,
``transforms.functional.to_tensor``, ``datasets.folder.default_loader``; a
bare ``models``), ``skimage.morphology`` (imported by its segmenter module,
used only for quadrant segmentations, not run here) and
``statsmodels.stats.correlation_tools`` (two names ``runningstats`` imports and
the timed path does not use).

Our side (another subprocess): ``jaxdissect.dissect`` on the converted model
and segmenter with the data source and segmenter ``launch.dissect`` builds
(``folder:`` spec, the model's preprocessing), ``output_dir=None``.

With ``--images_small`` each case also runs over fewer images, and the
difference between the two runs gives each side's cost per extra image:
compilation and set-up cancel out, so its ratio is the one that holds at
Places365 scale (36,500 images), where they are a negligible share.

Both sides: model and segmenter loading and imports are NOT timed; image and
HTML writing (unit strips, report.json, SVG) is left out on both sides; JAX's
compilation IS timed (a user waits for it). Reported per side: wall seconds,
CPU seconds of the process (all threads), load average before/after; results
are compared (thresholds: median relative difference, the original's being
KLL sketch estimates; each unit's best label and IoU).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Against the original's pipeline (bench/vs_original.py)"
VGG_CONV_LAYERS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                   "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
SETTING = "netp"
QUANTILE = 0.01
UPP_SIZES = dict(n_object=40, n_material=12, n_scene=10)


# --------------------------------------------------------------------------
# Shared inputs: images and weights.


def write_images(folder: str, count: int, seed: int = 0, size: int = 256) -> None:
    """``count`` smooth-noise RGB JPEGs (a coarse random field, bicubic-upsampled, plus fine noise)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def prepare(workdir: str, counts) -> dict:
    """Images, random-weight ``.pth`` files in the original's layout, and their conversions (made once)."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "tests"))
    import torch_reference
    import torch_segmenter_reference

    from jaxdissect.convert import segmenter as seg_converter
    from jaxdissect.convert import vgg16_places365

    paths = {"vgg_pth": os.path.join(workdir, "vgg16_random.pth"),
             "vgg": os.path.join(workdir, "vgg16"),
             # the original reads datasets/segmodel/upp-resnet50-upernet/ relative to its working directory
             "orig_cwd": os.path.join(workdir, "original"),
             "upp": os.path.join(workdir, "upp")}
    paths["upp_pth"] = os.path.join(paths["orig_cwd"], "datasets", "segmodel", "upp-resnet50-upernet")
    for n in counts:     # a folder per image count, so both sides read every image of theirs
        paths[f"images{n}"] = os.path.join(workdir, f"images{n}")
        if not os.path.isdir(paths[f"images{n}"]):       # one class folder, as the original's loader wants
            write_images(os.path.join(paths[f"images{n}"], "synthetic"), n)
    if not os.path.exists(paths["vgg_pth"]):
        torch.save(torch_reference.TorchVGG16(seed=0).state_dict(), paths["vgg_pth"])
    if not os.path.isdir(paths["vgg"]):
        vgg16_places365.convert(paths["vgg_pth"], paths["vgg"])
    if not os.path.exists(os.path.join(paths["upp_pth"], "labels.json")):
        torch_segmenter_reference.make_upp_checkpoint(paths["upp_pth"], seed=0, **UPP_SIZES)
    if not os.path.isdir(paths["upp"]):
        p = paths["upp_pth"]
        seg_converter.convert(os.path.join(p, "encoder_epoch_40.pth"), os.path.join(p, "decoder_epoch_40.pth"),
                              os.path.join(p, "labels.json"), paths["upp"])
    return paths


# --------------------------------------------------------------------------
# The original, made to run on this CPU.


def _stub_torchvision() -> list[str]:
    """Install a minimal ``torchvision`` (only what the timed path touches) if none is installed."""
    try:
        import torchvision  # noqa: F401

        return []
    except ImportError:
        pass
    import torch
    from PIL import Image

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    datasets = types.ModuleType("torchvision.datasets")
    folder = types.ModuleType("torchvision.datasets.folder")
    models = types.ModuleType("torchvision.models")

    def to_tensor(im):
        a = np.asarray(im.convert("RGB"), np.float32) / 255.0
        return torch.from_numpy(a.transpose(2, 0, 1).copy())

    class Compose:
        def __init__(self, transforms):
            self.transforms = list(transforms)

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    class Resize:
        def __init__(self, size):
            self.size = size

        def __call__(self, im):
            if isinstance(self.size, int):
                w, h = im.size
                s = self.size / min(w, h)
                target = (round(w * s), round(h * s))
            else:
                target = (self.size[1], self.size[0])
            return im if im.size == target else im.resize(target, Image.BILINEAR)

    class CenterCrop:
        def __init__(self, size):
            self.size = (size, size) if isinstance(size, int) else tuple(size)

        def __call__(self, im):
            w, h = im.size
            th, tw = self.size
            left, top = int(round((w - tw) / 2.0)), int(round((h - th) / 2.0))
            return im.crop((left, top, left + tw, top + th))

    class ToTensor:
        def __call__(self, im):
            return to_tensor(im)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = list(mean), list(std)

        def __call__(self, t):
            mean = torch.tensor(self.mean, dtype=t.dtype)[:, None, None]
            std = torch.tensor(self.std, dtype=t.dtype)[:, None, None]
            return (t - mean) / std

    class RandomCrop:  # named by the original's isinstance checks only
        pass

    class RandomResizedCrop:
        pass

    def default_loader(path):
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")

    for name, obj in dict(Compose=Compose, Resize=Resize, CenterCrop=CenterCrop, ToTensor=ToTensor,
                          Normalize=Normalize, RandomCrop=RandomCrop, RandomResizedCrop=RandomResizedCrop).items():
        setattr(transforms, name, obj)
    functional.to_tensor = to_tensor
    transforms.functional = functional
    folder.default_loader = default_loader
    datasets.folder = folder
    tv.transforms, tv.datasets, tv.models = transforms, datasets, models
    for m in (tv, transforms, functional, datasets, folder, models):
        sys.modules[m.__name__] = m
    return ["torchvision"]


def import_original(path: str) -> dict:
    """The original's ``netdissect`` modules, importable and runnable on CPU (see the module docstring)."""
    import importlib

    import torch

    if not os.path.isdir(os.path.join(path, "netdissect")):
        raise SystemExit(f"error: --original={path} has no netdissect/ directory; pass a checkout of "
                         "davidbau/dissect")
    stubbed = _stub_torchvision()
    try:
        importlib.import_module("skimage.morphology")
    except ImportError:
        sk = types.ModuleType("skimage")
        sk.morphology = types.ModuleType("skimage.morphology")
        sys.modules.update({"skimage": sk, "skimage.morphology": sk.morphology})
        stubbed.append("skimage")
    try:
        importlib.import_module("statsmodels.stats.correlation_tools")
    except ImportError:  # runningstats imports two names it uses only outside the timed path
        names = ("statsmodels", "statsmodels.stats", "statsmodels.stats.correlation_tools")
        sys.modules.update({n: types.ModuleType(n) for n in names})
        sys.modules[names[2]].cov_nearest = sys.modules[names[2]].corr_nearest = None
        stubbed.append("statsmodels")
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    sys.path.insert(0, os.path.abspath(path))
    from bench import prroi_torch

    prroi_torch.install("netdissect.upsegmodel")
    mods = {}
    for name in ("nethook", "upsample", "tally", "renormalize", "segmenter", "parallelfolder", "pidfile"):
        mods[name] = importlib.import_module(f"netdissect.{name}")
    mods["stubbed"] = stubbed
    return mods


def _check_loaded(module, path: str, what: str) -> None:
    """The original loads with ``strict=False``: make sure every key of the file did load."""
    import torch

    file_keys = {k for k in torch.load(path, weights_only=True) if not k.startswith("fc.")}
    model_keys = set(module.state_dict())
    missing, unexpected = model_keys - file_keys, file_keys - model_keys
    if missing or unexpected:
        raise SystemExit(f"error: {what}: the original's module and the reference file disagree "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")


def original_worker(paths: dict, original: str, layers: list[str], images: int, out: str) -> dict:
    """The original's per-layer dissection, once per layer; returns timings, writes arrays to ``out``."""
    import torch

    mods = import_original(original)
    nethook, upsample, tally, renormalize = mods["nethook"], mods["upsample"], mods["tally"], mods["renormalize"]
    torch.set_grad_enabled(False)
    torch.set_num_threads(os.cpu_count() or 1)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import torch_reference

    from PIL import Image  # noqa: F401  (loaded before timing, like every other import)

    tv = sys.modules["torchvision"].transforms
    net = torch_reference.TorchVGG16(seed=1)
    net.load_state_dict(torch.load(paths["vgg_pth"], weights_only=True))
    model = nethook.InstrumentedModel(net).eval()
    transform = tv.Compose([tv.Resize((256, 256)), tv.CenterCrop(224), tv.ToTensor(),
                            renormalize.NORMALIZER["imagenet"]])
    dataset = mods["parallelfolder"].ParallelImageFolders([paths[f"images{images}"]], classification=True, shuffle=True,
                                                          transform=transform)
    os.chdir(paths["orig_cwd"])
    segmodel = mods["segmenter"].UnifiedParsingSegmenter(segsizes=[256], all_parts=True, segdiv=None)
    upp = paths["upp_pth"]
    _check_loaded(segmodel.segmodel.encoder, os.path.join(upp, "encoder_epoch_40.pth"), "UPP encoder")
    _check_loaded(segmodel.segmodel.decoder, os.path.join(upp, "decoder_epoch_40.pth"), "UPP decoder")
    seglabels = [label for label, _ in segmodel.get_label_and_category_names()[0]]
    renorm = renormalize.renormalizer(dataset, target="zc")
    loader_kw = dict(num_workers=0, pin_memory=False)
    timings, arrays, label_counts = {}, {}, []
    for layer in layers:
        layername = "features." + layer
        resdir = tempfile.mkdtemp(prefix=f"orig-{layer}-", dir=paths["orig_cwd"])
        resfile = mods["pidfile"].exclusive_dirfn(resdir)
        load0, wall0, cpu0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
        model.retain_layer(layername)
        _ = model(dataset[0][0][None, ...])                      # its make_upfn's probe of the data shape
        data_shape = model.retained_layer(layername).shape[2:]
        upfn = upsample.upsampler((56, 56), data_shape=data_shape, source=dataset)

        def compute_samples(batch, *args):
            _ = model(batch)
            acts = model.retained_layer(layername)
            hacts = upfn(acts)
            return hacts.permute(0, 2, 3, 1).contiguous().view(-1, acts.shape[1])

        rq = tally.tally_quantile(compute_samples, dataset, sample_size=images, r=8192,
                                  cachefile=resfile("rq.npz"), **loader_kw)

        def compute_image_max(batch, *args):
            _ = model(batch)
            acts = model.retained_layer(layername)
            return acts.view(acts.shape[0], acts.shape[1], -1).max(2)[0]

        topk = tally.tally_topk(compute_image_max, dataset, sample_size=images, batch_size=50,
                                cachefile=resfile("topk.npz"), **loader_kw)
        level = rq.quantiles(1.0 - QUANTILE)[None, :, None, None]

        def compute_conditional_indicator(batch, *args):
            _ = model(batch)
            seg = segmodel.segment_batch(renorm(batch), downsample=4)
            if layer == layers[0]:
                label_counts.extend(int(torch.unique(s[s > 0]).numel()) for s in seg)
            acts = model.retained_layer(layername)
            return tally.conditional_samples((upfn(acts) > level).float(), seg)

        condi = tally.tally_conditional_mean(compute_conditional_indicator, dataset, sample_size=images,
                                             cachefile=resfile("condi99.npz"), **loader_kw)
        iou = tally.iou_from_conditional_indicator_mean(condi)              # [conditions, units]
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        model.stop_retaining_layers([layername])
        timings[layer] = {"wall": wall, "cpu": cpu, "load_before": load0, "load_after": os.getloadavg()[0]}
        arrays[f"{layer}/thresholds"] = level.reshape(-1).numpy()
        arrays[f"{layer}/iou"] = iou.numpy().T
        arrays[f"{layer}/top_values"] = topk.result()[0].numpy()
        print(f"original {layer}: {wall:.1f} s wall, {cpu:.1f} CPU s", file=sys.stderr, flush=True)
    np.savez(out, **arrays)
    return {"timings": timings, "labels": seglabels, "labels_per_image": float(np.mean(label_counts)),
            "stubbed": mods["stubbed"], "threads": torch.get_num_threads(), "torch": torch.__version__}


# --------------------------------------------------------------------------
# Ours.


def ours_worker(paths: dict, layers: list[str], images: int, batch: int, out: str) -> dict:
    """``jaxdissect.dissect`` of ``layers`` in one call (what launch.dissect runs), no report files."""
    from jaxdissect.models import set_cpu_xla_flags

    set_cpu_xla_flags()
    import jax

    from jaxdissect.checkpoint import load_metadata, load_model
    from jaxdissect.pipelines.dissect import dissect
    from launch import common
    from launch.dissect import make_data, make_segmentation

    module, variables = load_model(paths["vgg"])
    pre = common.model_preprocessing(load_metadata(paths["vgg"]), path=paths["vgg"])
    data, _ = make_data(f"folder:{paths[f'images{images}']}", preprocessing=pre)
    segmentation, _ = make_segmentation(f"upp={paths['upp']},setting={SETTING}")
    load0, wall0, cpu0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    results = dissect(module, variables, list(layers), data, segmentation, quantile=QUANTILE, batch_size=batch,
                      num_images=images, output_dir=None, progress=False)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    arrays = {}
    for layer, r in results.items():
        arrays[f"{layer}/thresholds"] = np.asarray(r.thresholds)
        arrays[f"{layer}/iou"] = np.asarray(r.iou)
        arrays[f"{layer}/top_values"] = np.asarray(r.top_values)
    np.savez(out, **arrays)
    labels = results[layers[0]].label_names
    return {"timings": {"all": {"wall": wall, "cpu": cpu, "load_before": load0, "load_after": os.getloadavg()[0]}},
            "labels": list(labels) if labels is not None else None, "jax": jax.__version__,
            "devices": jax.device_count()}


# --------------------------------------------------------------------------
# Driver.


def run_side(side: str, paths: dict, layers, images: int, batch: int, original: str, workdir: str) -> dict:
    """One side in a fresh subprocess; returns its JSON summary and arrays."""
    tag = f"{side}-{len(layers)}-{images}"
    out_json, out_npz = os.path.join(workdir, tag + ".json"), os.path.join(workdir, tag + ".npz")
    cmd = [sys.executable, "-m", "bench.vs_original", f"--worker={side}", f"--workdir={workdir}",
           f"--worker_layers={','.join(layers)}", f"--images={images}", f"--batch={batch}",
           f"--original={original}", f"--worker_out={out_json}"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAXDISSECT_PROGRESS="0")
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    with open(out_json) as f:
        summary = json.load(f)
    with np.load(out_npz) as z:
        summary["arrays"] = {k: z[k] for k in z.files}
    return summary


def agreement(orig: dict, ours: dict, layer: str) -> dict:
    """Threshold closeness and best-label agreement of one layer (labels matched by name)."""
    t_o, t_j = orig["arrays"][f"{layer}/thresholds"], ours["arrays"][f"{layer}/thresholds"]
    rel = np.abs(t_o - t_j) / np.maximum(np.abs(t_j), 1e-12)
    iou_o, iou_j = orig["arrays"][f"{layer}/iou"], ours["arrays"][f"{layer}/iou"]
    names_o, names_j = orig["labels"], ours["labels"]
    out = {"threshold_median_rel": float(np.median(rel)), "threshold_p90_rel": float(np.quantile(rel, 0.9))}
    if names_j is None:
        return out
    index_j = {n: i for i, n in enumerate(names_j) if i > 0}
    cols = [(i, index_j[n]) for i, n in enumerate(names_o[:iou_o.shape[1]]) if i > 0 and n in index_j]
    if not cols:
        return out
    a = np.nan_to_num(iou_o[:, [c for c, _ in cols]])
    b = iou_j[:, [c for _, c in cols]]
    out.update(matched_labels=len(cols), best_label_same=float(np.mean(a.argmax(1) == b.argmax(1))),
               best_iou_median_abs=float(np.median(np.abs(a.max(1) - b.max(1)))),
               best_iou_median=float(np.median(b.max(1))))
    return out


def marginal(big: dict, small: dict) -> dict:
    """Each side's wall and CPU seconds per extra image between two runs of one case."""
    extra = big["images"] - small["images"]
    return {"extra": extra, **{side: {k: (big[f"{side}_total"][k] - small[f"{side}_total"][k]) / extra
                                      for k in ("wall", "cpu")} for side in ("orig", "ours")}}


def _ratios(orig: dict, ours: dict, goal: float) -> str:
    """Table cells: wall and CPU ratio of the original's seconds to ours, and whether each meets ``goal``."""
    ratio, cratio = orig["wall"] / ours["wall"], orig["cpu"] / ours["cpu"]
    return (f"{ratio:.2f}x | {cratio:.2f}x | {goal:g}x: {'yes' if ratio >= goal else 'NO'} / "
            f"{'yes' if cratio >= goal else 'NO'}")


def report(meta: dict, a: dict | None, b: dict | None, small: dict | None = None) -> str:
    lines = [SECTION, "",
             f"Measured {meta['date']} on {meta['machine']}, {meta['cpus']} CPUs ({meta['note']}); "
             f"torch {meta.get('torch', '?')} ({meta.get('threads', '?')} threads), jax {meta.get('jax', '?')} "
             f"({meta.get('devices', '?')} CPU device(s)). `python -m bench.vs_original {meta['argv']}`. "
             f"Same synthetic 256x256 JPEGs and the same random weights on both sides (VGG16; UPP segmenter "
             f"{UPP_SIZES['n_object']} objects, {UPP_SIZES['n_material']} materials, setting {SETTING}, about "
             f"{meta.get('labels_per_image', float('nan')):.0f} labels per image); model and segmenter loading "
             "not timed, image and HTML writing left out on both sides, JAX compilation timed. Original: its "
             "own netdissect code, `num_workers=0`, `.cuda()` a no-op, PrRoI pooling from bench/prroi_torch.py"
             + (f", stand-ins for {', '.join(meta['stubbed'])}" if meta.get("stubbed") else "") + ".", "",
             "| case | images | layers | original wall s | original CPU s | ours wall s | ours CPU s | "
             "ratio (wall) | ratio (CPU) | goal met (wall / CPU) | load avg before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    small = small or {}
    cases = (("A: conv5_3", a, 1.5), ("B: 13 conv layers", b, 10.0))
    for name, case, goal in cases:
        if case is None:
            continue
        # Each case all in at both sizes: our fixed costs (compiling) weigh less as the run grows.
        for run in (small.get(name[0].lower()), case):
            if run is None:
                continue
            o, j = run["orig_total"], run["ours_total"]
            est = " (est.)" if run["estimated"] else ""
            lines.append(f"| {name} | {run['images']} | {run['layers']} | {o['wall']:.1f}{est} | "
                         f"{o['cpu']:.1f}{est} | {j['wall']:.1f} | {j['cpu']:.1f} | {_ratios(o, j, goal)} | "
                         f"{run['load']} |")
        if case["estimated"]:
            ran = ", ".join(f"{k} {v['wall']:.1f} s" for k, v in case["orig_layers"].items())
            notes.append(f"- Case B original: {len(case['orig_layers'])} of 13 layers run directly ({ran}); the "
                         f"other {13 - len(case['orig_layers'])} are ESTIMATED as the mean of those (wall and CPU).")
        elif case["layers"] > 1:
            ran = ", ".join(f"{k} {v['wall']:.0f}" for k, v in case["orig_layers"].items())
            notes.append(f"- Case B original, seconds per layer run: {ran}.")
        for layer, agr in case["agreement"].items():
            s = (f"- Agreement {name.split(':')[0]} `{layer}`: thresholds median relative difference "
                 f"{agr['threshold_median_rel']:.2%} (90th percentile {agr['threshold_p90_rel']:.2%}; the original's "
                 "are KLL sketch estimates, ours exact)")
            if "best_label_same" in agr:
                s += (f"; same best label for {agr['best_label_same']:.0%} of units over {agr['matched_labels']} "
                      f"labels matched by name, best IoU median absolute difference {agr['best_iou_median_abs']:.4f} "
                      f"(median best IoU {agr['best_iou_median']:.3f})")
            notes.append(s + ".")
    if small:
        lines += ["", "Cost per extra image (the difference between the two runs of each case above; compilation "
                  "and set-up cancel out):", "",
                  "| case | extra images | original wall s / image | ours wall s / image | ratio (wall) | "
                  "ratio (CPU) | goal met (wall / CPU) |", "|---|---|---|---|---|---|---|"]
        for name, big, goal in cases:
            key = name[0].lower()
            if big is None or key not in small:
                continue
            m = marginal(big, small[key])
            est = " (est.)" if big["estimated"] else ""
            lines.append(f"| {name} | {m['extra']} | {m['orig']['wall']:.2f}{est} | {m['ours']['wall']:.2f} | "
                         f"{_ratios(m['orig'], m['ours'], goal)} |")
    return "\n".join(lines + [""] + notes) + "\n"


def case(paths, original, ours_layers, orig_layers, images, batch, workdir, reuse=None) -> tuple[dict, dict]:
    """Both sides over ``images``; ``reuse``: an earlier original run on the same images (its layers not rerun)."""
    load = os.getloadavg()[0]
    todo = [x for x in orig_layers if not (reuse and x in reuse["timings"])]
    o = run_side("original", paths, todo, images, batch, original, workdir)
    if reuse:
        o["timings"] = {x: (o["timings"].get(x) or reuse["timings"][x]) for x in orig_layers}
        o["arrays"] = {**reuse["arrays"], **o["arrays"]}
    j = run_side("ours", paths, ours_layers, images, batch, original, workdir)
    per = o["timings"]
    total = {k: sum(v[k] for v in per.values()) for k in ("wall", "cpu")}
    estimated = len(orig_layers) < len(ours_layers)
    if estimated:
        total = {k: v / len(per) * len(ours_layers) for k, v in total.items()}
    agree_layers = [layer for layer in ("conv5_3", "conv3_3", "conv1_1") if layer in per]
    out = {"images": images, "layers": len(ours_layers), "orig_total": total, "ours_total": j["timings"]["all"],
           "orig_layers": per, "estimated": estimated,
           "load": f"{load:.1f} / {os.getloadavg()[0]:.1f}",
           "agreement": {layer: agreement(o, j, layer) for layer in agree_layers}}
    return out, {"torch": o["torch"], "threads": o["threads"], "stubbed": o["stubbed"], "jax": j["jax"],
                 "devices": j["devices"], "labels_per_image": o["labels_per_image"], "original_run": o}


def main(argv):
    del argv
    F = flags.FLAGS
    if not F.worker and not F.original:
        raise SystemExit("error: --original=PATH is required: a local checkout of davidbau/dissect")
    orig_layers = list(VGG_CONV_LAYERS) if F.layers_b == "all" else F.layers_b.split(",")
    if not F.worker and (set(orig_layers) - set(VGG_CONV_LAYERS) or len(set(orig_layers)) < 2):
        raise SystemExit(f"error: --layers_b={F.layers_b}: give 'all' or at least 2 of {', '.join(VGG_CONV_LAYERS)}")
    workdir = F.workdir or tempfile.mkdtemp(prefix="vs_original-")
    if not F.worker and F.images_small and F.images_small >= min(F.images, F.images_b):
        raise SystemExit(f"error: --images_small={F.images_small} must be below --images and --images_b")
    counts = sorted({F.images, F.images_b} | ({F.images_small} if F.images_small else set()))
    paths = prepare(workdir, counts) if not F.worker else None
    if F.worker:
        with open(os.path.join(workdir, "paths.json")) as f:
            paths = json.load(f)
        layers = F.worker_layers.split(",")
        npz = F.worker_out[:-len(".json")] + ".npz"
        if F.worker == "original":
            summary = original_worker(paths, F.original, layers, F.images, npz)
        else:
            summary = ours_worker(paths, layers, F.images, F.batch, npz)
        with open(F.worker_out, "w") as f:
            json.dump(summary, f)
        return
    try:
        drive(F, paths, workdir, orig_layers)
    finally:
        if not F.workdir:   # our own temporary directory: about 1.3 GB of weights and conversions
            shutil.rmtree(workdir, ignore_errors=True)


def drive(F, paths: dict, workdir: str, orig_layers: list[str]) -> None:
    """Run the cases and write the report."""
    from bench.results import load_note

    with open(os.path.join(workdir, "paths.json"), "w") as f:
        json.dump(paths, f)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "cpus": os.cpu_count(), "argv": " ".join(sys.argv[1:]),
            "note": load_note(os.getloadavg()[0])}
    a = b = None
    if F.cases in ("a", "both"):
        a, m = case(paths, F.original, ["conv5_3"], ["conv5_3"], F.images, F.batch, workdir)
        meta.update(m)
        print(json.dumps({k: v for k, v in a.items()}, default=str, indent=1))
        if F.results:   # case A's figures are kept even if case B fails
            from bench.results import write_section

            write_section(F.results, SECTION, report(meta, a, None))
    if F.cases in ("b", "both"):
        reuse = meta.get("original_run") if a is not None and F.images_b == F.images else None
        b, m = case(paths, F.original, list(VGG_CONV_LAYERS), orig_layers, F.images_b, F.batch, workdir, reuse)
        meta.update(m)
        print(json.dumps({k: v for k, v in b.items()}, default=str, indent=1))
    small = {}
    if F.images_small:
        reuse = None    # the original's small conv5_3 run of case A counts for case B too, as above
        if a is not None:
            small["a"], m = case(paths, F.original, ["conv5_3"], ["conv5_3"], F.images_small, F.batch, workdir)
            reuse = m["original_run"]
        if b is not None:
            small["b"], _ = case(paths, F.original, list(VGG_CONV_LAYERS), orig_layers, F.images_small, F.batch,
                                 workdir, reuse)
        small["images"] = F.images_small
    body = report(meta, a, b, small)
    print(body)
    if F.results:
        from bench.results import write_section

        write_section(F.results, SECTION, body)


def define_flags() -> None:
    flags.DEFINE_string("original", "", "Local checkout of davidbau/dissect (nothing is fetched).")
    flags.DEFINE_integer("images", 24, "Images of case A (one layer).")
    flags.DEFINE_integer("images_b", 24, "Images of case B (13 layers; equal to --images, the original's "
                         "conv5_3 run of case A counts for case B too).")
    flags.DEFINE_string("layers_b", "conv1_1,conv5_3", "Layers the ORIGINAL runs in case B ('all' or a comma list of at "
                        "least 2; the rest are estimated from them and reported as estimates).")
    flags.DEFINE_integer("images_small", 0, "Also run the cases over this many images (fewer than --images and "
                         "--images_b) and report each side's cost per extra image; 0 = off.")
    flags.DEFINE_enum("cases", "both", ["a", "b", "both"], "Which cases to run.")
    flags.DEFINE_integer("batch", 8, "Our batch size.")
    flags.DEFINE_string("workdir", "", "Where images, weights and conversions go (default: a new temp dir).")
    flags.DEFINE_string("results", "", "Results file to write the section into (e.g. bench/RESULTS.md).")
    flags.DEFINE_string("worker", "", "Internal: run one side ('original' or 'ours').")
    flags.DEFINE_string("worker_layers", "", "Internal: layers of a worker run.")
    flags.DEFINE_string("worker_out", "", "Internal: a worker's JSON output.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
