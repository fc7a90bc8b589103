r"""Smoke-check a converted model: load it, run a small sample, print what every named layer produced.

    python -m launch.check_model --model=vgg16_places365 [--image=a.jpg --image=b.jpg]
    python -m launch.check_model --model=proggan_church --num_samples=8 --output=grid.png

With no ``--model`` it checks the embedded demo CNN (trained once on synthetic
scenes, cached in ``--cache_dir``; nothing is downloaded)::

    python -m launch.check_model

Classifiers run on ``--image`` files (read with the model's own preprocessing
from its model.json) or, without them, on a deterministic synthetic batch, and
print logit statistics and the top-5 classes (by the names in model.json). Generators (ProGAN) run on the original's z's
(``standard_z_sample``, seed 1), print per-channel image statistics and write
a PNG grid. Both print shape, mean and max of every named layer's output, and
fail clearly if any output is not finite.
"""

from __future__ import annotations

import math

import numpy as np
from absl import flags

from launch import common


def _stats_line(name: str, a) -> str:
    a = np.asarray(a, np.float32)
    return f"  {name:<16s} {str(tuple(a.shape)):<22s} mean {a.mean():+.4g}  max {a.max():+.4g}"


def _synthetic_images(n: int, size: int, normalization: str = "imagenet") -> np.ndarray:
    """Deterministic smooth colour fields plus noise in [0, 1], in the model's ``normalization`` (NHWC)."""
    from jaxdissect.preprocess import renormalize

    rng = np.random.RandomState(0)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(0.5, 4, 3)
        base = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * (xx + yy))], -1)
        images.append(np.clip(0.5 + 0.4 * base + 0.05 * rng.standard_normal(base.shape), 0, 1))
    return renormalize(np.asarray(images, np.float32), "pt", normalization)


def save_grid(images_uint8: np.ndarray, path: str) -> None:
    """Tile ``[N, H, W, 3]`` bytes into a near-square grid image (format from the extension, PNG by default)."""
    import io
    import os

    from PIL import Image

    from jaxdissect import fileio

    n, h, w, _ = images_uint8.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, img in enumerate(images_uint8):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format=Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG"))
    fileio.write_bytes(path, buf.getvalue())


def check(checkpoint: str, num_samples: int = 8, images=(), output: str | None = None, log=print) -> dict:
    """Run the checks; returns ``{'output': final output, 'layers': {name: activation}}`` (NumPy)."""
    import jax

    from jaxdissect.checkpoint import load_metadata, load_model
    from jaxdissect.data.latents import standard_z_sample
    from jaxdissect.models import ProgressiveGenerator
    from jaxdissect.data.folders import transform_for
    from jaxdissect.preprocess import renormalize

    module, variables = load_model(checkpoint)
    meta = load_metadata(checkpoint)
    generator = isinstance(module, ProgressiveGenerator)
    if not generator and "crop" not in meta.get("preprocessing", {}):
        raise ValueError(
            f"check_model runs image classifiers (with a 'preprocessing' crop in their metadata) and "
            f"ProgressiveGenerator models; {checkpoint} holds a {type(module).__name__}"
        )
    log(f"{checkpoint}: {type(module).__name__} from {meta.get('source_file', '?')} "
        f"(sha256 {str(meta.get('source_sha256', '?'))[:12]})")
    if generator:
        if images:
            raise ValueError("--image is for classifiers; a generator takes z samples (use --num_samples)")
        x = standard_z_sample(num_samples, depth=module.sizes[0], seed=1)
        log(f"input: {num_samples} z from standard_z_sample(seed=1), shape {x.shape}")
    elif images:
        from PIL import Image

        transform = transform_for(meta["preprocessing"])  # the model's own input pipeline (model.json)

        def read(path):
            try:
                with Image.open(path) as f:
                    return transform(f.convert("RGB"))[0]
            except OSError as e:
                raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}; give a readable "
                                 ".jpg/.png file") from e

        x = np.stack([read(p) for p in images])
        log(f"input: {len(images)} image(s), preprocessed to {x.shape}")
    else:
        x = _synthetic_images(num_samples, int(meta["preprocessing"]["crop"]),
                              meta["preprocessing"].get("normalization", "imagenet"))
        log(f"input: {num_samples} deterministic synthetic images {x.shape}")

    f = jax.jit(lambda v, x: module.apply(v, x, capture_intermediates=True, mutable=["intermediates"]))
    out, state = f(variables, x)
    out = np.asarray(out, np.float32)
    inter = state["intermediates"]
    order = getattr(module, "layers", None) or [k for k in inter if k != "__call__"]
    layers = {name: np.asarray(inter[name]["__call__"][0]) for name in order if name in inter}
    log("layers (output of each named submodule):")
    for name, a in layers.items():
        log(_stats_line(name, a))
    bad = [name for name, a in layers.items() if not np.all(np.isfinite(a))]
    if bad or not np.all(np.isfinite(out)):
        raise FloatingPointError(
            f"non-finite values in the output of {bad or ['the model']}: the checkpoint's weights are "
            "damaged or the input is wrong; convert the original file again"
        )

    if generator:
        log("image (zc, nominally [-1, 1]) per channel:")
        for c, ch in enumerate("RGB"):
            v = out[..., c]
            log(f"  {ch}: mean {v.mean():+.4f}  std {v.std():.4f}  min {v.min():+.4f}  max {v.max():+.4f}")
        if output:
            save_grid(renormalize(out, "zc", "byte"), output)
            log(f"wrote {output}")
    else:
        log(f"logits {out.shape}: mean {out.mean():+.4f}  std {out.std():.4f}  "
            f"min {out.min():+.4f}  max {out.max():+.4f}")
        p = np.exp(out - out.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        names = meta.get("classes") or []
        if len(names) != out.shape[-1]:
            names = [str(k) for k in range(out.shape[-1])]   # no (or mismatched) names: output numbers
        for i, row in enumerate(p):
            top = np.argsort(-row)[:5]
            log(f"  sample {i}: top-5 classes " + ", ".join(f"{names[k]} ({row[k]:.3f})" for k in top))
        if output:
            save_grid(renormalize(x, meta["preprocessing"].get("normalization", "imagenet"), "byte"), output)
            log(f"wrote {output} (the inputs)")
    return {"output": out, "layers": layers}


def define_flags() -> None:
    """Command-line flags (defined only when run as a script, so importing this module is side-effect free)."""
    common.define_model_flag("Converted model directory (python -m converters.<model> ...); absent: the demo CNN.")
    flags.DEFINE_integer("num_samples", 8, "Number of z samples (generators) or synthetic images (classifiers).")
    flags.DEFINE_multi_string("image", [], "Image file(s) for a classifier; repeat the flag for several.")
    common.define_output_path_flag("output", "file", "PNG grid of the generated (or input) images; '' to skip.",
                                   default="grid.png")
    common.define_cache_dir_flag()


def main(argv):
    del argv
    f = flags.FLAGS
    common.positive("num_samples", f.num_samples, allow_none=False)
    model = f.model
    if model is None:
        from jaxdissect.pipelines import demo

        model = demo.model_dir(common.cache_dir(f.cache_dir), log=common.log)
    check(model, f.num_samples, f.image, f.output or None)


if __name__ == "__main__":
    define_flags()
    common.run(main, extra_errors=(ValueError, FloatingPointError))
