r"""Compare networks, training snapshots, layers or random-rotation powers in one dissection run.

With no flags, a first look on the embedded demo: the small CNN trained once on
synthetic scenes against an untrained copy of it (both kept in ``--cache_dir``;
nothing is downloaded), on 256 synthetic scenes with their own labels::

  python -m launch.compare

Networks on Broden with the 2017 method (one pass over the data for all)::

  python -m launch.compare --models=models/alexnet_places365,models/resnet152_places365 \
      --layers="conv5;7" --data=broden:datasets/broden1_224 --output_dir=results/compare-networks

Training snapshots (``--iterations``) over several layers, and the rotation
curve (``--rotations``, NetDissect's random rotation ``Q^alpha``, seed 1)::

  python -m launch.compare --models=snap/it1000,snap/it10000,snap/it100000 --iterations=1000,10000,100000 \
      --layers=conv3,conv4,conv5 --data=broden:datasets/broden1_227
  python -m launch.compare --models=models/alexnet_places365 --layers=conv5 \
      --rotations=0,0.2,0.4,0.6,0.8,1 --data=broden:datasets/broden1_227

``--layers`` applies to every model, or gives one ``;``-separated list per
model. Outputs: ``compare.csv``, ``compare.json``, the figures (SVG),
``index.html`` and ``dissection/`` (the unit reports) in ``--output_dir``. With
a segmenter, its label maps are read from (or written to) the per-user
segmentation cache (``--cache_dir``, ``--segmentation_cache_mb``; 0 = off),
shared with ``launch.dissect``.
"""

from __future__ import annotations

import os

from absl import flags

from launch import common
from launch.common import LaunchError

FLAGS = flags.FLAGS
# Settings that do not change the results (left out of the output directory's identity).
_NOT_RESULTS = ("output_dir", "overwrite", "checkpoint_every", "cache_dir", "segmentation_cache_mb")


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def validate(config: dict) -> None:
    """Check every setting that can be checked without reading data or models (before any work)."""
    for name in ("batch_size", "num_images"):
        common.positive(name, config.get(name))
    common.positive("checkpoint_every", config.get("checkpoint_every", 50), allow_none=False)
    common.in_range("quantile", config.get("quantile"), 0.0, 1.0)
    common.in_range("miniou", config.get("miniou", 0.04), 0.0, 1.0, low_open=False)
    if (config.get("method") or "netdissect2017") not in ("pnas", "netdissect2017"):
        raise LaunchError(f"--method={config['method']}: use pnas or netdissect2017")
    if (config.get("on_bad_image") or "raise") not in ("raise", "skip"):
        raise LaunchError(f"--on_bad_image={config['on_bad_image']}: use raise or skip")
    if config.get("data"):
        common.parse_data_spec(config["data"])
    common.segmentation_cache(config)
    _rotations(config)


def _rotations(config: dict) -> list[float] | None:
    if not config.get("rotations"):
        return None
    try:
        return [float(a) for a in _split(config["rotations"])]
    except ValueError:
        raise LaunchError(f"--rotations={config['rotations']}: give powers alpha like 0,0.5,1") from None


