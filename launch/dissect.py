r"""Dissect a model: label every unit of the chosen layers with the concept it detects.

VGG16-Places365 (converted with ``converters.vgg16_places365``) on the Places365
validation folder, all conv layers, UPP + colour segmenter (spec 3.1, 3.2)::

  python -m launch.dissect --model=vgg16_places365 --layers=conv \
      --data=places:val \
      --segmenter=netpqc

A Progressive GAN (default data: the original's 10,000 z vectors, seed 1)::

  python -m launch.dissect --model=proggan_church --layers=layer1..layer14 \
      --segmenter=netpqc

With no ``--model`` a small CNN trained on synthetic scenes (cached in the
per-user ``--cache_dir``, default ``~/.cache/jaxdissect``) is dissected against
the scenes' known labels: a two-minute demo that needs no downloads::

  python -m launch.dissect

The 2017 method on Broden (per-category scoring, ``<layer>-result.csv``,
unique detectors both ways), optionally on a randomly rotated basis
(``--rotation=ALPHA[:SEED]``, the same as ``--basis=rotation:ALPHA:SEED``:
``Q^alpha`` of NetDissect's random rotation over each layer's channels, before
the thresholds)::

  python -m launch.dissect --model=alexnet_places365 --layers=conv5 \
      --data=broden:227 --method=netdissect2017 --rotation=1:1

Bases beyond the neurons (``--basis``, ``;``-separated, all in one pass over
the data): a TopK sparse autoencoder (``sae:EXPANSION[,k=K]``) and Net2Vec
concept probes (``probe:net2vec``) are trained from the same model and data
first (once; kept in ``--cache_dir``), then their features are dissected as
units; each layer's folder is ``<layer>@<basis>`` (see ``docs/bases.md``)::

  python -m launch.dissect --layers=conv3 --basis="neurons;sae:4,k=8;probe:net2vec" --sae_batches=64

An AlexNet converted with ``converters.alexnet_places365`` records the pool5
receptive-field grid in model.json; as in the original, every layer is then
upsampled with it (``--geometry=receptive_field``, the default for such a
model; ``--geometry=original`` or ``clamped`` overrides it).

Each unit's best formula of up to 3 concepts and the significance of its label
(p-value, Benjamini-Hochberg q-value, bootstrap IoU interval), from the same
passes (``jaxdissect.explain``)::

  python -m launch.dissect --formulas=3 --significance

Open-vocabulary labels beside the IoU labels, in the same passes (CLIP-Dissect's
soft-WPMI on pooled activations; ``--scorer=labels`` uses the data's own labels
instead of CLIP, ``--segmenter=none`` drops the IoU labels; ``[N, units]``
layers such as ``fc`` or a ViT block's ``_cls`` token are dissected too; see
docs/open_vocab.md)::

  python -m launch.dissect --scorer=labels --layers=conv,fc
  python -m launch.dissect --model=vit_b_16_imagenet --data=places --segmenter=none \
      --scorer=clip:ViT-B/16 --layers=encoder.layers.encoder_layer_11.residual_cls,heads.head

Each unit scored against its label with IoU, F1, AUPRC, Pearson r and cosine,
at pixel and image level (one more pass; also run by ``--significance``)::

  python -m launch.dissect --label_metrics

The segmenter's label maps are kept in the per-user cache
(``<cache_dir>/segmentation``, up to ``--segmentation_cache_mb`` MiB, 0 = off):
a later dissection of the same data (another model, other layers, a
``launch.compare``) reads them and does not run the segmenter again.

Every setting is a field of ``jaxdissect.config.DissectConfig`` (defaults,
checks and the resume identity live there); a config file from ``configs/``
sets many at once, and flags given on the command line override it::

  python -m launch.dissect --config=configs/netdissect2017_alexnet.py --layers=conv5

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
from typing import Sequence

from absl import flags

from jaxdissect import config as config_lib
from jaxdissect.config import ConfigError, DissectConfig
from launch import common
from launch.common import SYNTHETIC_IMAGES, LaunchError, make_data  # noqa: F401 (re-exported)

FLAGS = flags.FLAGS
# The launcher's own options beside the DissectConfig fields: where things go and how the job runs.
ENVIRONMENT = ("output_dir", "overwrite", "cache_dir", "segmentation_cache_mb", "coordinator_address",
               "num_processes", "process_id")
# A test hook: settings of the embedded demo model (train_synthetic).
_DEMO_SETTINGS = "demo_settings"
# --segmenter=none: no concept labels (the units are labelled by --scorer only).
NO_SEGMENTER = "none"


def get_config() -> dict:
    """The run's options from the flags (and ``--config``'s file, which flags given on the command line
    override): the ``DissectConfig`` fields plus :data:`ENVIRONMENT` (a plain dict, so scripts can build one)."""
    base = config_lib.load(FLAGS.config).as_dict() if FLAGS.config else {}
    out = {k: v for k, v in base.items() if k not in ENVIRONMENT}
    for name in DissectConfig.flag_names() + list(ENVIRONMENT):
        if name not in base or FLAGS[name].present:
            out[name] = getattr(FLAGS, name)
    return out


def dissect_config(options) -> DissectConfig:
    """The ``DissectConfig`` of a launcher options dict (or a config itself); a bad value is a LaunchError."""
    if isinstance(options, DissectConfig):
        return options
    fields = {k: v for k, v in options.items() if k not in ENVIRONMENT + (_DEMO_SETTINGS,)}
    try:
        config = config_lib.create(fields)
    except ConfigError as e:
        raise LaunchError(e.render("--")) from None
    if config.significance and not config.label_metrics:
        config = config.replace(label_metrics=True)  # both judge whether a label is sound
    return config


def validate(options) -> DissectConfig:
    """Check every setting that can be checked without reading data or models (before any work)."""
    config = dissect_config(options)
    if not isinstance(options, DissectConfig):
        common.segmentation_cache(options)
    if config.data:
        common.parse_data_spec(config.data)
    return config


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


def parse_layers(spec: str | None, dissectable: list[str], pooled: Sequence[str] = ()) -> list[str]:
    """Layer names from ``--layers``; ``dissectable`` = the model's [N, H, W, C] layers in order, ``pooled`` its
    [N, C] layers (a dense layer, a CLS token), which are dissected when named (or in a range), never by
    ``conv`` or ``all``."""
    top = [n for n in dissectable if "." not in n]
    named = [n for n in dissectable] + [n for n in pooled if n not in dissectable]
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
            out += _range(part, named)
        elif part in named:
            out.append(part)
        else:
            import difflib

            close = difflib.get_close_matches(part, named, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LaunchError(f"unknown layer {part!r}{hint}; valid layers: {', '.join(named)}")
    return list(dict.fromkeys(out))


def _layers_tag(spec: str | None, layers: list[str]) -> str:
    if len(layers) == 1:
        return layers[0]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", (spec or "conv").replace(",", "+"))


def make_segmentation(spec: str, **options):
    """``'dataset'``, None (``none``) or ``(segmenter, variables)`` from ``--segmenter``; and its short name.

    ``options`` (``quad_quirk``, ``faithful_color_blank``) go to ``jaxdissect.load_segmenter``.
    """
    if spec == "dataset":
        return "dataset", "dataset"
    if spec == NO_SEGMENTER:
        return None, "none"
    from jaxdissect.segmentation import segmenter_from_spec

    segmenter, variables = segmenter_from_spec(common.segmenter_spec(spec), **options)
    return (segmenter, variables), segmenter.setting


def _options(options) -> dict:
    return options.as_dict() if isinstance(options, DissectConfig) else dict(options)


def build(options) -> dict:
    """Everything ``jaxdissect.dissect`` needs, from the options (see :func:`get_config`) or a ``DissectConfig``.

    Order matters to the user: every check (flags, model, data, layers, output
    directory, segmenter) comes before the demo model is trained.
    """
    from jaxdissect.pipelines.dissect import dissectable_layers, not_a_map_error, trace_shapes

    options = _options(options)
    config = validate(options)
    demo = not config.model
    if demo:
        from jaxdissect.pipelines import train_synthetic

        settings = dict(options.get(_DEMO_SETTINGS) or {})
        module, variables = train_synthetic.abstract_model(**settings)
        kind, model_name, preprocessing = "classifier", "demo", train_synthetic.preprocessing(**settings)
        data_spec = config.data or f"synthetic:{SYNTHETIC_IMAGES}"
        metadata, model_dir = {}, None
    else:
        from jaxdissect.checkpoint import CheckpointError, load_metadata, load_model

        model_dir = common.model_dir(config.model)
        try:
            module, variables = load_model(model_dir)
            metadata = load_metadata(model_dir) or {}
        except CheckpointError as e:
            raise LaunchError(f"--model={model_dir}: {e}") from e
        kind = common.model_kind(metadata, module)
        model_name = metadata.get("model") or os.path.basename(os.path.normpath(model_dir))
        data_spec = config.data or ("z:10000" if kind == "generator" else None)
        if data_spec is None:
            raise LaunchError("--data is required for a classifier, e.g. --data=places:val")
        preprocessing = common.data_preprocessing(metadata, model_dir, data_spec) if kind == "classifier" else None
    seg_spec = config.segmenter or ("dataset" if data_spec.startswith(("broden", "synthetic")) else
                                    NO_SEGMENTER if config.scorer else None)
    data, data_name = make_data(data_spec, kind=kind, on_bad_image=config.on_bad_image, preprocessing=preprocessing)
    geometry, receptive_field = _geometry(config.geometry, metadata, model_dir)
    if seg_spec is None:
        raise LaunchError("--segmenter is required for this data, e.g. "
                          "--segmenter=netpqc (or --segmenter=none "
                          "with --scorer)")
    probe = data.get_batch([0])
    shapes, _ = trace_shapes(module, variables, probe["z" if "z" in probe else "image"][:1])
    dissectable = dissectable_layers(shapes)
    for part in (config.layers or "").split(","):
        if part.strip() in shapes and part.strip() not in dissectable_layers(shapes, pooled=True):
            raise LaunchError(str(not_a_map_error(part.strip(), shapes)))
    layers = parse_layers(config.layers, dissectable, [n for n in dissectable_layers(shapes, pooled=True)
                                                       if n not in dissectable])
    q = config.level_quantile
    if seg_spec == "dataset":
        segmentation, seg_name = "dataset", "dataset"
    elif seg_spec == NO_SEGMENTER:
        segmentation, seg_name = None, "none"
    else:
        segmentation, seg_name = make_segmentation(seg_spec, quad_quirk=config.quad_quirk,
                                                   faithful_color_blank=config.faithful_color_blank)
    if config.scorer:
        _check_open_vocab(config, data, segmentation)
    output_dir = options.get("output_dir")
    if not output_dir:
        name = f"{model_name}-{data_name}-{seg_name}-{_layers_tag(config.layers, layers)}"
        if q != 0.005:
            name += "-%g" % (q * 1000)
        if config.method != "pnas":
            name += f"-{config.method}"
        if config.rotation:
            name += "-rot" + re.sub(r"[^0-9.]", "_", config.rotation)
        if config.basis:
            name += "-" + re.sub(r"[^A-Za-z0-9.]+", "_", config.basis).strip("_")
        if config.thumbsize != 100:
            name += f"-t{config.thumbsize}"
        if config.scorer:
            from jaxdissect.explain.open_vocab_strategy import CLIP_ALIASES

            tag = CLIP_ALIASES.get(config.scorer) or os.path.basename(os.path.normpath(config.scorer))
            name += "-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", tag)
        output_dir = os.path.join("results", name)
    identity = {**config.identity(), "layers": layers}
    if options.get(_DEMO_SETTINGS):
        identity[_DEMO_SETTINGS] = options[_DEMO_SETTINGS]
    import jax

    if jax.process_index() == 0:
        common.check_output_dir(output_dir, identity, overwrite=bool(options.get("overwrite")))
    common.set_resume_hint(f"run the same command to resume ({os.path.abspath(output_dir)})")
    if demo:
        module, variables, _ = train_synthetic.train_or_load(common.cache_dir(options.get("cache_dir")),
                                                             log=_stderr, **settings)
    return dict(module=module, variables=variables, layers=layers, data=data, segmentation=segmentation,
                output_dir=output_dir, name=f"{model_name} on {data_name}, {seg_name} labels",
                config=config.replace(geometry=geometry, receptive_field=receptive_field))


def _check_open_vocab(config: DissectConfig, data, segmentation) -> None:
    """The open-vocabulary settings against the data (scorer name, vocabulary file, top_k), before any work."""
    from jaxdissect.explain.open_vocab_strategy import check_settings

    images = min(len(data), config.num_images or len(data))
    # The label names: none, the data's, or a segmenter's (None: known once it runs).
    names = [] if segmentation is None else list(data.label_names) if segmentation == "dataset" else None
    classes = list(getattr(data, "class_names", None) or []) if "label" in data.get_batch([0]) else []
    try:
        check_settings(config, images, names, classes)
    except ConfigError as e:
        raise LaunchError(e.render("--")) from None


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
    try:
        config_lib.receptive_field_options(flag, recorded)
    except config_lib.DissectError as e:
        raise LaunchError(f"--model={model_dir}: model.json 'upsample' is malformed: {e}") from None
    return flag, dict(recorded)


def _stderr(*args) -> None:
    print(*args, file=sys.stderr)


def run(options):
    """Build and dissect; returns ``(results, output_dir)``."""
    from jaxdissect import parallel

    options = _options(options)
    validate(options)
    parallel.initialize_distributed(options.get("coordinator_address"), options.get("num_processes"),
                                    options.get("process_id"))
    from jaxdissect.pipelines.dissect import dissect

    b = build(options)
    seg_root, seg_mb = common.segmentation_cache(options)
    try:
        results = dissect(b["module"], b["variables"], b["layers"], b["data"], b["segmentation"],
                          b["config"].replace(segmentation_cache_mb=seg_mb), output_dir=b["output_dir"], name=b["name"],
                          settings={"model": b["config"].model or "demo (synthetic scenes CNN)",
                                    "segmenter": b["config"].segmenter or (
                                        "dataset labels" if b["segmentation"] == "dataset" else "none")},
                          segmentation_cache=seg_root, cache_dir=common.cache_dir(options.get("cache_dir")))
    except ConfigError as e:
        raise LaunchError(e.render("--")) from None
    return results, b["output_dir"]


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module is free)."""
    flags.DEFINE_string("config", None, "A config file path.py[:variant] (configs/*.py) whose get_config(variant) "
                        "gives the settings; flags given on the command line override it.")
    common.define_model_flag(config_lib.DissectConfig.__dataclass_fields__["model"].metadata["help"])
    common.define_data_flag(f"{common.DATA_HELP}. Default: z:10000 for generators, synthetic for the demo; "
                            "required for classifiers.")
    DissectConfig.define_flags(skip=("model", "data"))
    common.define_output_flags("Results directory (default results/<model>-<data>-<seg>-<layers>-<q>).")
    common.define_cache_dir_flag()
    common.define_segmentation_cache_flag()
    flags.DEFINE_string("coordinator_address", None, "Multi-host: address of process 0 (host:port).")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def main(argv):
    del argv
    results, output_dir = run(get_config())
    index = os.path.join(os.path.abspath(output_dir), "index.html")
    for layer, r in results.items():
        miniou = r.config["miniou"]
        if r.category_active is not None:
            from jaxdissect.netdissect2017 import scores_of, unique_detectors

            c = unique_detectors(scores_of(r), r.config["category_names"], miniou)
            print(f"{layer}: {c['top']['detectors']} of {len(r.thresholds)} units with IoU >= {miniou}; "
                  f"unique detectors {c['top']['unique']} (top labels), {c['per_category']['unique']} "
                  f"(per category, summed)")
        else:
            print(f"{layer}: {int(r.interpretable.sum())} of {len(r.thresholds)} units with IoU > {miniou}")
    _print_open_vocab(output_dir)
    print(f"report: {index}")


def _print_open_vocab(output_dir: str) -> None:
    """The open-vocabulary numbers of each layer's summary row (when --scorer ran)."""
    import json

    path = os.path.join(output_dir, "summary.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = json.load(f)["layers"]
    for row in rows:
        if "ov_concepts" in row:
            print(f"{row['layer']}: open-vocabulary labels name {row['ov_concepts']} concepts; agree with the IoU "
                  f"label on {row['ov_same']} units (same concept) + {row['ov_word']} (a shared word) of "
                  f"{row['ov_compared']} with both labels"
                  + (f"; {row['ov_significant']} significant" if "ov_significant" in row else ""))


if __name__ == "__main__":
    define_flags()
    common.run(main)
