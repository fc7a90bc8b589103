r"""Dissect a model: label every unit of the chosen layers with the concept it detects.

VGG16-Places365 (converted with ``converters.vgg16_places365``) on the Places365
validation folder, all conv layers, UPP + colour segmenter (spec 3.1, 3.2)::

  python -m launch.dissect --model=models/vgg16_places365 --layers=conv \
      --data=places:datasets/places/val \
      --segmenter=upp=models/upp,color=models/color,setting=netpqc

A Progressive GAN (default data: the original's 10,000 z vectors, seed 1)::

  python -m launch.dissect --model=models/proggan_church --layers=layer1..layer14 \
      --segmenter=upp=models/upp,color=models/color

With no ``--model`` a small CNN trained on synthetic scenes (cached in the
per-user ``--cache_dir``, default ``~/.cache/jaxdissect``) is dissected against
the scenes' known labels: a two-minute demo that needs no downloads::

  python -m launch.dissect

The 2017 method on Broden (per-category scoring, ``<layer>-result.csv``,
unique detectors both ways), optionally on a randomly rotated basis
(``--rotation=ALPHA[:SEED]``: ``Q^alpha`` of NetDissect's random rotation over
each layer's channels, before the thresholds)::

  python -m launch.dissect --model=models/alexnet_places365 --layers=conv5 \
      --data=broden:datasets/broden1_227 --method=netdissect2017 --rotation=1:1

An AlexNet converted with ``converters.alexnet_places365`` records the pool5
receptive-field grid in model.json; as in the original, every layer is then
upsampled with it (``--geometry=receptive_field``, the default for such a
model; ``--geometry=original`` or ``clamped`` overrides it).

Each unit's best formula of up to 3 concepts and the significance of its label
(p-value, Benjamini-Hochberg q-value, bootstrap IoU interval), from the same
passes (``jaxdissect.explain``)::

  python -m launch.dissect --formulas=3 --significance

Each unit scored against its label with IoU, F1, AUPRC, Pearson r and cosine,
at pixel and image level (one more pass; also run by ``--significance``)::

  python -m launch.dissect --label_metrics

The segmenter's label maps are kept in the per-user cache
(``<cache_dir>/segmentation``, up to ``--segmentation_cache_mb`` MiB, 0 = off):
a later dissection of the same data (another model, other layers, a
``launch.compare``) reads them and does not run the segmenter again.

Results go to ``--output_dir`` (default ``results/<model>-<data>-<seg>-<layers>-<q>``
as in the original, q = 1000 * quantile): per layer ``report.json``,
``arrays.npz``, ``concepts_99.svg``, ``image/unit<u>.jpg``; for the run
``index.html`` and ``summary.*``. A non-empty ``--output_dir`` is refused unless
it holds a run of the same settings (which resumes) or ``--overwrite`` is given.
Interrupted (Ctrl-C, or killed), the same command resumes.
Multi-host: run the same command on every host with ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or none of them on a managed cluster).
"""

from __future__ import annotations

import os
import re
import sys

from absl import flags

from launch import common
from launch.common import SYNTHETIC_IMAGES, LaunchError, make_data  # noqa: F401 (re-exported)

FLAGS = flags.FLAGS
CONFIG_NAMES = ["model", "layers", "data", "segmenter", "quantile", "miniou", "topk", "thumbsize", "batch_size",
                "output_dir", "overwrite", "cache_dir", "num_images", "on_bad_image", "checkpoint_every",
                "geometry", "row0_competes", "quad_quirk", "faithful_color_blank", "coordinator_address",
                "num_processes", "process_id", "method", "rotation", "rotation_unpermute", "activation_cache_mb",
                "formulas", "exact_formulas", "significance", "permutations", "label_metrics",
                "segmentation_cache_mb"]
# The formula/significance add-on: part of a run's identity only when asked for.
_EXPLAIN = ("formulas", "exact_formulas", "significance", "permutations")
# The label-metrics pass (also run by --significance): part of a run's identity only when on.
_METRICS = ("label_metrics",)
# Settings that do not change the results (left out of the output directory's identity).
_NOT_RESULTS = ("output_dir", "overwrite", "cache_dir", "checkpoint_every", "activation_cache_mb",
                "segmentation_cache_mb", "coordinator_address",
                "num_processes", "process_id")
