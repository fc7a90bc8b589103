"""Shared pieces of the converters: reading, verifying and re-laying the tensors of a PyTorch state dict.

Every converter reads its ``.pth`` files with :func:`load_state_dict` (the
restricted reader of :mod:`jaxdissect.convert.torchfile`: arrays only, no
pickled code run, no PyTorch needed), checks them against the exact set of
keys and shapes the architecture needs (missing, unexpected and mis-shaped
tensors are all reported at once), re-lays the tensors for Flax (NHWC convs,
``[in, out]`` dense kernels) and writes a model directory with
:func:`jaxdissect.checkpoint.save_model`.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Mapping

import numpy as np

from jaxdissect.checkpoint import CheckpointError, require_new_directory
from jaxdissect.convert import torchfile
from jaxdissect.errors import JaxDissectError


class ConversionError(JaxDissectError, ValueError):
    """The input checkpoint cannot be converted; the message says why and what to do."""


def require_empty_output(output_dir: str) -> None:
    """Refuse a non-empty output directory before any file is read (the checkpoint writer's own rule)."""
    try:
        require_new_directory(output_dir)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: str, release: str | None = None) -> dict[str, np.ndarray]:
    """Read a checkpoint's tensors as NumPy arrays (bfloat16 widened to float32), without PyTorch.

    ``.safetensors`` files are read with ``safetensors``. PyTorch files may be a
    plain state_dict or one wrapped as ``{'state_dict': {...}}``, in the zip or
    the legacy format; only arrays are built, so no pickled code is ever run (a
    whole pickled model is refused, as ``torch.load(weights_only=True)`` refuses
    it, and so is a TorchScript archive, naming ``release`` as the file to use).
    """
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist()):
                raise ConversionError(
                    f"{path} is a TorchScript archive (a whole compiled model, not a state dict); reading it "
                    "would run its code. " + (f"Use {release} instead" if release else
                                              "Save its state_dict() where it loads and convert that"))
    try:
        obj = torchfile.load(path)
    except torchfile.TorchFileError as e:
        raise ConversionError(str(e)) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state_dict of tensors")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[str(key)] = value
    return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a NumPy array (no PyTorch, no code run)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not os.path.exists(path):
        raise ConversionError(f"checkpoint file {path} does not exist")
    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"cannot read {path} as safetensors ({e}); the file may be truncated: "
                              "download it again") from None


def convert_classifier(name: str, input_path: str, output_dir: str, from_state: Callable, *, crop: int = 224,
                       classes_path: str | None = None, **extra) -> dict:
    """The shared body of the classifier converters: read ``input_path``, ``from_state(state) -> (module,
    variables)``, write ``output_dir`` with the classic preprocessing (resize 256, centre crop ``crop``,
    ImageNet normalisation) and the class names of ``classes_path``; returns the metadata (plus ``extra``)."""
    from jaxdissect.checkpoint import save_model

    require_empty_output(output_dir)
    module, variables = from_state(load_state_dict(input_path))
    metadata = {
        "model": name,
        "source_file": os.path.basename(input_path),
        "source_sha256": sha256(input_path),
        "num_classes": module.num_classes,
        "preprocessing": {"normalization": "imagenet", "resize": 256, "crop": crop,
                          "function": "jaxdissect.preprocess.vgg_preprocess"},
        "input": {"layout": "NHWC", "shape": [None, crop, crop, 3], "dtype": "float32"},
        **extra,
    }
    if classes_path:
        metadata["classes"] = read_classes(classes_path, module.num_classes)
    save_model(output_dir, module, variables, metadata)
    return metadata


def read_classes(path: str, num_classes: int) -> list[str]:
    """Class names from a text file, one per line (first word; ``categories_places365.txt`` works as is)."""
    try:
        with open(path) as f:
            names = [line.split()[0] for line in f if line.strip()]
    except OSError as e:
        raise ConversionError(f"cannot read class names from {path}: {e}") from e
    if len(names) != num_classes:
        raise ConversionError(f"{path} lists {len(names)} class names but the model has {num_classes} classes")
    return names


