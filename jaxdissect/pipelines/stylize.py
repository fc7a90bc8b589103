"""A stylized copy of an image folder (Stylized Places, spec 3.5): every image in a painting's style.

Each content image (kept at its own size) is paired with one painting from a
style folder (resized so its shorter side is ``style_size``), stylized with
AdaIN (``jaxdissect.models.adain``, alpha 1 by default) and written as
``<output>/<same sub-folder>/<content stem>-stylized-<style stem><content ext>``,
rounded as torchvision's ``save_image``.

Pairing is deterministic: ``numpy.random.default_rng(seed)`` draws one style
index per content image, over both folders' sorted file lists, so a rerun
(or a resumed run) gives the same pairs. The original seeded Python's
``random`` with ``zlib.alder32(output_dir)``, a typo for ``adler32`` (and it
would need bytes), so its script fails as written; that quirk is not
reproduced. Existing outputs are kept, so an interrupted run resumes where
it stopped (each file is written under a temporary name and renamed).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxdissect import fileio
from jaxdissect.data.folders import DataSourceError, open_rgb, list_image_files


def pair_styles(num_contents: int, num_styles: int, seed: int) -> np.ndarray:
    """Style index for each content index, from ``seed``."""
    if num_styles < 1:
        raise DataSourceError("the style folder has no images")
    return np.random.default_rng(seed).integers(0, num_styles, size=num_contents)


def _resize_shorter(image, size: int):
    from PIL import Image

    if not size:
        return image
    w, h = image.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return image.resize((nw, nh), Image.BILINEAR)


def output_name(content_root: str, output_root: str, content: str, style: str) -> str:
    rel = os.path.relpath(content, content_root)
    folder, name = os.path.split(rel)
    stem, ext = os.path.splitext(name)
    return os.path.join(output_root, folder, f"{stem}-stylized-{os.path.splitext(os.path.basename(style))[0]}{ext}")


def stylize_folder(module, variables, content_root: str, style_root: str, output_root: str, *, seed: int = 0,
                   style_size: int = 256, content_size: int = 0, alpha: float = 1.0,
                   num_images: int | None = None) -> dict:
    """Stylize every image under ``content_root``; returns counts ``{"written", "kept", "total"}``."""
    from PIL import Image

    from jaxdissect.models.adain import to_uint8
    from jaxdissect.progress import progress

    if not 0.0 <= alpha <= 1.0:
        raise DataSourceError(f"alpha={alpha} must be in [0, 1]")
    contents = list_image_files(content_root)[:num_images]
    styles = list_image_files(style_root)
    if os.path.abspath(output_root) in (os.path.abspath(content_root), os.path.abspath(style_root)):
        raise DataSourceError(f"--output {output_root} must differ from the content and style folders")
    choice = pair_styles(len(contents), len(styles), seed)
    encode = jax.jit(lambda v, x: module.apply(v, x, method=module.encode))
    decode = jax.jit(lambda v, c, s, a: module.apply(v, c, s, a, method=module.stylize_features))
    written = kept = 0
    bar = progress(total=len(contents), desc="stylizing", unit="img")
    for content, k in zip(contents, choice):
        style = styles[int(k)]
        out = output_name(content_root, output_root, content, style)
        if os.path.exists(out):
            kept += 1
            bar.update(1)
            continue
        c = np.asarray(_resize_shorter(open_rgb(content), content_size), np.float32)[None] / 255.0
        s = np.asarray(_resize_shorter(open_rgb(style), style_size), np.float32)[None] / 255.0
        image = to_uint8(decode(variables, encode(variables, c), encode(variables, s), np.float32(alpha))[0])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with fileio.atomic_file(out) as f:
            Image.fromarray(image).save(f, format=Image.registered_extensions()[os.path.splitext(out)[1].lower()])
        written += 1
        bar.update(1)
    bar.close()
    return {"written": written, "kept": kept, "total": len(contents)}
