"""The one configuration of a dissection: defaults, validation and resume identity, written once.

:class:`DissectConfig` is a frozen dataclass. Everything else derives from it:
``launch.dissect``'s flags (:meth:`DissectConfig.define_flags`), the settings of
:func:`jaxdissect.dissect` (``dissect(..., config, quantile=0.02)``: a config
plus a few overridden fields), the record a run's output directory keeps and
the check that a rerun may resume it (:meth:`DissectConfig.identity`).

Each field has a role:

* ``input``: what to dissect, as the launcher's specs (``model``, ``data``,
  ``segmenter``, ``layers``, rotation, data and segmenter options). The
  launcher turns them into objects; :func:`jaxdissect.dissect` takes the
  objects themselves and ignores these fields (except in the identity).
* ``method``: how the dissection is done (quantile, IoU cut-off, top-k,
  geometry, scoring method, batch size, number of images, thumbnails).
* ``addon``: a method add-on (formulas and significance, label metrics), part
  of the identity only when switched on, so adding an add-on never changes
  the identity of runs that do not use it.
* ``run``: how the run goes, not what it computes (checkpoints, memory
  budgets); never part of the identity.

Config files (``configs/*.py``, big_vision style) define ``get_config(arg)``
returning a :class:`DissectConfig`; :func:`load` reads ``path.py[:arg]``.

Errors are :class:`ConfigError`; their text names fields as Python keywords
(``topk=0: ...``) or, rendered by a launcher, as flags (``--topk=0: ...``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Mapping

from jaxdissect.errors import JaxDissectError

METHODS = ("pnas", "netdissect2017")
GEOMETRIES = ("original", "clamped", "receptive_field")


class DissectError(JaxDissectError, ValueError):
    """Inputs that cannot be dissected together (unknown layer, resolutions that do not match, ...)."""


class ConfigError(DissectError):
    """A setting that cannot be used; rendered with Python names or, by launchers, as ``--flags``.

    ``template`` names fields as ``{name}``; :meth:`render` fills them in with a prefix.
    """

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        super().__init__(self.render(""))

    def render(self, prefix: str = "") -> str:
        names = {k: prefix + k for k in _FIELD_NAMES}
        return self.template.format(**names, **self.values)


def _field(default, help: str, role: str = "method", *, flag: bool = True, group: str | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "role": role, "flag": flag, "group": group})


@dataclasses.dataclass(frozen=True)
class DissectConfig:
    """Every setting of one dissection (see the module docstring for the roles)."""

    # -- input: what to dissect (launcher specs) --------------------------------------------------------
    model: str | None = _field(None, "Converted model directory (jaxdissect.load_model); absent: the embedded "
                               "synthetic demo.", "input")
    layers: str | None = _field(None, "Comma list of layer names, ranges like layer1..layer14, 'conv' (all conv "
                                "layers) or 'all'. Default: 'conv'.", "input")
    data: str | None = _field(None, "Data: places:<dir>, folder:<dir>, broden:<dir>, tfds:places365_small[:split], "
                              "z:<count> or synthetic:<count>. Default: z:10000 for generators, synthetic for the "
                              "demo; required for classifiers.", "input")
    segmenter: str | None = _field(None, "'upp=<dir>,color=<dir>,setting=netpqc' or 'dataset' (labels from the "
                                   "data). Default: dataset for the demo and Broden.", "input")
    on_bad_image: str = _field("raise", "An unreadable image stops the run (raise) or is left out and counted "
                               "(skip).", "input")
    quad_quirk: bool = _field(True, "Original quirk of the UPP segmenter's last quadrant component.", "input")
    faithful_color_blank: bool = _field(False, "Original quirk: the colour segmenter's blank label emitted.", "input")
    rotation: str | None = _field(None, "ALPHA[:SEED]: dissect Q^alpha R a, NetDissect's random rotation (seed "
                                  "default 1) over each layer's channels, applied before the thresholds; the "
                                  "same as --basis=rotation:ALPHA:SEED.", "input")
    rotation_unpermute: bool = _field(False, "Permute the rotated units back towards the original ones "
                                      "(NetDissect's --rotation_unpermute; counts do not change).", "input")
    # -- method --------------------------------------------------------------------------------------------
    method: str = _field("pnas", "pnas: IoU against every label; netdissect2017: Broden scoring per primary "
                         "category with the category-conditioned activation count, <layer>-result.csv.")
    quantile: float | None = _field(None, "Top fraction of activations that counts as on, in (0, 1) (default "
                                    "0.01; 0.005 for --method=netdissect2017).")
    miniou: float = _field(0.04, "IoU above which a unit counts as interpretable, in [0, 1).")
    topk: int = _field(100, "Top images tracked per unit.")
    thumbsize: int = _field(100, "Thumbnail size of the unit strips.")
    batch_size: int | None = _field(None, "Images per step (default 16 classifiers, 10 generators; rounded up to "
                                    "a multiple of the device count).")
    num_images: int | None = _field(None, "Dissect only the first N items of the data.")
    geometry: str | None = _field(None, "Activation upsampling: the original's zero-padded borders, clamped, or "
                                  "receptive_field (jaxdissect.kernels.upsample). Default: receptive_field when "
                                  "model.json records one, else original.")
    receptive_field: Any = _field(None, "With geometry receptive_field: {'convolutions': [(kernel, stride, "
                                  "padding, dilation), ...], 'image_size': N}.", flag=False)
    resolution: Any = _field(None, "The expected comparison resolution (S, S); an error if the segmentation's "
                             "differs.", flag=False)
    row0_competes: bool = _field(False, "Original quirk: label 0 (no label) competes for a unit's best label.")
    # -- add-ons ---------------------------------------------------------------------------------------------
    formulas: int = _field(0, "Also find each unit's best formula of up to N concepts "
                           "(jaxdissect.explain.compositional, beam search) from pass 3's masks; 0 = none.",
                           "addon", group="explain")
    exact_formulas: bool = _field(False, "With --formulas: provably optimal formulas (branch and bound).",
                                  "addon", group="explain")
    significance: bool = _field(False, "Also image-permutation p-values of each unit's label (and formula), "
                                "Benjamini-Hochberg q-values and bootstrap IoU intervals.", "addon", group="explain")
    permutations: int = _field(1000, "Monte Carlo permutations (and bootstrap samples) of --significance.",
                               "addon", group="explain")
    q: float = _field(0.05, "False discovery rate of --significance's Benjamini-Hochberg test.", "addon",
                      flag=False, group="explain")
    label_metrics: bool = _field(False, "Also score each unit against its label with IoU, F1, AUPRC, Pearson r "
                                 "and cosine at pixel and image level, in one more pass (from the activation "
                                 "cache when it fits).", "addon", group="label_metrics")
    scorer: str | None = _field(None, "Also label every unit with an open-vocabulary scorer, CLIP-Dissect's method "
                                "on pooled activations (jaxdissect.explain.open_vocab_strategy), in the same "
                                "passes: clip:ViT-B/16, clip:RN50, a registry name of kind scorer, a converted CLIP "
                                "directory, or labels (the data's own labels as the concept matrix: no "
                                "vision-language model).", "addon", group="open_vocab")
    vocabulary: str | None = _field(None, "Concepts of --scorer: 20k (20,000 common English words), broden (the "
                                    "run's label names, cleaned) or a word-list file (UTF-8, one concept a line). "
                                    "Default: 20k for a CLIP scorer; for labels every label and class name of the "
                                    "data (a file then picks some of them).", "addon", group="open_vocab")
    similarity: str = _field("soft_wpmi", "Similarity function of --scorer (jaxdissect.explain.open_vocab): "
                             "soft_wpmi, wpmi, cos_similarity, cos_similarity_cubed or rank_reorder.", "addon",
                             group="open_vocab")
    similarity_top_k: int | None = _field(None, "Top images per unit of --similarity=soft_wpmi or wpmi (default "
                                          "100 or 28, CLIP-Dissect's); at most the number of images.", "addon",
                                          group="open_vocab")
    basis: str | None = _field(None, "Dissect each layer in these bases, ';'-separated: neurons, "
                               "rotation:ALPHA[:SEED], sae:EXPANSION[,k=K] (a TopK sparse autoencoder), "
                               "probe:net2vec (concept directions); e.g. 'neurons;sae:8,k=32'. Learned bases are "
                               "trained from this run's data and kept in the per-user cache (jaxdissect.bases).",
                               "addon", group="bases")
    sae_batches: int = _field(200, "Training batches of each sae: basis (--batch_size images each; every "
                              "position of the feature map is a sample; the data repeats in new orders).",
                              "addon", group="bases")
    sae_minibatch: int = _field(4096, "Positions per Adam step of sae: training.", "addon", group="bases")
    sae_learning_rate: float = _field(1e-3, "Adam learning rate of sae: training.", "addon", group="bases")
    probe_epochs: int = _field(10, "Training epochs of probe: bases (every 5th image is held out).", "addon",
                               group="bases")
    # -- run -------------------------------------------------------------------------------------------------
    checkpoint_every: int = _field(50, "Batches between checkpoints of the streaming passes.", "run")
    activation_cache_mb: int = _field(1024, "Host memory for keeping activations and labels between passes (the "
                                      "model and segmenter then run once per image); 0 = recompute.", "run")
    segmentation_cache_mb: int | None = _field(None, "Size budget of the segmentation cache in MiB (None: "
                                               "unbounded).", "run", flag=False)

    def __post_init__(self):
        _validate(self)

    # -- derived values ----------------------------------------------------------------------------------------
    @property
    def level_quantile(self) -> float:
        """``quantile``, or the method's default (0.01; 0.005 for the 2017 method)."""
        if self.quantile is not None:
            return float(self.quantile)
        return 0.005 if self.method == "netdissect2017" else 0.01

    @property
    def bases(self) -> str | None:
        """The bases to dissect: ``basis``, or ``rotation:<rotation>`` (``rotation`` names the same basis)."""
        if self.basis is not None:
            return self.basis
        if not self.rotation:
            return None
        from jaxdissect.bases.spec import BasisSpec
        from jaxdissect.rotation import parse_rotation

        alpha, seed = parse_rotation(self.rotation)
        return BasisSpec("rotation", alpha=alpha, seed=seed).text

    def addon_on(self, group: str) -> bool:
        """Whether the add-on ``group`` (``'explain'``, ``'label_metrics'``) runs."""
        return bool(ADDONS[group](self))

    def replace(self, **changes) -> "DissectConfig":
        """A copy with ``changes`` (field names; an unknown name is an error listing the fields)."""
        unknown = sorted(set(changes) - set(_FIELD_NAMES))
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; a dissection has: {', '.join(_FIELD_NAMES)}")
        return dataclasses.replace(self, **changes)

    def identity(self) -> dict:
        """The JSON-able settings that determine the results: a run resumes only under the same identity.

        Every ``input`` and ``method`` field; ``addon`` fields only when their
        add-on is on; never ``run`` fields.
        """
        out = {}
        for f in dataclasses.fields(self):
            role, group = f.metadata["role"], f.metadata["group"]
            if role == "run" or (role == "addon" and not self.addon_on(group)):
                continue
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # -- flags -------------------------------------------------------------------------------------------------
    @classmethod
    def define_flags(cls, skip=(), defaults: Mapping[str, Any] | None = None, only=None) -> None:
        """Define one absl flag per field (help and default from the field); ``skip``/``only`` select fields,
        ``defaults`` overrides a default (e.g. another launcher's method)."""
        from absl import flags

        flags.disclaim_key_flags()  # the flags belong to the launcher that defines them (its --help lists them)
        defaults = dict(defaults or {})
        for f in dataclasses.fields(cls):
            if not f.metadata["flag"] or f.name in skip or (only is not None and f.name not in only):
                continue
            default = defaults.get(f.name, f.default)
            kind = _flag_kind(f)
            define = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer, "float": flags.DEFINE_float,
                      "str": flags.DEFINE_string}[kind]
            if f.name == "method":
                flags.DEFINE_enum(f.name, default, list(METHODS), f.metadata["help"])
            elif f.name == "geometry":
                flags.DEFINE_enum(f.name, default, list(GEOMETRIES), f.metadata["help"])
            elif f.name == "on_bad_image":
                flags.DEFINE_enum(f.name, default, ["raise", "skip"], f.metadata["help"])
            else:
                define(f.name, default, f.metadata["help"])

    @classmethod
    def flag_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.metadata["flag"]]


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(DissectConfig))
ADDONS = {
    "explain": lambda c: c.formulas or c.significance,
    "label_metrics": lambda c: c.label_metrics,
    "open_vocab": lambda c: c.scorer is not None,
    "bases": lambda c: c.basis is not None,
}
TOP_K_SIMILARITIES = ("soft_wpmi", "wpmi")   # the similarity functions with a top_k