def build(config: dict) -> dict:
    """Members, data and settings for ``compare`` from a config (the flags as a dict)."""
    validate(config)
    from jaxdissect.checkpoint import CheckpointError, load_metadata, load_model
    from jaxdissect.layers import layer_shapes
    from jaxdissect.pipelines.compare import Member
    from launch.dissect import make_data, make_segmentation, parse_layers

    dirs = _split(config.get("models"))
    if not dirs:  # the embedded demo: the demo CNN and an untrained copy of it, on synthetic scenes
        from jaxdissect.pipelines import demo

        dirs = demo.compare_model_dirs(common.cache_dir(config.get("cache_dir")), log=common.log)
        config = dict(config, data=config.get("data") or demo.COMPARE_DATA)
    names = _split(config.get("names")) or None
    if names is not None and len(names) != len(dirs):
        raise LaunchError(f"--names lists {len(names)} names for {len(dirs)} models; give one name per model")
    iterations = _split(config.get("iterations")) or None
    if iterations is not None:
        if len(iterations) != len(dirs):
            raise LaunchError(f"--iterations lists {len(iterations)} values for {len(dirs)} models; give one "
                              "training iteration per model (snapshot)")
        try:
            iterations = [int(i) for i in iterations]
        except ValueError:
            raise LaunchError(f"--iterations={config['iterations']}: iterations must be integers") from None
    groups = [g.strip() for g in (config.get("layers") or "conv").split(";")]
    if len(groups) not in (1, len(dirs)):
        raise LaunchError(f"--layers gives {len(groups)} ';'-separated layer lists for {len(dirs)} models; give "
                          "one list for all models or one per model")
    if not config.get("data"):
        raise LaunchError("--data is required, e.g. --data=broden:datasets/broden1_224")
    loaded, pipelines = [], []
    for d in dirs:
        d = common.model_dir(d, flag="models")
        try:
            module, variables = load_model(d)
            metadata = load_metadata(d) or {}
        except CheckpointError as e:
            raise LaunchError(f"--models: {d}: {e}") from e
        if common.model_kind(metadata, module) != "classifier":
            raise LaunchError(f"--models: {d} is a generator; launch.compare compares image classifiers on one "
                              "image data set")
        try:
            pre = common.data_preprocessing(metadata, d, config["data"])
        except LaunchError as e:
            raise LaunchError(str(e).replace("--model=", "--models: ", 1)) from None
        if pre not in pipelines:
            pipelines.append(pre)
        loaded.append((d, module, variables, metadata))
    if len(pipelines) > 1:
        raise LaunchError(f"the models take different input preprocessing {pipelines}; one data pass feeds them "
                          "all, so compare models with the same preprocessing (or run them separately)")
    data, data_name = make_data(config["data"], kind="classifier", on_bad_image=config.get("on_bad_image") or "raise",
                                preprocessing=pipelines[0])
    seg_spec = config.get("segmenter") or ("dataset" if config["data"].startswith(("broden", "synthetic"))
                                           else None)
    if seg_spec is None:
        raise LaunchError("--segmenter is required for this data, e.g. "
                          "--segmenter=upp=models/upp,color=models/color,setting=netpqc")
    segmentation, seg_name = make_segmentation(seg_spec)
    probe = data.get_batch([0])["image"][:1]
    members = []
    for i, (d, module, variables, metadata) in enumerate(loaded):
        shapes = layer_shapes(module, variables, probe)
        dissectable = [n for n, s in shapes.items() if len(getattr(s, "shape", ())) == 4]
        spec = groups[0] if len(groups) == 1 else groups[i]
        try:
            layers = parse_layers(spec, dissectable)
        except ValueError as e:
            raise LaunchError(f"--layers for {d}: {e}") from e
        name = names[i] if names else (metadata.get("model") or os.path.basename(os.path.normpath(d)))
        members.append(Member(name=name.replace(".", "_").replace(" ", "_"), module=module,
                              variables=variables, layers=layers,
                              iteration=iterations[i] if iterations else None))
    output_dir = config.get("output_dir") or os.path.join(
        "results", "compare-" + "-".join(m.name for m in members)[:80] + f"-{data_name}-{seg_name}")
    identity = {k: v for k, v in config.items() if k not in _NOT_RESULTS}
    common.check_output_dir(output_dir, identity, overwrite=bool(config.get("overwrite")),
                            remove=("dissection/work",))
    common.set_resume_hint(f"run the same command to resume ({os.path.abspath(output_dir)})")
    return dict(members=members, data=data, segmentation=segmentation, rotations=_rotations(config),
                output_dir=output_dir)