DEFAULTS = dict(quantile=None, miniou=0.04, topk=100, thumbsize=100, on_bad_image="raise", checkpoint_every=50,
                geometry=None, row0_competes=False, quad_quirk=True, faithful_color_blank=False,
                overwrite=False, method="pnas", rotation=None, rotation_unpermute=False, formulas=0,
                exact_formulas=False, significance=False, permutations=1000, label_metrics=False)


def get_config() -> dict:
    """The run's settings from the flags (a plain dict, so scripts can build one too)."""
    return {n: getattr(FLAGS, n) for n in CONFIG_NAMES}


def validate(config: dict) -> None:
    """Check every setting that can be checked without reading data or models (before any work)."""
    for name in ("topk", "thumbsize", "checkpoint_every"):
        common.positive(name, config.get(name, DEFAULTS[name]), allow_none=False)
    for name in ("batch_size", "num_images"):
        common.positive(name, config.get(name))
    if config.get("activation_cache_mb", 1024) < 0:
        raise LaunchError(f"--activation_cache_mb={config['activation_cache_mb']}: give a size in MiB >= 0 "
                          "(0 recomputes the activations in every pass)")
    common.segmentation_cache(config)
    if config.get("quantile") is not None:
        common.in_range("quantile", config["quantile"], 0.0, 1.0)
    if config.get("method", "pnas") not in ("pnas", "netdissect2017"):
        raise LaunchError(f"--method={config['method']}: use pnas or netdissect2017")
    if config.get("rotation"):
        from jaxdissect.rotation import RotationError, parse_rotation

        try:
            parse_rotation(config["rotation"])
        except RotationError as e:
            raise LaunchError(str(e)) from None
    common.in_range("miniou", config.get("miniou", DEFAULTS["miniou"]), 0.0, 1.0, low_open=False)
    if config.get("geometry") not in (None, "original", "clamped", "receptive_field"):
        raise LaunchError(f"--geometry={config['geometry']}: use original, clamped or receptive_field")
    if config.get("on_bad_image", "raise") not in ("raise", "skip"):
        raise LaunchError(f"--on_bad_image={config['on_bad_image']}: use raise or skip")
    if config.get("data"):
        common.parse_data_spec(config["data"])
    if config.get("formulas", 0) < 0:
        raise LaunchError(f"--formulas={config['formulas']}: give the formula length (>= 1) or 0 for none")
    if config.get("exact_formulas") and not config.get("formulas"):
        raise LaunchError("--exact_formulas needs --formulas=N (the formula length), e.g. --formulas=3")
    if config.get("significance"):
        common.positive("permutations", config.get("permutations", DEFAULTS["permutations"]), allow_none=False)


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


def make_segmentation(spec: str, **options):
    """``'dataset'`` or ``(segmenter, variables)`` from ``--segmenter``; and its short name.

    ``options`` (``quad_quirk``, ``faithful_color_blank``) go to ``jaxdissect.load_segmenter``.
    """
    if spec == "dataset":
        return "dataset", "dataset"
    from jaxdissect.segmentation import segmenter_from_spec

    segmenter, variables = segmenter_from_spec(common.segmenter_spec(spec), **options)
    return (segmenter, variables), segmenter.setting


