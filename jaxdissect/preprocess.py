"""Image conventions and the classifier input pipeline of the original (spec 1.2).

Value conventions (per RGB channel, ``x_convention = (x_pt - offset) / scale``):

========================  ==========================  ======================
name                      offset                      scale
========================  ==========================  ======================
``pt``                    0, 0, 0                     1, 1, 1
``zc``                    0.5, 0.5, 0.5               0.5, 0.5, 0.5
``imagenet``              0.485, 0.456, 0.406         0.229, 0.224, 0.225
``imagenet_meanonly``     0.485, 0.456, 0.406         1/255 each
``places_meanonly``       0.475, 0.441, 0.408         1/255 each
``byte``                  0, 0, 0                     1/255 each
========================  ==========================  ======================

Classifiers take ``imagenet`` images, the Progressive GAN emits ``zc``, the
segmenters and reports convert with :func:`renormalize`. Arrays are NHWC (the
channel axis is last).
"""

from __future__ import annotations

import os

import numpy as np

OFFSET_SCALE = {
    "pt": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "zc": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet_meanonly": ((0.485, 0.456, 0.406), (1 / 255, 1 / 255, 1 / 255)),
    "places_meanonly": ((0.475, 0.441, 0.408), (1 / 255, 1 / 255, 1 / 255)),
    "byte": ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)),
}

IMAGENET_MEAN = np.array(OFFSET_SCALE["imagenet"][0], np.float32)
IMAGENET_STD = np.array(OFFSET_SCALE["imagenet"][1], np.float32)

# The original resizes every image to exactly this square before cropping.
RESIZE = 256


def _convention(name: str):
    if name not in OFFSET_SCALE:
        raise ValueError(f"unknown image convention {name!r}; choose one of {sorted(OFFSET_SCALE)}")
    offset, scale = OFFSET_SCALE[name]
    return np.array(offset, np.float64), np.array(scale, np.float64)


def renormalize(x, source: str, target: str):
    """Convert NHWC (or HWC) images from convention ``source`` to ``target``.

    ``y = x * (old_scale / new_scale) + (old_offset - new_offset) / new_scale``
    per channel. A ``byte`` target is clamped to [0, 255] and truncated to
    uint8, as in the original. Works on NumPy and JAX arrays (returns the same
    kind); an integer input (e.g. uint8 bytes) is first made float32.
    """
    old_offset, old_scale = _convention(source)
    new_offset, new_scale = _convention(target)
    if x.shape[-1] != 3:
        raise ValueError(
            f"renormalize expects RGB images with channels last (NHWC), got shape {tuple(x.shape)}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    mul = (old_scale / new_scale).astype(np.float32)
    add = ((old_offset - new_offset) / new_scale).astype(np.float32)
    y = x * mul.astype(x.dtype) + add.astype(x.dtype)
    if target == "byte":
        y = y.clip(0, 255).astype(np.uint8)
    return y


def zc_to_uint8(images) -> np.ndarray:
    """Generator output in [-1, 1] (``zc``) -> uint8 RGB, rounded (the corrected rendering, spec 2.6).

    ``renormalize(x, 'zc', 'byte')`` truncates, as the original's reports do;
    this is the rendering of generated and edited images.
    """
    return np.clip((np.asarray(images, np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def vgg_preprocess(image, crop: int = 224) -> np.ndarray:
    """A PIL image or image file -> the classifier input, float32 ``[crop, crop, 3]`` (spec 1.2).

    Steps, each as torchvision does them for the original:

    1. decode and convert to RGB (drops alpha, expands greyscale/palette);
    2. resize to exactly 256x256, ignoring the aspect ratio, with Pillow's
       bilinear filter (which antialiases when shrinking; a framework resize
       would give different pixels);
    3. centre crop ``crop`` x ``crop`` at offset ``int(round((256 - crop) / 2))``
       on both axes (16 for 224; 14 for AlexNet's 227, Python rounds half to even);
    4. scale bytes to [0, 1] (``/ 255`` in float32);
    5. ImageNet normalisation ``(x - mean) / std``, RGB order.
    """
    from PIL import Image

    if not 1 <= crop <= RESIZE:
        raise ValueError(f"crop must be between 1 and {RESIZE} (images are resized to {RESIZE}x{RESIZE}), got {crop}")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with Image.open(path) as f:
                f.load()
                image = f.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(
                f"cannot read image {path}: {type(e).__name__}: {e}; the file is missing, truncated "
                "or not an image: replace it or remove it from the image list"
            ) from e
    elif isinstance(image, Image.Image):
        image = image.convert("RGB")
    else:
        raise TypeError(f"vgg_preprocess takes a PIL image or a file path, got {type(image).__name__}")
    image = image.resize((RESIZE, RESIZE), Image.BILINEAR)
    top = int(round((RESIZE - crop) / 2))
    pixels = np.asarray(image, np.uint8)[top : top + crop, top : top + crop]
    x = pixels.astype(np.float32) / np.float32(255)
    return (x - IMAGENET_MEAN) / IMAGENET_STD