def check_state_dict(
    state: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    ignore: tuple[str, ...] = (),
) -> None:
    """Raise :class:`ConversionError` unless ``state`` has exactly the ``expected`` keys and shapes.

    ``ignore`` lists key suffixes that may be present without being used (e.g.
    BatchNorm's ``num_batches_tracked``). ``what`` names the architecture in
    the message, so a checkpoint of the wrong model is recognised as such.
    """
    present = {k for k in state if not (ignore and k.endswith(ignore))}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    misshaped = sorted(
        f"{k}: file has {tuple(state[k].shape)}, {what} needs {tuple(expected[k])}"
        for k in set(expected) & present
        if tuple(state[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or misshaped):
        return
    lines = [f"this checkpoint does not match {what}:"]

    def listing(title, items):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))

    listing("missing", missing)
    listing("unexpected", unexpected)
    listing("wrong shape", misshaped)
    if len(missing) == len(expected):
        lines.append("  none of the expected keys is present: is this a checkpoint of a different model?")
    raise ConversionError("\n".join(lines))


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight ``[out, in, kh, kw]`` -> Flax ``[kh, kw, in, out]`` (no flip: both correlate)."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)), dtype=np.float32)


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch linear weight ``[out, in]`` -> Flax ``[in, out]``."""
    return np.ascontiguousarray(w.T, dtype=np.float32)


def batchnorm(state: Mapping[str, np.ndarray], prefix: str) -> tuple[dict, dict]:
    """``(params, batch_stats)`` of a Flax ``BatchNorm`` from PyTorch keys ``prefix.{weight,bias,running_*}``."""
    f32 = lambda k: np.asarray(state[f"{prefix}.{k}"], dtype=np.float32)  # noqa: E731
    return (
        {"scale": f32("weight"), "bias": f32("bias")},
        {"mean": f32("running_mean"), "var": f32("running_var")},
    )


_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "bias"): "bias", ("params", "scale"): "weight",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def flax_layout(module, input_shape, torch_name: Callable[[tuple[str, ...]], str]) -> dict[str, tuple]:
    """PyTorch key -> ``(collection, flax module path, leaf, torch shape)`` for every variable of ``module``.

    The variables' shapes come from ``jax.eval_shape`` of ``module.init`` on an
    input of ``input_shape`` (nothing is computed); ``torch_name`` maps a Flax
    module path (a tuple of names) to the PyTorch module prefix. Conv kernels
    ``[kh, kw, in, out]`` are ``[out, in, kh, kw]`` in PyTorch, dense kernels
    ``[in, out]`` are ``[out, in]``, BatchNorm ``scale``/``mean``/``var`` are
    ``weight``/``running_mean``/``running_var``.
    """
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(input_shape, jnp.float32))
    layout = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = tuple(str(getattr(p, "key", p)) for p in path)
        collection, mod, name = names[0], names[1:-1], names[-1]
        shape = tuple(leaf.shape)
        if name == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (shape[1], shape[0])
        key = f"{torch_name(mod)}.{_TORCH_LEAF[(collection, name)]}"
        layout[key] = (collection, mod, name, shape)
    return layout


def build_variables(state: Mapping[str, np.ndarray], layout: Mapping[str, tuple], overrides=None) -> dict:
    """Flax variables from a checked ``state`` and its :func:`flax_layout`; ``overrides`` maps keys to ready arrays."""
    overrides = overrides or {}
    variables: dict = {}
    for key, (collection, mod, name, shape) in layout.items():
        if key in overrides:
            value = overrides[key]
        elif name == "kernel":
            value = conv_kernel(state[key]) if len(shape) == 4 else dense_kernel(state[key])
        else:
            value = np.asarray(state[key], np.float32)
        node = variables.setdefault(collection, {})
        for m in mod:
            node = node.setdefault(m, {})
        node[name] = value
    return variables


def chw_rows_to_hwc(w: np.ndarray, c: int, h: int, wd: int) -> np.ndarray:
    """PyTorch linear weight ``[out, c*h*w]`` over a (c, h, w) flatten -> Flax kernel over the NHWC (h, w, c) flatten."""
    out = w.shape[0]
    return np.ascontiguousarray(
        np.asarray(w, np.float32).reshape(out, c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, out))