def run(config: dict) -> tuple[dict, str]:
    """Build and compare; returns ``(compare's result, output_dir)``."""
    validate(config)
    from jaxdissect.pipelines.compare import compare

    b = build(config)
    seg_root, seg_mb = common.segmentation_cache(config)
    out = compare(b["members"], b["data"], b["segmentation"], rotations=b["rotations"],
                  rotation_seed=config.get("rotation_seed", 1),
                  rotation_unpermute=bool(config.get("rotation_unpermute")),
                  method=config.get("method") or "netdissect2017", quantile=config.get("quantile"),
                  miniou=config.get("miniou", 0.04), output_dir=b["output_dir"],
                  batch_size=config.get("batch_size"), num_images=config.get("num_images"),
                  checkpoint_every=config.get("checkpoint_every", 50), segmentation_cache=seg_root,
                  segmentation_cache_mb=seg_mb)
    return out, b["output_dir"]


def get_config() -> dict:
    names = ["models", "names", "iterations", "layers", "rotations", "rotation_seed", "rotation_unpermute", "data",
             "segmenter", "method", "quantile", "miniou", "batch_size", "num_images", "output_dir", "overwrite",
             "on_bad_image", "checkpoint_every", "cache_dir", "segmentation_cache_mb"]
    return {n: getattr(FLAGS, n) for n in names}


def define_flags() -> None:
    """The command-line flags (defined only when run as a program)."""
    flags.DEFINE_string("models", None, "Comma list of converted model directories (networks or snapshots); "
                        "absent: the demo CNN and an untrained copy.")
    flags.DEFINE_string("names", None, "Comma list of display names, one per model (default: model.json's).")
    flags.DEFINE_string("iterations", None, "Comma list of training iterations, one per model (snapshots).")
    flags.DEFINE_string("layers", None, "Layers for every model (comma list, ranges, 'conv', 'all'), or one "
                        "';'-separated list per model. Default: conv.")
    flags.DEFINE_string("rotations", None, "Comma list of rotation powers alpha (e.g. 0,0.2,...,1): dissect "
                        "each layer rotated by Q^alpha.")
    flags.DEFINE_integer("rotation_seed", 1, "Seed of the random rotation (the original's is 1).")
    flags.DEFINE_bool("rotation_unpermute", False, "Permute rotated units back towards the original ones.")
    common.define_data_flag(f"{common.DATA_HELP} (anything but broden: and synthetic: needs --segmenter).")
    flags.DEFINE_string("segmenter", None, "'dataset' (default for Broden) or a segmenter spec.")
    flags.DEFINE_enum("method", "netdissect2017", ["pnas", "netdissect2017"], "Scoring method.")
    flags.DEFINE_float("quantile", None, "Top fraction that counts as on (default 0.005 for netdissect2017).")
    flags.DEFINE_float("miniou", 0.04, "IoU that makes a unit a detector.")
    flags.DEFINE_integer("batch_size", None, "Images per step.")
    flags.DEFINE_integer("num_images", None, "Use only the first N items of the data.")
    common.define_output_flags("Results directory (default results/compare-<models>-<data>-<seg>).")
    flags.DEFINE_enum("on_bad_image", "raise", ["raise", "skip"], "Unreadable image: stop, or leave it out.")
    flags.DEFINE_integer("checkpoint_every", 50, "Batches between checkpoints of the streaming passes.")
    common.define_cache_dir_flag()
    common.define_segmentation_cache_flag()


def main(argv):
    del argv
    out, output_dir = run(get_config())
    for r in out["rows"]:
        alpha = "" if r["alpha"] is None else f" alpha={r['alpha']:g}"
        print(f"{r['model']} {r['layer']}{alpha}: {r['detectors']} detectors, {r['unique']} unique "
              f"(per category), {r['unique_top']} unique (top labels)")
    print(f"report: {os.path.join(os.path.abspath(output_dir), 'index.html')}")


if __name__ == "__main__":
    define_flags()
    common.run(main)