def build(config: dict) -> dict:
    """Everything ``jaxdissect.dissect`` needs, from a config (see :func:`get_config`).

    Order matters to the user: every check (flags, model, data, layers, output
    directory, segmenter) comes before the demo model is trained.
    """
    from jaxdissect.layers import layer_shapes

    validate(config)
    demo = not config.get("model")
    if demo:
        from jaxdissect.pipelines import train_synthetic

        settings = dict(config.get("demo_settings") or {})
        module, variables = train_synthetic.abstract_model(**settings)
        kind, model_name, preprocessing = "classifier", "demo", train_synthetic.preprocessing(**settings)
        data_spec = config.get("data") or f"synthetic:{SYNTHETIC_IMAGES}"
        seg_spec = config.get("segmenter") or ("dataset" if data_spec.startswith(("broden", "synthetic"))
                                               else None)
    else:
        from jaxdissect.checkpoint import CheckpointError, load_metadata, load_model

        model_dir = common.model_dir(config["model"])
        try:
            module, variables = load_model(model_dir)
            metadata = load_metadata(model_dir) or {}
        except CheckpointError as e:
            raise LaunchError(f"--model={model_dir}: {e}") from e
        kind = common.model_kind(metadata, module)
        model_name = metadata.get("model") or os.path.basename(os.path.normpath(model_dir))
        data_spec = config.get("data") or ("z:10000" if kind == "generator" else None)
        if data_spec is None:
            raise LaunchError("--data is required for a classifier, e.g. --data=places:datasets/places/val")
        preprocessing = common.data_preprocessing(metadata, model_dir, data_spec) if kind == "classifier" else None
        seg_spec = config.get("segmenter") or ("dataset" if data_spec.startswith(("broden", "synthetic"))
                                               else None)
    data, data_name = make_data(data_spec, kind=kind, on_bad_image=config.get("on_bad_image", "raise"),
                                preprocessing=preprocessing)
    geometry, receptive_field = _geometry(config.get("geometry"), {} if demo else metadata,
                                          None if demo else model_dir)
    if seg_spec is None:
        raise LaunchError("--segmenter is required for this data, e.g. "
                          "--segmenter=upp=models/upp,color=models/color,setting=netpqc")
    probe = data.get_batch([0])
    x = probe["z" if "z" in probe else "image"][:1]
    shapes = layer_shapes(module, variables, x)
    dissectable = [n for n, s in shapes.items() if len(getattr(s, "shape", ())) == 4]
    layers = parse_layers(config.get("layers"), dissectable)
    method = config.get("method") or "pnas"
    q = config.get("quantile")
    q = float(q) if q is not None else (0.005 if method == "netdissect2017" else 0.01)
    seg_name = "dataset" if seg_spec == "dataset" else None
    if seg_name is None:
        segmentation, seg_name = make_segmentation(seg_spec, quad_quirk=config.get("quad_quirk", True),
                                                   faithful_color_blank=config.get("faithful_color_blank", False))
    else:
        segmentation = "dataset"
    output_dir = config.get("output_dir")
    if not output_dir:
        name = f"{model_name}-{data_name}-{seg_name}-{_layers_tag(config.get('layers'), layers)}"
        if q != 0.005:
            name += "-%g" % (q * 1000)
        if method != "pnas":
            name += f"-{method}"
        if config.get("rotation"):
            name += "-rot" + re.sub(r"[^0-9.]", "_", config["rotation"])
        if config.get("thumbsize", 100) != 100:
            name += f"-t{config['thumbsize']}"
        output_dir = os.path.join("results", name)
    identity = {k: config.get(k, DEFAULTS.get(k))
                for k in CONFIG_NAMES if k not in _NOT_RESULTS + _EXPLAIN + _METRICS}
    if config.get("formulas") or config.get("significance"):
        identity.update({k: config.get(k, DEFAULTS[k]) for k in _EXPLAIN})
    if label_metrics_on(config):
        identity["label_metrics"] = True
    identity["layers"] = layers
    if config.get("demo_settings"):
        identity["demo_settings"] = config["demo_settings"]
    import jax

    if jax.process_index() == 0:
        common.check_output_dir(output_dir, identity, overwrite=bool(config.get("overwrite")))
    common.set_resume_hint(f"run the same command to resume ({os.path.abspath(output_dir)})")
    if demo:
        module, variables, _ = train_synthetic.train_or_load(common.cache_dir(config.get("cache_dir")),
                                                             log=_stderr, **settings)
    views = None
    if config.get("rotation"):
        from jaxdissect.rotation import layer_rotations, parse_rotation

        alpha, seed = parse_rotation(config["rotation"])
        mats = layer_rotations({n: shapes[n].shape for n in layers}, alpha, seed,
                               bool(config.get("rotation_unpermute")))
        views = {n: (n, mats[n]) for n in layers}
    return dict(module=module, variables=variables, layers=layers, data=data, segmentation=segmentation,
                output_dir=output_dir, name=f"{model_name} on {data_name}, {seg_name} labels", method=method,
                quantile=q, views=views, geometry=geometry, receptive_field=receptive_field)


