"""The embedded demo: what every launcher runs with no flags, made once per user in the cache.

Nothing is downloaded. The pieces, each built at most once across processes
(``jaxdissect.fileio.build_once``: a second run started meanwhile waits for the
first, then uses what it made) under the per-user cache directory
(:func:`jaxdissect.fileio.default_cache_dir`, or the launchers' ``--cache_dir``):

* :func:`model_dir`: the small CNN trained on the synthetic scenes
  (:mod:`jaxdissect.pipelines.train_synthetic`; its ``model.json`` names its
  classes and preprocessing), the classifier of every classifier launcher;
* :func:`scenes` / :func:`training_scenes`: its data, the synthetic scenes with
  known labels (seed 0 for experiments, the training seed for rankings);
* :func:`scene_folder`, :func:`restyled_folder`, :func:`painting_folder`: the
  scenes as class folders of PNG files, the same scenes with other textures
  and colours (a stylized copy: same shapes), and abstract "paintings";
* :func:`planted_adain`: AdaIN weights set by hand (no trained ones ship): its
  features are each 8x8 block's colour range, so AdaIN hands the content's
  layout the painting's colour statistics; it shows the pipeline, not brushwork;
* :func:`ablation_ranking`: the demo model's units ranked per class (the
  classifier ablation experiment), which the adversarial analysis needs;
* :func:`toy_dissection` and :func:`toy_segmenter`: the planted toy generator's
  dissection and its colour "segmenter", for the generator launchers.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

LAYER = "conv4"          # the demo model's top conv layer: object detectors
CLASS = "kitchen"        # a scene class (disc + square)
FOLDER_IMAGES = 64       # scenes written as files (stylize, shape bias)
FOLDER_SIZE = 128        # their size in pixels
PAINTINGS = 8
COMPARE_DATA = "synthetic:256"


def _quiet(message: str) -> None:
    del message


def model(cache_dir: str, log: Callable[[str], None] | None = print):
    """``(module, variables, info)`` of the demo classifier, trained on first use (about two minutes)."""
    from jaxdissect.pipelines import train_synthetic

    return train_synthetic.train_or_load(cache_dir, log=log)


def model_dir(cache_dir: str, log: Callable[[str], None] | None = print) -> str:
    """The demo classifier's model directory (``jaxdissect.load_model`` reads it), trained on first use."""
    from jaxdissect.pipelines import train_synthetic

    path = train_synthetic.model_path(cache_dir)
    if not os.path.exists(os.path.join(path, "model.json")):
        model(cache_dir, log)
    return path


def scenes(n: int, size: int = 64):
    """``n`` synthetic scenes of seed 0 (the dissection default, disjoint from the model's training scenes)."""
    from jaxdissect.data.synthetic import SyntheticScenes

    return SyntheticScenes(n, seed=0, size=size)


def training_scenes(n: int):
    """``n`` of the scenes the demo model was trained on (units are ranked on training data, as in the paper)."""
    from jaxdissect.data.synthetic import SyntheticScenes
    from jaxdissect.pipelines.train_synthetic import TRAIN_SEED

    return SyntheticScenes(n, seed=TRAIN_SEED)


def _save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)


def _write_scenes(root: str, n: int, size: int, image_of: Callable[[int, dict], tuple[str, np.ndarray]]) -> None:
    source = scenes(n, size)
    for start in range(0, n, 16):
        idx = list(range(start, min(start + 16, n)))
        batch = source.get_batch(idx)
        batch["objects"] = source.pixel_labels(idx)[:, 0] > 0
        for j, i in enumerate(idx):
            name, image = image_of(i, {k: v[j] for k, v in batch.items()})
            _save_png(os.path.join(root, source.class_names[int(batch["label"][j])], name), image)


