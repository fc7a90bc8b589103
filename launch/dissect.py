r"""Dissect a model: label every unit of the chosen layers with the concept it detects.

VGG16-Places365 (converted with ``converters.vgg16_places365``) on the Places365
validation folder, all conv layers, UPP + colour segmenter (spec 3.1, 3.2)::

  python -m launch.dissect --model=models/vgg16_places365 --layers=conv \
      --data=places:datasets/places/val \
      --segmenter=upp=models/upp,color=models/color,setting=netpqc

A Progressive GAN (default data: the original's 10,000 z vectors, seed 1)::

  python -m launch.dissect --model=models/proggan_church --layers=layer1..layer14 \
      --segmenter=upp=models/upp,color=models/color

With no ``--model`` a small CNN trained on synthetic scenes (cached under
``--cache_dir``) is dissected against the scenes' known labels: a two-minute
demo that needs no downloads::

  python -m launch.dissect

Results go to ``--output_dir`` (default ``results/<model>-<data>-<seg>-<layers>-<q>``
as in the original, q = 1000 * quantile): per layer ``report.json``,
``arrays.npz``, ``concepts_99.svg``, ``image/unit<u>.jpg``; for the run
``index.html`` and ``summary.*``. Interrupted, the same command resumes.
Multi-host: run the same command on every host with ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or none of them on a managed cluster).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags

SYNTHETIC_IMAGES = 512
FLAGS = flags.FLAGS


class LaunchError(ValueError):
    """A flag value that cannot be used; the message says which and how to fix it."""


def get_config() -> dict:
    """The run's settings from the flags (a plain dict, so scripts can build one too)."""
    names = ["model", "layers", "data", "segmenter", "quantile", "miniou", "topk", "thumbsize",
             "batch_size", "output_dir", "cache_dir", "num_images", "on_bad_image", "checkpoint_every",
             "activation_cache_mb",
             "coordinator_address", "num_processes", "process_id"]
    return {n: getattr(FLAGS, n) for n in names}


def _range(spec: str, candidates: list[str]) -> list[str]:
    start, _, end = spec.partition("..")
    pattern = re.compile("^" + re.sub(r"\d+", r"\\d+", re.escape(start)) + "$")
    same_kind = [n for n in candidates if pattern.match(n)]
    for endpoint in (start, end):
        if endpoint not in same_kind:
            raise LaunchError(f"range {spec!r}: unknown layer {endpoint!r}; valid layers: {', '.join(candidates)}")
    i, j = same_kind.index(start), same_kind.index(end)
    if j < i:
        raise LaunchError(f"range {spec!r} runs backwards (layers are in forward order: {', '.join(same_kind)})")
    return same_kind[i:j + 1]