def label_metrics_on(config: dict) -> bool:
    """Whether the label-metrics pass runs: --label_metrics, or --significance (both judge a label)."""
    return bool(config.get("label_metrics") or config.get("significance"))


def _geometry(flag, metadata: dict, model_dir):
    """``(geometry, receptive_field)``: the flag's, or by default the model's recorded one (else 'original').

    A model whose model.json records ``upsample`` (the AlexNet converter: the
    pool5 receptive-field grid the original upsampled every AlexNet layer with)
    is dissected with it unless ``--geometry`` says otherwise.
    """
    recorded = metadata.get("upsample")
    if flag is None:
        flag = "receptive_field" if recorded else "original"
    if flag != "receptive_field":
        return flag, None
    if not recorded:
        raise LaunchError(f"--geometry=receptive_field: {model_dir or 'the demo model'} records no receptive-field "
                          "grid (model.json 'upsample', written by converters.alexnet_places365); use "
                          "--geometry=original or clamped")
    from jaxdissect.pipelines.dissect import DissectError, parse_geometry

    try:
        parse_geometry(flag, recorded)
    except DissectError as e:
        raise LaunchError(f"--model={model_dir}: model.json 'upsample' is malformed: {e}") from None
    return flag, dict(recorded)


def _stderr(*args) -> None:
    print(*args, file=sys.stderr)


