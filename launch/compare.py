r"""Compare networks, training snapshots, layers, rotations or bases in one dissection run.

With no flags, a first look on the embedded demo: the small CNN trained once on
synthetic scenes (kept in ``--cache_dir``; nothing is downloaded), its
``conv4`` in five bases (neurons, a random rotation, TopK sparse autoencoders
of 2x and 4x the channels with k=8, Net2Vec concept probes), each also on the same
network at random initialisation (CVPR 2017's control), on 256 synthetic
scenes with their own labels: unique detectors, significant labels, mean IoU
of labelled units, SAE reconstruction error and dead features, and the
accuracy lost per ablated unit, in ``compare.csv`` and ``bases.svg``::

  python -m launch.compare

The same for any model and layer (learned bases are trained from the same data
once, kept in ``--cache_dir``; see ``docs/bases.md``)::

  python -m launch.compare --models=vgg16_places365 --layers=conv5_3 --data=places --segmenter=netpqc \
      --bases="neurons;rotation:1;sae:4;sae:8;probe:net2vec" --control=random_init

The planted model (16 concepts along the directions of a random rotation of its
layer; ``jaxdissect.models.planted``): the neurons detect little, the SAE and
the probes recover the planted concepts::

  python -m launch.compare --demo=planted

Networks on Broden with the 2017 method (one pass over the data for all)::

  python -m launch.compare --models=alexnet_places365,resnet152_places365 \
      --layers="conv5;7" --data=broden:224 --output_dir=results/compare-networks

Training snapshots (``--iterations``) over several layers, and the rotation
curve (``--rotations``, NetDissect's random rotation ``Q^alpha``, seed 1)::

  python -m launch.compare --models=snap/it1000,snap/it10000,snap/it100000 --iterations=1000,10000,100000 \
      --layers=conv3,conv4,conv5 --data=broden:227
  python -m launch.compare --models=alexnet_places365 --layers=conv5 \
      --rotations=0,0.2,0.4,0.6,0.8,1 --data=broden:227

``--rotations=A,B`` is ``--bases=rotation:A:S;rotation:B:S`` (S =
``--rotation_seed``), with the same views and figures as ever.
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
# Options of the comparison itself; every other setting is a jaxdissect.config.DissectConfig field.
COMPARE = ("models", "names", "iterations", "layers", "rotations", "rotation_seed", "bases", "control", "demo")
# Where things go (left out of the output directory's identity, with the config's run fields).
ENVIRONMENT = ("output_dir", "overwrite", "cache_dir", "segmentation_cache_mb")
# The DissectConfig fields launch.compare has flags for.
CONFIG_FLAGS = ("segmenter", "method", "quantile", "miniou", "batch_size", "num_images", "on_bad_image",
                "checkpoint_every", "rotation_unpermute", "significance", "permutations", "sae_batches",
                "sae_minibatch", "sae_learning_rate", "probe_epochs")
# Options added by a comparison of bases (in the output directory's identity only when bases are compared).
BASES = ("bases", "control", "significance", "permutations", "sae_batches", "sae_minibatch", "sae_learning_rate",
         "probe_epochs")
# The embedded defaults where a flag is not given: the demo CNN's conv4 in five bases with the control ...
DEMO = {"layers": "conv4", "bases": "neurons;rotation:1;sae:2,k=8;sae:4,k=8;probe:net2vec", "control": "random_init",
        "significance": True, "permutations": 200, "sae_batches": 96, "sae_minibatch": 512, "sae_learning_rate": 3e-3,
        "probe_epochs": 10}
# ... and the planted model (--demo=planted), whose concepts lie along rotated directions.
PLANTED = {"layers": "mixed", "bases": "neurons;rotation:1;sae:2,k=2;sae:4,k=2;probe:net2vec",
           "control": "random_init", "significance": True, "permutations": 200, "quantile": 0.1, "miniou": 0.3,
           "sae_batches": 160, "sae_minibatch": 256, "sae_learning_rate": 1e-2, "probe_epochs": 10}


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def compare_config(config: dict):
    """The comparison's ``DissectConfig`` from the options (None values take the comparison's defaults)."""
    from jaxdissect.config import ConfigError, DissectConfig
    from jaxdissect.pipelines.compare import compare_config as make

    fields = {f: v for f, v in config.items() if f not in COMPARE + ENVIRONMENT
              and not (v is None and DissectConfig.__dataclass_fields__[f].default is not None)}
    try:
        return make(**fields)
    except ConfigError as e:
        raise LaunchError(e.render("--")) from None


def validate(config: dict):
    """Check every setting that can be checked without reading data or models (before any work)."""
    if config.get("demo") not in (None, "cnn", "planted"):
        raise LaunchError(f"--demo={config['demo']}: give cnn (the demo CNN) or planted (the planted model)")
    if config.get("control") not in (None, "random_init"):
        raise LaunchError(f"--control={config['control']}: the control is random_init (the same network at a "
                          "random initialisation)")
    if config.get("bases"):
        from jaxdissect.bases import BasisError, spec

        try:
            spec.parse_list(config["bases"])
        except BasisError as e:
            raise LaunchError(f"--bases={config['bases']}: {e}") from None
    out = compare_config(config)
    if config.get("data"):
        common.parse_data_spec(config["data"])
    common.segmentation_cache(config)
    _rotations(config)
    return out


def _rotations(config: dict) -> list[float] | None:
    if not config.get("rotations"):
        return None
    try:
        return [float(a) for a in _split(config["rotations"])]
    except ValueError:
        raise LaunchError(f"--rotations={config['rotations']}: give powers alpha like 0,0.5,1") from None


def build(config: dict) -> dict:
    """Members, data and settings for ``compare`` from a config (the flags as a dict)."""
    settings = validate(config)
    from jaxdissect.checkpoint import CheckpointError, load_metadata, load_model
    from jaxdissect.layers import layer_shapes
    from jaxdissect.pipelines.compare import Member
    from launch.dissect import make_data, make_segmentation, parse_layers

    dirs = _split(config.get("models"))
    if config.get("demo") == "planted" or (config.get("demo") and dirs):
        if dirs:
            raise LaunchError("--demo and --models exclude each other: --demo runs an embedded model")
        return _planted(config, settings)
    if not dirs:  # the embedded demo: the demo CNN's bases, and the same at random initialisation
        from jaxdissect.pipelines import demo

        # --rotations alone: the rotation curve of the demo CNN (the demo's bases would name rotation:1 again)
        config = _with_defaults(config, {k: v for k, v in DEMO.items() if k != "bases" or not config.get("rotations")})
        settings = validate(config)
        dirs = [demo.model_dir(common.cache_dir(config.get("cache_dir")), log=common.log)]
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
        raise LaunchError("--data is required, e.g. --data=broden:224")
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
    data, data_name = make_data(config["data"], kind="classifier", on_bad_image=settings.on_bad_image,
                                preprocessing=pipelines[0])
    seg_spec = config.get("segmenter") or ("dataset" if config["data"].startswith(("broden", "synthetic"))
                                           else None)
    if seg_spec is None:
        raise LaunchError("--segmenter is required for this data, e.g. "
                          "--segmenter=netpqc")
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
    return _finish(config, settings, members, data, segmentation, f"{data_name}-{seg_name}")


def _with_defaults(config: dict, defaults: dict) -> dict:
    """``config`` with ``defaults`` where a flag is not given (None)."""
    return {**config, **{k: v for k, v in defaults.items() if config.get(k) is None}}


def _planted(config: dict, settings) -> dict:
    """The planted model and its scenes (``--demo=planted``)."""
    from jaxdissect.models import planted
    from jaxdissect.pipelines.compare import Member
    from launch.dissect import parse_layers

    config = _with_defaults(config, PLANTED)
    settings = validate(config)
    if config.get("data"):
        raise LaunchError("--demo=planted brings its own data; leave out --data")
    module, variables = planted.planted_model()
    data = planted.PlantedScenes(settings.num_images or planted.IMAGES)
    try:
        layers = parse_layers(config["layers"], list(planted.LAYERS))
    except ValueError as e:
        raise LaunchError(f"--layers: {e}") from e
    members = [Member(name="planted", module=module, variables=variables, layers=layers)]
    return _finish(config, settings, members, data, "dataset", "planted-dataset")


def _finish(config: dict, settings, members, data, segmentation, tag: str) -> dict:
    """Output directory (checked against its identity) and the comparison's arguments."""
    names = [m.name for m in members] + ([config["control"]] if config.get("control") else [])
    output_dir = config.get("output_dir") or os.path.join(
        "results", "compare-" + "-".join(names)[:80] + ("-bases" if config.get("bases") else "") + f"-{tag}")
    bases_mode = bool(config.get("bases") or config.get("control"))
    if bases_mode and config.get("significance") is None:  # the table's significant labels
        settings = settings.replace(significance=True)
    identity = {**settings.identity(), **{k: config.get(k) for k in COMPARE if k not in BASES + ("demo",)}}
    if bases_mode:  # runs without bases keep their identity
        identity.update({k: config.get(k) for k in BASES + ("demo",)})
    common.check_output_dir(output_dir, identity, overwrite=bool(config.get("overwrite")),
                            remove=("dissection/work", "ablation"))
    common.set_resume_hint(f"run the same command to resume ({os.path.abspath(output_dir)})")
    return {"members": members, "data": data, "segmentation": segmentation, "rotations": _rotations(config),
            "output_dir": output_dir, "config": settings, "bases": config.get("bases") or None,
            "control": config.get("control") or None}