def scene_folder(cache_dir: str, n: int = FOLDER_IMAGES, size: int = FOLDER_SIZE) -> str:
    """``n`` scenes as ``<class>/<i>.png`` (a ``places:`` layout), built once in the cache; returns the folder."""
    from jaxdissect import fileio

    def build(tmp: str) -> None:
        _write_scenes(tmp, n, size, lambda i, b: (f"{i:04d}.png", b["display"]))

    return fileio.build_once(os.path.join(cache_dir, f"demo-scenes-{n}-{size}"), build,
                             what="the demo scene images", log=_quiet)


def painting(k: int, size: int = FOLDER_SIZE) -> np.ndarray:
    """Abstract painting ``k``: uint8 ``[size, size, 3]``, two palettes blended by waves, brush-like stripes."""
    rng = np.random.default_rng([7, k])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    palette = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    blend = np.zeros((size, size), np.float32)
    for _ in range(3):
        fy, fx, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        blend += np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    blend = 0.5 + 0.5 * np.tanh(blend)
    angle = rng.uniform(0, np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(8, 20) * (np.cos(angle) * xx + np.sin(angle) * yy))
    image = (blend[..., None] * palette[0] + (1 - blend[..., None]) * palette[1]) * (0.7 + 0.3 * stripes[..., None])
    image = np.where(stripes[..., None] > 0.93, palette[2], image)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def painting_folder(cache_dir: str, n: int = PAINTINGS, size: int = FOLDER_SIZE) -> str:
    """``n`` abstract paintings ``painting-<k>.png`` (the demo's style folder), built once in the cache."""
    from jaxdissect import fileio

    def build(tmp: str) -> None:
        for k in range(n):
            _save_png(os.path.join(tmp, f"painting-{k}.png"), painting(k, size))

    return fileio.build_once(os.path.join(cache_dir, f"demo-paintings-{n}-{size}"), build,
                             what="the demo paintings", log=_quiet)


def restyled_folder(cache_dir: str, n: int = FOLDER_IMAGES, size: int = FOLDER_SIZE) -> str:
    """The scenes of :func:`scene_folder` with the textures and colours of a painting: same shapes, other style.

    Objects take painting ``k``'s pixels brightened, the background painting
    ``k + 1``'s darkened, so only the shapes are shared with the original;
    files are ``<class>/<i>-stylized-painting-<k>.png`` as ``launch.stylize``
    names them, so ``launch.shape_bias`` pairs them with the originals.
    """
    from jaxdissect import fileio

    def image_of(i, batch):
        k = i % PAINTINGS
        inside = batch["objects"][..., None]
        objects = 80 + 0.7 * painting(k, size).astype(np.float32)
        background = 0.45 * painting((k + 1) % PAINTINGS, size).astype(np.float32)
        return f"{i:04d}-stylized-painting-{k}.png", np.clip(np.where(inside, objects, background), 0, 255)

    def build(tmp: str) -> None:
        _write_scenes(tmp, n, size, image_of)

    return fileio.build_once(os.path.join(cache_dir, f"demo-restyled-{n}-{size}"), build,
                             what="the demo's restyled scenes", log=_quiet)