def _flag_kind(f) -> str:
    kind = str(f.type).split("|")[0].strip()
    return kind if kind in ("bool", "int", "float") else "str"


def _plain(value):
    """JSON-able form of a field value (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _positive(c, name, allow_none=True):
    value = getattr(c, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{{{name}}}={value}: must be a positive integer")


def _interval(c, name, low_open=True):
    value = getattr(c, name)
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value > 0 if low_open else value >= 0) and value < 1
    if not ok:
        raise ConfigError(f"{{{name}}}={value}: must lie in {'(' if low_open else '['}0, 1)")


def _validate(c: DissectConfig) -> None:
    """Every check that needs no data or model (the launcher's and dissect()'s, written once)."""
    for name in ("topk", "thumbsize", "checkpoint_every"):
        _positive(c, name, allow_none=False)
    for name in ("batch_size", "num_images"):
        _positive(c, name)
    _interval(c, "quantile")
    _interval(c, "miniou", low_open=False)
    _interval(c, "q")
    if c.method not in METHODS:
        raise ConfigError(f"{{method}} must be one of {', '.join(METHODS)}, got {c.method!r}")
    if c.geometry is not None and c.geometry not in GEOMETRIES:
        raise ConfigError(f"{{geometry}} must be one of {', '.join(GEOMETRIES)}, got {c.geometry!r}")
    if c.on_bad_image not in ("raise", "skip"):
        raise ConfigError(f"{{on_bad_image}}={c.on_bad_image}: use raise or skip")
    if isinstance(c.activation_cache_mb, bool) or not isinstance(c.activation_cache_mb, int) \
            or c.activation_cache_mb < 0:
        raise ConfigError(f"{{activation_cache_mb}}={c.activation_cache_mb}: give a size in MiB >= 0 (0 recomputes "
                          "the activations in every pass)")
    if c.segmentation_cache_mb is not None and c.segmentation_cache_mb < 0:
        raise ConfigError(f"{{segmentation_cache_mb}}={c.segmentation_cache_mb}: give a size in MiB >= 0")
    if isinstance(c.formulas, bool) or not isinstance(c.formulas, int) or c.formulas < 0:
        raise ConfigError(f"{{formulas}}={c.formulas}: give the formula length (>= 1) or 0 for none")
    if c.exact_formulas and not c.formulas:
        raise ConfigError("{exact_formulas} needs {formulas}=N (the formula length), e.g. {formulas}=3")
    if c.significance:
        _positive(c, "permutations", allow_none=False)
    _validate_open_vocab(c)
    if c.rotation:
        from jaxdissect.rotation import RotationError, parse_rotation

        try:
            parse_rotation(c.rotation)
        except RotationError as e:
            raise ConfigError(str(e).replace("{", "{{").replace("}", "}}")) from None
    if c.basis is not None:
        _validate_bases(c)
    if c.resolution is not None:
        try:
            ok = len(tuple(c.resolution)) == 2 and all(int(s) > 0 for s in c.resolution)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{{resolution}}={c.resolution!r}: give a pair (S, S) of positive sizes")
    if c.geometry is not None and c.geometry != "receptive_field" and c.receptive_field is not None:
        raise ConfigError(f"{{receptive_field}} is given but {{geometry}} is {c.geometry!r}; pass "
                          "geometry='receptive_field' to use it")
    if c.receptive_field is not None:
        receptive_field_options("receptive_field", c.receptive_field)


def _validate_open_vocab(c: DissectConfig) -> None:
    if c.scorer is None:
        given = [n for n in ("vocabulary", "similarity_top_k") if getattr(c, n) is not None]
        if c.similarity != "soft_wpmi":
            given.append("similarity")
        if given:
            raise ConfigError(f"{', '.join('{' + n + '}' for n in given)} set{'s' if len(given) == 1 else ''} "
                              "the open-vocabulary labels, which need {scorer}, e.g. {scorer}=clip:ViT-B/16 or "
                              "{scorer}=labels")
        return
    if not isinstance(c.scorer, str) or not c.scorer.strip():
        raise ConfigError(f"{{scorer}}={c.scorer!r}: give clip:ViT-B/16, clip:RN50, labels, a registry name or a "
                          "converted CLIP directory")
    from jaxdissect.explain.open_vocab import SIMILARITIES

    if c.similarity not in SIMILARITIES:
        raise ConfigError(f"{{similarity}}={c.similarity}: choose one of {', '.join(SIMILARITIES)}")
    if c.similarity_top_k is not None:
        _positive(c, "similarity_top_k")
        if c.similarity not in TOP_K_SIMILARITIES:
            raise ConfigError(f"{{similarity_top_k}} applies to {' and '.join(TOP_K_SIMILARITIES)}, not "
                              f"{{similarity}}={c.similarity}; drop it")
    if c.vocabulary is not None and (not isinstance(c.vocabulary, str) or not c.vocabulary.strip()):
        raise ConfigError(f"{{vocabulary}}={c.vocabulary!r}: give 20k, broden or a word-list file")


def _validate_bases(c: DissectConfig) -> None:
    from jaxdissect.bases import BasisError, spec

    if c.rotation:
        raise ConfigError("give {basis}=rotation:ALPHA[:SEED] or {rotation}=ALPHA[:SEED], not both (they name "
                          "the same basis)")
    try:
        spec.parse_list(c.basis)
    except BasisError as e:
        raise ConfigError(f"{{basis}}={c.basis!r}: " + str(e).replace("{", "{{").replace("}", "}}")) from None
    for name in ("sae_batches", "sae_minibatch", "probe_epochs"):
        _positive(c, name, allow_none=False)
    lr = c.sae_learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"{{sae_learning_rate}}={lr}: must be a positive number")


def receptive_field_options(geometry: str | None, receptive_field) -> dict:
    """``Plan`` keywords (``convolutions``, ``image_size``) of a geometry; empty unless receptive_field.

    ``receptive_field`` is ``{'convolutions': [(kernel, stride, padding,
    dilation), ...], 'image_size': N}`` (a converted AlexNet's model.json
    records it as ``metadata['upsample']``).
    """
    from jaxdissect.kernels import upsample as upsample_k

    if geometry not in (None,) + GEOMETRIES:
        raise DissectError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    if geometry != "receptive_field":
        if receptive_field is not None:
            raise DissectError(f"receptive_field is given but geometry is {geometry!r}; pass "
                               "geometry='receptive_field' to use it")
        return {}
    if not isinstance(receptive_field, Mapping) or "convolutions" not in receptive_field:
        raise DissectError("geometry='receptive_field' needs receptive_field={'convolutions': [(kernel, stride, "
                           "padding, dilation), ...], 'image_size': N} (a converted AlexNet's model.json "
                           "records it as metadata['upsample'])")
    try:
        convs = tuple(tuple(int(v) for v in c) for c in receptive_field["convolutions"])
        size = receptive_field.get("image_size")
        size = None if size is None else int(size)
    except (TypeError, ValueError) as e:
        raise DissectError(f"receptive_field: convolutions must be (kernel, stride, padding, dilation) integer "
                           f"tuples and image_size an integer ({e})") from None
    if not convs or any(len(c) != 4 or c[0] < 1 or c[1] < 1 or c[2] < 0 or c[3] < 1 for c in convs):
        raise DissectError(f"receptive_field: convolutions must be a non-empty list of (kernel >= 1, stride >= 1, "
                           f"padding >= 0, dilation >= 1), got {receptive_field['convolutions']!r}")
    if size is not None and upsample_k.conv_output_size(size, convs) < 1:
        raise DissectError(f"receptive_field: image_size {size} is too small for the convolutions")
    extra = set(receptive_field) - {"convolutions", "image_size"}
    if extra:
        raise DissectError(f"receptive_field: unknown keys {sorted(extra)}; use convolutions and image_size")
    return {"convolutions": convs, "image_size": size}


def create(config: DissectConfig | Mapping[str, Any] | None = None, **overrides) -> DissectConfig:
    """A config from ``config`` (a :class:`DissectConfig`, a ``{field: value}`` dict or None for the
    defaults) with ``overrides``; every value is validated and unknown names are errors."""
    if config is None:
        config = DissectConfig()
    elif isinstance(config, Mapping):
        config = DissectConfig().replace(**dict(config))
    elif not isinstance(config, DissectConfig):
        raise ConfigError(f"config must be a DissectConfig or a dict of settings, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


def load(spec: str) -> DissectConfig:
    """The config of a config file ``path.py[:arg]`` (its ``get_config(arg)``; ``arg`` None when absent)."""
    path, _, arg = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; give path/to/config.py[:variant], e.g. "
                          "configs/demo.py:tiny".replace("{", "{{").replace("}", "}}"))
    module_spec = importlib.util.spec_from_file_location(f"_jaxdissect_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config(arg=None)")
    try:
        config = module.get_config(arg or None)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: {e}".replace("{", "{{").replace("}", "}}")) from None
    if not isinstance(config, DissectConfig):
        raise ConfigError(f"{path}: get_config({arg!r}) returned {type(config).__name__}, not a DissectConfig")
    return config