def run(config: dict) -> tuple[dict, str]:
    """Build and compare; returns ``(compare's result, output_dir)``."""
    validate(config)
    from jaxdissect.pipelines.compare import compare

    b = build(config)
    seg_root, seg_mb = common.segmentation_cache(config)
    out = compare(b["members"], b["data"], b["segmentation"], b["config"].replace(segmentation_cache_mb=seg_mb),
                  rotations=b["rotations"], rotation_seed=config.get("rotation_seed", 1), bases=b["bases"],
                  control=b["control"], output_dir=b["output_dir"], segmentation_cache=seg_root,
                  cache_dir=common.cache_dir(config.get("cache_dir")))
    return out, b["output_dir"]


def get_config() -> dict:
    return {n: getattr(FLAGS, n) for n in COMPARE + CONFIG_FLAGS + ("data",) + ENVIRONMENT}


def define_flags() -> None:
    """The command-line flags (defined only when run as a program)."""
    from jaxdissect.config import DissectConfig
    from jaxdissect.pipelines.compare import DEFAULTS

    flags.DEFINE_string("models", None, "Comma list of models: registry names or converted model directories "
                        "(networks or snapshots); "
                        "absent: the demo CNN (--demo).")
    flags.DEFINE_string("names", None, "Comma list of display names, one per model (default: model.json's).")
    flags.DEFINE_string("iterations", None, "Comma list of training iterations, one per model (snapshots).")
    flags.DEFINE_string("layers", None, "Layers for every model (comma list, ranges, 'conv', 'all'), or one "
                        "';'-separated list per model. Default: conv.")
    flags.DEFINE_string("rotations", None, "Comma list of rotation powers alpha (e.g. 0,0.2,...,1): dissect "
                        "each layer rotated by Q^alpha.")
    flags.DEFINE_integer("rotation_seed", 1, "Seed of the random rotation (the original's is 1).")
    flags.DEFINE_string("bases", None, "';'-separated bases of every layer, compared in one run: neurons, "
                        "rotation:ALPHA[:SEED], sae:EXPANSION[,k=K], probe:net2vec (learned ones trained from the "
                        "data once, kept in --cache_dir). Demo: " + DEMO["bases"])
    flags.DEFINE_string("control", None, "random_init: every model also at a random initialisation (CVPR 2017's "
                        "control). Demo: random_init")
    flags.DEFINE_enum("demo", None, ["cnn", "planted"], "With no --models: the demo CNN (default) or the planted "
                      "model whose concepts lie along rotated directions.")
    common.define_data_flag(f"{common.DATA_HELP} (anything but broden: and synthetic: needs --segmenter).")
    # None: not given (the demo's defaults, else DissectConfig's, apply)
    DissectConfig.define_flags(only=CONFIG_FLAGS, defaults={**DEFAULTS, **dict.fromkeys(BASES[2:] + ("miniou",))})
    common.define_output_flags("Results directory (default results/compare-<models>-<data>-<seg>).")
    common.define_cache_dir_flag()
    common.define_segmentation_cache_flag()


def main(argv):
    del argv
    out, output_dir = run(get_config())
    for r in out["rows"]:
        alpha = "" if r["alpha"] is None or "basis" in r else f" alpha={r['alpha']:g}"
        basis = f" {r['basis']}" if "basis" in r else ""
        line = (f"{r['model']} {r['layer']}{basis}{alpha}: {r['detectors']} detectors, {r['unique']} unique "
                f"(per category), {r['unique_top']} unique (top labels)")
        if "basis" in r:
            line += "".join(f", {k} {r[k]:.3g}" if isinstance(r[k], float) else f", {k} {r[k]}"
                            for k in ("significant", "mean_iou", "fvu", "accuracy_drop_mean") if r[k] is not None)
        print(line)
    print(f"report: {os.path.join(os.path.abspath(output_dir), 'index.html')}")


if __name__ == "__main__":
    define_flags()
    common.run(main)