def planted_adain():
    """``(AdaIN module, variables)`` whose features are each 8x8 block's colour range (see the module docstring).

    Encoder: channels 0-2 carry the RGB values, 3-5 one minus them, through
    every conv (centre taps); the three max pools leave each block's maximum
    and one minus its minimum. Decoder: their midpoint, upsampled and smoothed
    with ``[1, 2, 1] / 4`` kernels after each nearest-neighbour upsampling.
    """
    import jax
    import jax.numpy as jnp

    from jaxdissect.models.adain import AdaIN

    module = AdaIN()
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)))
    smooth = np.outer([0.25, 0.5, 0.25], [0.25, 0.5, 0.25])

    def weights(name, kernel_shape):
        kernel = np.zeros(kernel_shape, np.float32)
        bias = np.zeros(kernel_shape[-1], np.float32)
        k = kernel_shape[0] // 2
        if name == "conv0":
            kernel[0, 0, :3, :3] = np.eye(3)
        elif name == "conv1_1":
            for c in range(3):
                kernel[k, k, c, c], kernel[k, k, c, 3 + c], bias[3 + c] = 1.0, -1.0, 1.0
        elif name.startswith("conv"):
            kernel[k, k, :6, :6] = np.eye(6)
        elif name == "dec4_1":
            for c in range(3):
                kernel[k, k, c, c], kernel[k, k, 3 + c, c], bias[c] = 0.5, -0.5, 0.5
        elif name in ("dec3_4", "dec2_2", "dec1_2"):
            for c in range(3):
                kernel[:, :, c, c] = smooth
        else:
            kernel[k, k, :3, :3] = np.eye(3)
        return {"kernel": kernel, "bias": bias}

    params = {part: {name: weights(name, leaf["kernel"].shape) for name, leaf in layers.items()}
              for part, layers in shapes["params"].items()}
    return module, {"params": params}


def toy_dissection(cache_dir: str, layer: str | None = None) -> str:
    """The planted toy generator's dissection of ``layer`` (default its edit layer), built once in the cache."""
    from jaxdissect import fileio, progress
    from jaxdissect.models import toy_generator as toy
    from jaxdissect.pipelines.toy import dissect_toy

    layer = layer or toy.EDIT_LAYER
    name = "ganpaint-toy-dissection" if layer == toy.EDIT_LAYER else f"toy-dissection-{layer}"
    target = os.path.join(cache_dir, name)
    if os.path.isdir(target) and not os.path.exists(os.path.join(target, layer, "arrays.npz")):
        dissect_toy(target, layer, progress=progress.enabled())  # a cache of an older version: resume it
        return target
    return fileio.build_once(target, lambda tmp: dissect_toy(tmp, layer, progress=progress.enabled()),
                             what=f"the toy generator's dissection of {layer}")


def toy_segmenter():
    """``(segmenter, variables)``: the toy generator's colour labels as a segmenter (``label_names``, ``apply``)."""
    import flax.linen as nn

    from jaxdissect.models import toy_generator as toy

    class ToyColourSegmenter(nn.Module):
        label_names = list(toy.LABEL_NAMES)
        label_categories = list(toy.LABEL_CATEGORIES)
        categories = list(toy.CATEGORIES)

        def __call__(self, images, downsample: int = 4):
            return toy.color_segment(images, downsample)

    return ToyColourSegmenter(), {}


def ablation_ranking(cache_dir: str, layer: str = LAYER, log: Callable[[str], None] | None = print) -> str:
    """The demo model's units of ``layer`` ranked per class (``results.npz`` ``order``), built once in the cache.

    The output directory of the classifier ablation experiment
    (``jaxdissect.pipelines.ablate_classifier``) on 256 training scenes (ranking)
    and 128 others (evaluation), as ``launch.adversarial --ablation`` reads it.
    """
    from jaxdissect import fileio
    from jaxdissect.pipelines.ablate_classifier import classifier_ablation_experiment

    path = model_dir(cache_dir, log)
    module, variables, info = model(cache_dir, log=None)

    def build(tmp: str) -> None:
        classifier_ablation_experiment(module, variables, layer, scenes(128), training_scenes(256), tmp,
                                       class_names=info["classes"], sizes=(1, 4), batch_size=64)

    return fileio.build_once(os.path.join(cache_dir, f"demo-ablation-{os.path.basename(path)}-{layer}"), build,
                             what=f"the demo model's unit ranking of {layer}", log=log or _quiet)


__all__ = ["CLASS", "COMPARE_DATA", "LAYER", "ablation_ranking", "model", "model_dir", "painting",
           "painting_folder", "planted_adain", "restyled_folder", "scene_folder", "scenes", "toy_dissection",
           "toy_segmenter", "training_scenes"]