def parse_layers(spec: str | None, dissectable: list[str]) -> list[str]:
    """Layer names from ``--layers``; ``dissectable`` = the model's [N, H, W, C] layers in order."""
    top = [n for n in dissectable if "." not in n]
    conv = [n for n in top if re.match(r"^(conv|layer\d)", n.rsplit(".", 1)[-1])]
    out: list[str] = []
    for part in (spec or "conv").split(","):
        part = part.strip()
        if not part:
            continue
        if part == "all":
            out += top
        elif part == "conv":
            if not conv:
                raise LaunchError(f"--layers=conv: no conv layers found; valid layers: {', '.join(dissectable)}")
            out += conv
        elif ".." in part:
            out += _range(part, dissectable)
        elif part in dissectable:
            out.append(part)
        else:
            import difflib

            close = difflib.get_close_matches(part, dissectable, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LaunchError(f"unknown layer {part!r}{hint}; valid layers: {', '.join(dissectable)}")
    return list(dict.fromkeys(out))


def _layers_tag(spec: str | None, layers: list[str]) -> str:
    if len(layers) == 1:
        return layers[0]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", (spec or "conv").replace(",", "+"))


def make_data(spec: str, *, kind: str, crop: int, on_bad_image: str, normalization: str = "imagenet"):
    """A data source from ``--data``: returns ``(source, short name for the results directory)``.

    ``normalization`` is the model's input convention (``imagenet`` classifiers,
    ``zc`` the demo CNN); the folder sources always serve the classifier pipeline.
    """
    from jaxdissect.data import folders, places

    scheme, _, arg = spec.partition(":")
    if scheme in ("places", "folder", "broden") and not arg:
        raise LaunchError(f"--data={spec}: give the folder, e.g. --data={scheme}:/path/to/images")
    if scheme == "places":
        return places.PlacesFolder(arg, crop=crop, on_error=on_bad_image), "places"
    if scheme == "folder":
        return folders.ImageFolder(arg, crop=crop, on_error=on_bad_image), os.path.basename(os.path.normpath(arg))
    if scheme == "tfds":
        name, _, split = arg.partition(":")
        if name != "places365_small":
            raise LaunchError(f"--data={spec}: only tfds:places365_small is supported")
        return places.Places365TFDS(split or "validation", crop=crop), "places365_small"
    if scheme == "broden":
        from jaxdissect.data import broden

        preprocess = broden.imagenet_normalize if normalization == "imagenet" else broden.to_zc
        return broden.BrodenSource(arg, preprocess=preprocess, on_error=on_bad_image), "broden"
    if scheme == "z":
        if kind != "generator":
            raise LaunchError(f"--data={spec} feeds z vectors, but the model is a classifier; give images")
        try:
            n = int(arg or 10000)
        except ValueError:
            raise LaunchError(f"--data={spec}: the count after z: must be an integer") from None
        return folders.LatentSource(n), f"z{n}" if n != 10000 else "z"
    if scheme == "synthetic":
        from jaxdissect.data.synthetic import SyntheticScenes

        return SyntheticScenes(int(arg or SYNTHETIC_IMAGES), seed=0), "synthetic"
    raise LaunchError(f"--data={spec}: unknown kind {scheme!r}; use places:<dir>, folder:<dir>, "
                      "tfds:places365_small, broden:<dir>, z:<count> or synthetic:<count>")


def make_segmentation(spec: str):
    """``'dataset'`` or ``(segmenter, variables)`` from ``--segmenter``; and its short name."""
    if spec == "dataset":
        return "dataset", "dataset"
    from jaxdissect.segmentation import segmenter_from_spec

    segmenter, variables = segmenter_from_spec(spec)
    return (segmenter, variables), segmenter.setting


def _model_kind(metadata: dict, module) -> tuple[str, int]:
    inp = metadata.get("input") or {}
    if inp.get("name") == "z" or type(module).__name__ == "ProgressiveGenerator":
        return "generator", 0
    crop = (metadata.get("preprocessing") or {}).get("crop", 224)
    return "classifier", int(crop)


def build(config: dict) -> dict:
    """Everything ``jaxdissect.dissect`` needs, from a config (see :func:`get_config`)."""
    from jaxdissect.layers import layer_shapes

    demo = not config.get("model")
    if demo:
        from jaxdissect.pipelines.train_synthetic import train_or_load

        results_root = os.path.dirname(os.path.abspath(config["output_dir"])) if config.get("output_dir") \
            else os.path.abspath("results")
        cache = config.get("cache_dir") or os.path.join(results_root, "cache")
        module, variables, _ = train_or_load(cache, log=lambda *a: print(*a, file=sys.stderr))
        kind, crop, model_name = "classifier", 0, "synthetic"
        data_spec = config.get("data") or f"synthetic:{SYNTHETIC_IMAGES}"
        seg_spec = config.get("segmenter") or "dataset"
    else:
        from jaxdissect.checkpoint import CheckpointError, load_metadata, load_model

        model_dir = config["model"]
        if not os.path.isdir(model_dir):
            raise LaunchError(f"--model={model_dir}: no such directory; convert a checkpoint first, e.g. "
                              "python -m converters.vgg16_places365 --input=vgg16_places365-0bafbc55.pth "
                              f"--output={model_dir}")
        try:
            module, variables = load_model(model_dir)
            metadata = load_metadata(model_dir) or {}
        except CheckpointError as e:
            raise LaunchError(f"--model={model_dir}: {e}") from e
        kind, crop = _model_kind(metadata, module)
        model_name = metadata.get("model") or os.path.basename(os.path.normpath(model_dir))
        data_spec = config.get("data") or ("z:10000" if kind == "generator" else None)
        if data_spec is None:
            raise LaunchError("--data is required for a classifier, e.g. --data=places:datasets/places/val")
        seg_spec = config.get("segmenter") or ("dataset" if data_spec.startswith(("broden:", "synthetic"))
                                               else None)
    data, data_name = make_data(data_spec, kind=kind, crop=crop, on_bad_image=config.get("on_bad_image", "raise"),
                                normalization="zc" if demo else "imagenet")
    if seg_spec is None:
        raise LaunchError("--segmenter is required for this data, e.g. "
                          "--segmenter=upp=models/upp,color=models/color,setting=netpqc")
    probe = data.get_batch([0])
    x = probe["z" if "z" in probe else "image"][:1]
    shapes = layer_shapes(module, variables, x)
    dissectable = [n for n, s in shapes.items() if len(getattr(s, "shape", ())) == 4]
    layers = parse_layers(config.get("layers"), dissectable)
    segmentation, seg_name = make_segmentation(seg_spec)
    q = float(config.get("quantile", 0.01))
    output_dir = config.get("output_dir")
    if not output_dir:
        name = f"{model_name}-{data_name}-{seg_name}-{_layers_tag(config.get('layers'), layers)}"
        if q != 0.005:
            name += "-%g" % (q * 1000)
        if config.get("thumbsize", 100) != 100:
            name += f"-t{config['thumbsize']}"
        output_dir = os.path.join("results", name)
    return dict(module=module, variables=variables, layers=layers, data=data, segmentation=segmentation,
                output_dir=output_dir, name=f"{model_name} {data_name} {seg_name}")


def run(config: dict):
    """Build and dissect; returns ``(results, output_dir)``."""
    from jaxdissect import parallel

    parallel.initialize_distributed(config.get("coordinator_address"), config.get("num_processes"),
                                    config.get("process_id"))
    from jaxdissect.pipelines.dissect import dissect

    b = build(config)
    results = dissect(b["module"], b["variables"], b["layers"], b["data"], b["segmentation"],
                      quantile=config.get("quantile", 0.01), miniou=config.get("miniou", 0.04),
                      topk=config.get("topk", 100), thumbsize=config.get("thumbsize", 100),
                      batch_size=config.get("batch_size"), output_dir=b["output_dir"],
                      num_images=config.get("num_images"), name=b["name"],
                      checkpoint_every=config.get("checkpoint_every", 50),
                      activation_cache_mb=config.get("activation_cache_mb", 1024))
    return results, b["output_dir"]


def _quiet_orbax() -> None:
    """Keep orbax's per-checkpoint INFO lines out of the progress output (warnings still show)."""
    import logging as std_logging

    class Filter(std_logging.Filter):
        def filter(self, record):
            return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname

    std_logging.getLogger("absl").addFilter(Filter())


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    flags.DEFINE_string("model", None, "Converted model directory (jaxdissect.load_model); "
                        "absent: the embedded synthetic demo.")
    flags.DEFINE_string("layers", None, "Comma list of layer names, ranges like layer1..layer14, "
                        "'conv' (all conv layers) or 'all'. Default: 'conv'.")
    flags.DEFINE_string("data", None, "places:<dir>, folder:<dir>, tfds:places365_small[:split], "
                        "broden:<dir>, z:<count> or synthetic:<count>. Default: z:10000 for "
                        "generators, synthetic for the demo; required for classifiers.")
    flags.DEFINE_string("segmenter", None, "'upp=<dir>,color=<dir>,setting=netpqc' or 'dataset' "
                        "(labels from the data). Default: dataset for the demo and Broden.")
    flags.DEFINE_float("quantile", 0.01, "Top fraction of activations that counts as on.")
    flags.DEFINE_float("miniou", 0.04, "IoU above which a unit counts as interpretable.")
    flags.DEFINE_integer("topk", 100, "Top images tracked per unit.")
    flags.DEFINE_integer("thumbsize", 100, "Thumbnail size of the unit strips.")
    flags.DEFINE_integer("batch_size", None, "Images per step (default 16 classifiers, 10 generators).")
    flags.DEFINE_string("output_dir", None, "Results directory (default results/<model>-<data>-<seg>-<layers>-<q>).")
    flags.DEFINE_string("cache_dir", None, "Where the demo model is cached (default <output_dir>/../cache).")
    flags.DEFINE_integer("num_images", None, "Dissect only the first N items of the data.")
    flags.DEFINE_enum("on_bad_image", "raise", ["raise", "skip"],
                      "An unreadable image stops the run (raise) or is left out and counted (skip).")
    flags.DEFINE_integer("checkpoint_every", 50, "Batches between checkpoints of the streaming passes.")
    flags.DEFINE_integer("activation_cache_mb", 1024, "Host memory for keeping activations and labels between "
                         "passes (the model and segmenter then run once per image); 0 = recompute.")
    flags.DEFINE_string("coordinator_address", None, "Multi-host: address of process 0 (host:port).")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from jaxdissect.models import set_cpu_xla_flags

    set_cpu_xla_flags()
    _quiet_orbax()
    from jaxdissect.checkpoint import CheckpointError
    from jaxdissect.data.folders import DataSourceError
    from jaxdissect.pipelines.dissect import DissectError
    from jaxdissect.segmentation import SegmenterError
    from jaxdissect.statistics import DissectionError
    from jaxdissect.streaming import StreamError

    try:
        results, output_dir = run(get_config())
    except (LaunchError, DataSourceError, DissectError, DissectionError, CheckpointError, SegmenterError,
            StreamError) as e:
        sys.exit(f"error: {e}")
    index = os.path.join(os.path.abspath(output_dir), "index.html")
    for layer, r in results.items():
        print(f"{layer}: {int(r.interpretable.sum())} of {len(r.thresholds)} units with IoU > {FLAGS.miniou}")
    print(f"report: {index}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
