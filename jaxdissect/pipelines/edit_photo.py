"""Edit a photo with a GAN prior: invert, adapt, paint/erase concepts, save what each step made.

The GANPaint Studio flow (gan-editing.md 2.4): the photo is inverted into the
generator's edit layer (:func:`jaxdissect.editing.invert`), the generator is
adapted to the photo (:func:`jaxdissect.editing.adapt`, no mask: one fit
serves every later edit), then the strokes are applied to the inverted
representation through the adapted generator, whose maps are switched off
inside the edited region. Outputs in ``output_dir``: ``input.png``,
``inversion.png``, ``adapted.png``, ``edit.png``, ``side_by_side.png`` (the
four in a row, titled, small images enlarged), ``losses.npz`` (loss curves) and ``summary.json`` (PSNRs,
strokes, settings).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from jaxdissect import fileio
from jaxdissect.editing import Brushes, EditError, Stroke, adapt, apply_strokes, invert
from jaxdissect.errors import JaxDissectError
from jaxdissect.preprocess import zc_to_uint8


class PhotoEditError(JaxDissectError, ValueError):
    """The photo, a stroke or a setting cannot be used; the message says what to do."""


def load_photo(path: str, size: int) -> np.ndarray:
    """An image file -> ``[1, size, size, 3]`` in [-1, 1]: shorter side resized to ``size``, centre crop."""
    from PIL import Image

    if not os.path.exists(path):
        raise PhotoEditError(f"photo {path} does not exist")
    try:
        img = Image.open(path).convert("RGB")
    except Exception as e:
        raise PhotoEditError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from e
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return (np.asarray(img, np.float32) / 127.5 - 1.0)[None]


def _png_bytes(image_uint8: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image_uint8, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str, image) -> None:
    """``image`` in [-1, 1] as a PNG file (written atomically)."""
    from jaxdissect import fileio

    fileio.write_bytes(path, _png_bytes(zc_to_uint8(image)))


SIDE_BY_SIDE_PANEL = 192   # panels are enlarged (nearest, whole factors) to at least this many pixels


def side_by_side(panels: dict, min_size: int = SIDE_BY_SIDE_PANEL) -> np.ndarray:
    """uint8 ``[H, W, 3]``: the ``{title: image in [-1, 1]}`` panels in a row, each under its title.

    Small images (the toy's 32 pixels) are enlarged by a whole factor with
    nearest neighbours, so every pixel stays visible; white gaps separate them.
    """
    from PIL import Image, ImageDraw, ImageFont

    images = [zc_to_uint8(img) for img in panels.values()]
    h, w = images[0].shape[:2]
    scale = max(1, -(-min_size // max(h, w)))
    font = ImageFont.load_default()
    band = 8 + int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag", font=font)[3])
    gap = max(8, w * scale // 32)
    canvas = Image.new("RGB", (len(images) * (w * scale + gap) - gap, band + h * scale), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, img) in enumerate(zip(panels, images)):
        x = i * (w * scale + gap)
        canvas.paste(Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST), (x, band))
        text_w = draw.textbbox((0, 0), title, font=font)[2]
        draw.text((x + max(0, (w * scale - text_w) // 2), 4), title, fill="black", font=font)
    return np.asarray(canvas)


def parse_stroke(spec: str, size: int, *, erase: bool, strength) -> Stroke:
    """``concept:x0,y0,x1,y1`` (a box in pixels of the cropped image, x1/y1 exclusive) or ``concept:mask.png``."""
    concept, sep, where = spec.partition(":")
    flag = "--erase" if erase else "--paint"
    if not sep or not concept or not where:
        raise PhotoEditError(f"{flag}={spec!r}: expected concept:x0,y0,x1,y1 or concept:mask.png")
    box = re.fullmatch(r"\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*", where)
    if box:
        x0, y0, x1, y1 = (int(v) for v in box.groups())
        if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
            raise PhotoEditError(f"{flag}={spec!r}: the box must satisfy 0 <= x0 < x1 <= {size} and "
                                 f"0 <= y0 < y1 <= {size} (pixels of the {size}x{size} cropped photo)")
        mask = np.zeros((size, size), np.float32)
        mask[y0:y1, x0:x1] = 1
    else:
        from PIL import Image

        if not os.path.exists(where):
            raise PhotoEditError(f"{flag}={spec!r}: {where} is neither a box x0,y0,x1,y1 nor an existing mask file")
        img = Image.open(where)
        if img.mode in ("RGBA", "LA") or "transparency" in img.info:
            mask = np.asarray(img.convert("RGBA"), np.float32)[..., 3] / 255.0  # painted = non-transparent
        else:
            mask = np.asarray(img.convert("L"), np.float32) / 255.0  # painted = white
        if not mask.any():
            raise PhotoEditError(f"{flag}={spec!r}: the mask {where} is empty (all transparent or black)")
    return Stroke(concept, mask, erase=erase, strength=strength)


def _best_latents(generator, variables, target, samples: int, seed: int):
    """Encoder-free start: of ``samples`` latents, the one whose image is closest (L1) to the photo."""
    import jax
    import jax.numpy as jnp

    from jaxdissect.editing.strokes import latent_like

    z = np.random.RandomState(seed).standard_normal(latent_like(generator, samples).shape).astype(np.float32)
    images = jax.jit(lambda v, z: generator.apply(v, z))(variables, jnp.asarray(z))
    err = np.abs(np.asarray(images) - target[:1]).mean(axis=(1, 2, 3))
    return z[int(np.argmin(err))][None]


def edit_photo(generator, variables, photo: np.ndarray, strokes: Sequence[Stroke], brushes: Brushes, output_dir: str,
               *, encoder=None, perceptual=None, layer: str = "layer4", adapt_layers: Sequence[str],
               invert_steps: int = 3000, adapt_steps: int = 1000, init_samples: int = 64, seed: int = 1,
               progress: bool | None = None, log=print) -> dict:
    """Invert ``photo`` ``[1, H, W, 3]``, adapt, apply ``strokes``; write the images; returns the summary."""
    os.makedirs(output_dir, exist_ok=True)
    z0 = None if encoder is not None else _best_latents(generator, variables, photo, init_samples, seed)
    inv = invert(generator, variables, photo, z=z0, encoder=encoder, layer=layer, perceptual=perceptual,
                 steps=invert_steps, progress=progress)
    log(f"inversion PSNR {inv.psnr[0]:.2f} dB after {invert_steps} steps")
    ad = adapt(generator, variables, inv.representation, photo, layer=layer, adapt_layers=adapt_layers,
               steps=adapt_steps, progress=progress)
    log(f"adapted reconstruction PSNR {ad.psnr[0]:.2f} dB after {adapt_steps} steps")
    edited = apply_strokes(generator, variables, inv.representation, strokes, brushes, layer=layer, adaptation=ad)
    images = {"input": photo[0], "inversion": np.asarray(inv.reconstruction)[0],
              "adapted": np.asarray(ad.reconstruction)[0], "edit": np.asarray(edited)[0]}
    for name, img in images.items():
        save_png(os.path.join(output_dir, f"{name}.png"), img)
    fileio.write_bytes(os.path.join(output_dir, "side_by_side.png"), _png_bytes(side_by_side(images)))
    fileio.savez(os.path.join(output_dir, "losses.npz"), inversion=inv.losses[:, 0], adaptation=ad.losses[:, 0])
    summary = {
        "inversion_psnr": float(inv.psnr[0]), "adapted_psnr": float(ad.psnr[0]),
        "strokes": [{"concept": s.concept, "erase": s.erase, "strength": s.strength,
                     "units": [int(u) for u in brushes.units(s.concept, s.strength)]} for s in strokes],
        "layer": layer, "adapt_layers": list(adapt_layers), "invert_steps": invert_steps, "adapt_steps": adapt_steps,
        "start": "encoder" if encoder is not None else f"best of {init_samples} random latents",
        "perceptual": perceptual is not None, "panels": list(images),
    }
    fileio.write_json(os.path.join(output_dir, "summary.json"), summary)
    return summary


__all__ = ["PhotoEditError", "EditError", "edit_photo", "load_photo", "parse_stroke", "save_png"]