def run(config: dict):
    """Build and dissect; returns ``(results, output_dir)``."""
    from jaxdissect import parallel

    validate(config)
    parallel.initialize_distributed(config.get("coordinator_address"), config.get("num_processes"),
                                    config.get("process_id"))
    from jaxdissect.pipelines.dissect import dissect

    b = build(config)
    seg_root, seg_mb = common.segmentation_cache(config)
    results = dissect(b["module"], b["variables"], [] if b["views"] else b["layers"], b["data"], b["segmentation"],
                      quantile=b["quantile"], miniou=config.get("miniou", 0.04), method=b["method"],
                      views=b["views"],
                      topk=config.get("topk", 100), thumbsize=config.get("thumbsize", 100),
                      batch_size=config.get("batch_size"), output_dir=b["output_dir"],
                      num_images=config.get("num_images"), name=b["name"],
                      checkpoint_every=config.get("checkpoint_every", 50),
                      geometry=b["geometry"], receptive_field=b["receptive_field"],
                      row0_competes=bool(config.get("row0_competes", False)),
                      settings={"model": config.get("model") or "demo (synthetic scenes CNN)",
                                "segmenter": config.get("segmenter") or "dataset labels"},
                      activation_cache_mb=config.get("activation_cache_mb", 1024),
                      segmentation_cache=seg_root, segmentation_cache_mb=seg_mb,
                      formulas=config.get("formulas", 0), exact_formulas=bool(config.get("exact_formulas")),
                      permutations=config.get("permutations", DEFAULTS["permutations"])
                      if config.get("significance") else 0,
                      label_metrics=label_metrics_on(config))
    return results, b["output_dir"]


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    common.define_model_flag("Converted model directory (jaxdissect.load_model); absent: the embedded "
                             "synthetic demo.")
    flags.DEFINE_string("layers", None, "Comma list of layer names, ranges like layer1..layer14, "
                        "'conv' (all conv layers) or 'all'. Default: 'conv'.")
    common.define_data_flag(f"{common.DATA_HELP}. Default: z:10000 for generators, synthetic for the demo; "
                            "required for classifiers.")
    flags.DEFINE_string("segmenter", None, "'upp=<dir>,color=<dir>,setting=netpqc' or 'dataset' "
                        "(labels from the data). Default: dataset for the demo and Broden.")
    flags.DEFINE_float("quantile", None, "Top fraction of activations that counts as on, in (0, 1) "
                       "(default 0.01; 0.005 for --method=netdissect2017).")
    flags.DEFINE_enum("method", "pnas", ["pnas", "netdissect2017"],
                      "pnas: IoU against every label; netdissect2017: Broden scoring per primary category "
                      "with the category-conditioned activation count, <layer>-result.csv.")
    flags.DEFINE_string("rotation", None, "ALPHA[:SEED]: dissect Q^alpha R a, NetDissect's random rotation "
                        "(seed default 1) over each layer's channels, applied before the thresholds.")
    flags.DEFINE_bool("rotation_unpermute", False, "Permute the rotated units back towards the original "
                      "ones (NetDissect's --rotation_unpermute; counts do not change).")
    flags.DEFINE_float("miniou", 0.04, "IoU above which a unit counts as interpretable, in [0, 1).")
    flags.DEFINE_integer("topk", 100, "Top images tracked per unit.")
    flags.DEFINE_integer("thumbsize", 100, "Thumbnail size of the unit strips.")
    flags.DEFINE_integer("batch_size", None, "Images per step (default 16 classifiers, 10 generators).")
    common.define_output_flags("Results directory (default results/<model>-<data>-<seg>-<layers>-<q>).")
    common.define_cache_dir_flag()
    common.define_segmentation_cache_flag()
    flags.DEFINE_integer("num_images", None, "Dissect only the first N items of the data.")
    flags.DEFINE_enum("on_bad_image", "raise", ["raise", "skip"],
                      "An unreadable image stops the run (raise) or is left out and counted (skip).")
    flags.DEFINE_integer("checkpoint_every", 50, "Batches between checkpoints of the streaming passes.")
    flags.DEFINE_enum("geometry", None, ["original", "clamped", "receptive_field"], "Activation upsampling: "
                      "the original's zero-padded borders, clamped, or receptive_field (the grid model.json "
                      "records, as the original did for AlexNet; jaxdissect.kernels.upsample). Default: "
                      "receptive_field when model.json records one, else original.")
    flags.DEFINE_bool("row0_competes", False, "Original quirk: label 0 (no label) competes for a unit's best label.")
    flags.DEFINE_bool("quad_quirk", True, "Original quirk of the UPP segmenter's last quadrant component.")
    flags.DEFINE_bool("faithful_color_blank", False, "Original quirk: the colour segmenter's blank label emitted.")
    flags.DEFINE_integer("formulas", 0, "Also find each unit's best formula of up to N concepts "
                         "(jaxdissect.explain.compositional, beam search) from pass 3's masks; 0 = none.")
    flags.DEFINE_bool("exact_formulas", False, "With --formulas: provably optimal formulas (branch and bound).")
    flags.DEFINE_bool("significance", False, "Also image-permutation p-values of each unit's label (and formula), "
                      "Benjamini-Hochberg q-values (q = 0.05) and bootstrap IoU intervals.")
    flags.DEFINE_integer("permutations", 1000, "Monte Carlo permutations (and bootstrap samples) of --significance.")
    flags.DEFINE_bool("label_metrics", False, "Also score each unit against its label with IoU, F1, AUPRC, "
                      "Pearson r and cosine at pixel and image level, in one more pass (from the activation "
                      "cache when it fits). Also switched on by --significance: both judge whether a label "
                      "is sound.")
    flags.DEFINE_integer("activation_cache_mb", 1024, "Host memory for keeping activations and labels between "
                         "passes (the model and segmenter then run once per image); 0 = recompute.")
    flags.DEFINE_string("coordinator_address", None, "Multi-host: address of process 0 (host:port).")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def main(argv):
    del argv
    results, output_dir = run(get_config())
    index = os.path.join(os.path.abspath(output_dir), "index.html")
    for layer, r in results.items():
        if r.category_active is not None:
            from jaxdissect.netdissect2017 import scores_of, unique_detectors

            c = unique_detectors(scores_of(r), r.config["category_names"], FLAGS.miniou)
            print(f"{layer}: {c['top']['detectors']} of {len(r.thresholds)} units with IoU >= {FLAGS.miniou}; "
                  f"unique detectors {c['top']['unique']} (top labels), {c['per_category']['unique']} "
                  f"(per category, summed)")
        else:
            print(f"{layer}: {int(r.interpretable.sum())} of {len(r.thresholds)} units with IoU > {FLAGS.miniou}")
    print(f"report: {index}")


if __name__ == "__main__":
    define_flags()
    common.run(main)
