"""Open-vocabulary labels inside ``jaxdissect.dissect``: CLIP-Dissect as a driver strategy.

``dissect(..., scorer="clip:ViT-B/16")`` (``launch.dissect --scorer=...``) labels
every unit of every dissected layer with a concept of a vocabulary, in the same
passes as the IoU labels (Oikarinen & Weng, ICLR 2023; the scores are
:mod:`jaxdissect.explain.open_vocab`'s):

* **pooled activations** ``[images, units]``: a unit's value per image is the
  spatial mean of its map (a CNN layer, or a ViT layer on its patch grid) or
  its one value (a ``[N, U]`` layer: a dense layer, a ViT block's ``_cls``
  token), CLIP-Dissect's ``pool_mode='avg'``;
* **the concept matrix** ``clip_feats [images, concepts]``, from a scorer:
  a CLIP model (``clip:ViT-B/16``, ``clip:RN50``, a registry name of kind
  ``scorer`` or a converted CLIP directory): cosine similarity of the image
  embedding of what the model saw (``display``, resized and normalised by
  :func:`~jaxdissect.models.clip.clip_preprocess` on the device, in pass 1)
  and the text embeddings of the vocabulary (computed once per model and
  vocabulary and kept in the per-user cache); or ``labels``: the run's own
  labels, 1 where the label is anywhere in the image (a pixel of any channel,
  or an image-level label) else 0, and 1 for the image's class (data sources
  with classes), gathered in pass 3; no vision-language model. Presence, not
  pixel fractions: image-level labels and classes are then on the scale of
  the segmented ones;
* **labels**: each unit's best concept under the similarity function (default
  ``soft_wpmi``), its score and its top five concepts.

Beside the IoU label (when the run has labels) the report shows:

* ``agreement``: ``same`` when the two labels name one concept (after cleaning
  Broden's names: category suffix dropped, ``_`` made spaces, lower case),
  ``word`` when they share a word (words of letters and digits, a final ``s``
  of a word longer than three letters dropped, ``a an the of and or in on
  with`` ignored), else ``none``; empty for a unit without an IoU label (no
  labels, never fires, IoU 0). ``iou_label_rank``: the IoU label's rank among
  the unit's open-vocabulary scores (1 = the open-vocabulary label), when the
  vocabulary holds it;
* with ``significance``: an image-permutation p-value of the unit's
  open-vocabulary score (null: images exchangeable, the concept matrix's rows
  permuted, statistic the best score over all concepts, so choosing among the
  concepts is accounted for; ``permutations`` draws, ``p = (1 + #{null >=
  observed}) / (1 + permutations)``) and Benjamini-Hochberg q-values over the
  layer's units (:func:`jaxdissect.explain.significance.benjamini_hochberg`);
* with ``label_metrics``, where the open-vocabulary label is one of the run's
  labels (or classes): the label metrics of :mod:`jaxdissect.explain.unit_metrics`
  at image level (the unit's max raw activation per image, the label anywhere
  in the image, binary metrics above the unit's threshold), the metrics that
  pass NeuronEval's missing- and extra-labels checks, as for the IoU label.

Host memory: per layer two ``[images, units]`` float32 tables (pooled values,
and the per-image maxima with ``label_metrics``), ``[images, D]`` image
embeddings (CLIP) and ``[images, labels]`` booleans (``labels``, metrics), all
checkpointed with their pass; the scores ``[units, concepts]`` per layer at the
end (:mod:`jaxdissect.explain.open_vocab` bounds the rest).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from jaxdissect.config import ConfigError, DissectConfig, DissectError
from jaxdissect.driver import Strategy, Tap, array_digest
from jaxdissect.explain import open_vocab
from jaxdissect.vocabularies import NAMED, VocabularyError, broden_concepts, load_vocabulary

LABELS = "labels"
# CLIP-Dissect's names of OpenAI's models -> the registry's.
CLIP_ALIASES = {"clip:ViT-B/16": "clip_vit_b16", "clip:RN50": "clip_rn50"}
TOP = 5
STOPWORDS = frozenset({"a", "an", "the", "of", "and", "or", "in", "on", "with"})
AGREEMENT = ("same: the two labels name one concept (Broden names cleaned: category suffix dropped, '_' made "
             "spaces, lower case); word: they share a word (a final s of words over three letters dropped; a, an, "
             "the, of, and, or, in, on, with ignored); none: neither; empty where the unit has no IoU label")
POOLING = ("spatial mean of each unit's map ([N, H, W, U] layers, a ViT's patch grid); the value itself for "
           "[N, U] layers (dense layers, a ViT block's _cls token)")


# --------------------------------------------------------------------------
# Scorer and vocabulary


def known_scorers() -> list[str]:
    """Every ``scorer`` name: ``labels``, CLIP-Dissect's ``clip:`` names and the registry's scorers."""
    from jaxdissect import zoo

    return [LABELS, *CLIP_ALIASES, *sorted(n for n, e in zoo.entries().items() if e.kind == "scorer")]


def resolve_scorer(spec: str, fetch: bool = True) -> str | None:
    """``None`` for ``labels``, else a converted CLIP directory (a registry name fetched when ``fetch``).

    An unknown name is a one-line :class:`~jaxdissect.config.ConfigError` listing the known ones.
    """
    from jaxdissect import zoo

    if spec == LABELS:
        return None
    name = CLIP_ALIASES.get(spec, spec)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if name in {n for n, e in zoo.entries().items() if e.kind == "scorer"}:
        return zoo.model_dir(name, flag="scorer", kind="scorer", fetch_now=True) if fetch else name
    known = ", ".join(known_scorers())
    raise ConfigError("{scorer}=" + _escaped(spec) + ": neither a known scorer nor a converted CLIP directory; "
                      f"known scorers: {_escaped(known)} (python -m jaxdissect.zoo list)")


def _escaped(text: str) -> str:
    """``text`` inside a :class:`ConfigError` template (braces doubled)."""
    return str(text).replace("{", "{{").replace("}", "}}")


def label_concepts(label_names: Sequence[str], class_names: Sequence[str] = ()) -> tuple[list, np.ndarray, np.ndarray]:
    """The ``labels`` scorer's concepts: ``(concepts, concept of each label [L], concept of each class [K])``.

    Label names are cleaned as :func:`jaxdissect.vocabularies.broden_concepts`
    (label 0, the "no label", maps to -1); classes follow, a class whose cleaned
    name is already a concept sharing its column.
    """
    concepts: list[str] = []
    index: dict[str, int] = {}

    def column(name):
        cleaned = broden_concepts([name])
        if not cleaned:
            return -1
        if cleaned[0] not in index:
            index[cleaned[0]] = len(concepts)
            concepts.append(cleaned[0])
        return index[cleaned[0]]

    labels = np.array([-1] + [column(n) for n in list(label_names)[1:]], np.int64)
    classes = np.array([column(n) for n in class_names], np.int64)
    return concepts, labels, classes


def vocabulary_concepts(config: DissectConfig, label_names: Sequence[str] | None,
                        class_names: Sequence[str] = ()) -> tuple[list[str], np.ndarray | None]:
    """``(concepts, columns)``: the scorer's concepts, and for ``labels`` which of :func:`label_concepts`'
    columns they are (None for CLIP). Vocabulary errors are one line.

    ``label_names``: the run's labels (``[]`` or ``['-']``: none); None when they are not known yet (a
    segmenter's, before it is loaded): then only what can be checked is, and the concepts may be empty.
    """
    unknown_labels = label_names is None
    labelled = unknown_labels or len(label_names) > 1
    spec = config.vocabulary
    if config.scorer != LABELS:
        if unknown_labels and spec == "broden":
            return [], None
        return load_vocabulary(spec or "20k", label_names=label_names if labelled else None), None
    if not labelled and not class_names:
        raise ConfigError("{scorer}=labels scores units with the run's own labels, but it has none; use "
                          "{segmenter}=dataset (or a segmenter), or a CLIP scorer, e.g. {scorer}=clip:ViT-B/16")
    if spec in NAMED:
        raise ConfigError(f"{{vocabulary}}={spec}: {{scorer}}=labels names units with the run's label and class "
                          "names only; leave {vocabulary} out (all of them), or give broden or a file of some")
    if unknown_labels:
        return (load_vocabulary(spec) if spec not in (None, "broden") else []), None
    every, _, _ = label_concepts(label_names if labelled else ["-"], class_names)
    if spec is None:
        return every, np.arange(len(every))
    if spec == "broden":
        chosen = label_concepts(label_names if labelled else ["-"])[0]
    else:
        chosen = load_vocabulary(spec)
        unknown = [w for w in chosen if w not in every]
        if unknown:
            raise VocabularyError(f"{spec}: {len(unknown)} concepts are not labels of the data, e.g. "
                                  f"{', '.join(map(repr, unknown[:5]))}; {LABELS} scores only its labels and classes "
                                  f"({', '.join(every[:8])}{' ...' if len(every) > 8 else ''})")
    return chosen, np.array([every.index(w) for w in chosen], np.int64)


def resolve_top_k(config: DissectConfig, images: int) -> dict:
    """The similarity function's keywords (``top_k`` of soft_wpmi/wpmi); a one-line error when the
    images are too few for it."""
    import inspect

    fn = open_vocab.similarity(config.similarity)
    if config.similarity == "rank_reorder":
        fraction = inspect.signature(fn).parameters["top_fraction"].default
        if int(images * fraction) < 1:
            raise ConfigError(f"{{similarity}}=rank_reorder ranks each unit's top {fraction:.0%} of the images, "
                              f"none of {images}; dissect at least {int(np.ceil(1 / fraction))} images")
        return {}
    if "top_k" not in inspect.signature(fn).parameters:
        return {}
    top_k = config.similarity_top_k or inspect.signature(fn).parameters["top_k"].default
    if top_k > images:
        given = "" if config.similarity_top_k else f" ({config.similarity}'s default, CLIP-Dissect's)"
        raise ConfigError(f"{{similarity_top_k}}={top_k}{given} is more than the {images} images dissected; give "
                          f"{{similarity_top_k}}={images} or fewer, or dissect more images")
    return {"top_k": int(top_k)}


def check_settings(config: DissectConfig, images: int, label_names: Sequence[str] | None,
                   class_names: Sequence[str] = ()) -> None:
    """Every check of the open-vocabulary settings that needs no model (a launcher's, before any work)."""
    resolve_scorer(config.scorer, fetch=False)
    vocabulary_concepts(config, label_names, class_names)
    resolve_top_k(config, images)


# --------------------------------------------------------------------------
# Agreement


def _words(label: str) -> tuple[str, set]:
    cleaned = broden_concepts([label])
    text = " ".join(cleaned[0].lower().split()) if cleaned else ""
    words = {w[:-1] if w.endswith("s") and len(w) > 3 else w for w in re.findall(r"[a-z0-9]+", text)}
    return text, words - STOPWORDS


def agreement(a: str, b: str) -> str | None:
    """``'same'``, ``'word'`` or ``'none'`` (see :data:`AGREEMENT`); None when either label is empty."""
    (ta, wa), (tb, wb) = _words(a), _words(b)
    if not ta or not tb:
        return None
    if ta == tb:
        return "same"
    return "word" if wa & wb else "none"


def final_layer_accuracy(labels: Sequence[str], class_names: Sequence[str]) -> float:
    """CLIP-Dissect's headline measure: the fraction of output units ``u`` labelled with class ``u``'s name."""
    if len(labels) != len(class_names):
        raise ValueError(f"{len(labels)} unit labels for {len(class_names)} classes")
    return float(np.mean([agreement(a, b) == "same" for a, b in zip(labels, class_names)]))


# --------------------------------------------------------------------------
# Device functions and host folds


@dataclasses.dataclass(frozen=True)
class _Pooled:
    """Pass 1: each view's pooled ``[b, U]`` (and per-image max), and CLIP image embeddings of ``display``."""

    views: tuple
    maxima: bool
    clip: Any = None          # the CLIP module (hashable), or None
    resolution: int = 224

    def __call__(self, state, params, acts, batch):
        import jax.numpy as jnp

        from jaxdissect.models.clip import clip_preprocess

        out = {"pooled": {v: jnp.mean(acts[v], axis=(1, 2)) for v in self.views}}
        if self.maxima:
            out["max"] = {v: jnp.max(acts[v], axis=(1, 2)) for v in self.views}
        if self.clip is not None:
            images = clip_preprocess(jnp.asarray(batch["display"], jnp.float32) / 255.0, self.resolution)
            out["embedding"] = self.clip.apply(params, images, method="encode_image").astype(jnp.float32)
        return state, out


@dataclasses.dataclass(frozen=True)
class _Presence:
    """Pass 3: per image whether each label is in it (a pixel of any channel, or an image-level label), its class."""

    num_labels: int
    classes: bool

    def __call__(self, state, params, acts, batch):
        import jax
        import jax.numpy as jnp

        seg = jnp.asarray(batch["seg"], jnp.int32)
        b, k, s1, s2 = seg.shape
        rows = jnp.repeat(jnp.arange(b), k * s1 * s2)
        present = jnp.zeros((b, self.num_labels), bool).at[rows, seg.reshape(-1)].set(True, mode="drop")
        image_labels = batch.get("image_labels")
        if image_labels is not None:
            img = jnp.asarray(image_labels, jnp.int32)
            present = present | (jax.nn.one_hot(img, self.num_labels) > 0).any(1)   # -1 (none): all zeros
        out = {"present": present}
        if self.classes:
            out["class"] = jnp.asarray(batch["label"], jnp.int32)
        return state, out


def _fold_rows(host, outputs, batch):
    """Write each valid image's rows at its index (every leaf of ``outputs`` is ``[B, ...]``)."""
    valid = np.asarray(batch["valid"], bool)
    index = np.asarray(batch["index"])[valid]

    def put(target, value):
        if isinstance(target, dict):
            return {k: put(target[k], value[k]) for k in target}
        target[index] = np.asarray(value)[valid]
        return target

    out = {k: put(host[k], outputs[k]) for k in host if k != "seen"}
    out["seen"] = host["seen"]
    out["seen"][index] = True
    return out


# --------------------------------------------------------------------------
# The strategy


class CLIPScorer:
    """A converted CLIP model: its image tower in the pass, its text embeddings of the vocabulary (cached)."""

    def __init__(self, directory: str):
        from jaxdissect.checkpoint import load_metadata, load_model
        from jaxdissect.models.clip import CLIP
        from jaxdissect.segmentation.cache import variables_digest

        self.directory = directory
        self.module, self.variables = load_model(directory)
        if not isinstance(self.module, CLIP):
            raise ConfigError(f"{{scorer}}={directory} holds a {type(self.module).__name__}, not a CLIP model "
                              "(python -m converters.clip, or a registry name such as clip_vit_b16)")
        metadata = load_metadata(directory) or {}
        self.name = metadata.get("architecture") or os.path.basename(os.path.normpath(directory))
        self.model_id = metadata.get("source_sha256") or variables_digest(self.variables)

    def text_embeddings(self, concepts: Sequence[str], cache_dir: str) -> np.ndarray:
        import jax

        from jaxdissect.tokenizer import ClipTokenizer
        from jaxdissect.vocabularies import text_embeddings

        tokenizer = ClipTokenizer.from_model_dir(self.directory)
        encode = jax.jit(lambda v, t: self.module.apply(v, t, method="encode_text"))
        return text_embeddings(lambda t: encode(self.variables, t), tokenizer, concepts, model_id=self.model_id,
                               cache_dir=cache_dir)


class OpenVocab(Strategy):
    """CLIP-Dissect labels of every unit (see the module docstring); built by :meth:`from_run`.

    ``concepts``: the vocabulary; ``clip``: a :class:`CLIPScorer` (None: the
    ``labels`` scorer, ``columns`` then picks its concepts among
    :func:`label_concepts`'); ``similarity`` and its ``kwargs``;
    ``permutations`` (0: no p-values) at FDR ``q``; ``metrics``: image-level
    label metrics of the open-vocabulary label; ``label_names``/``class_names``
    of the run (for ``labels`` and the metrics).
    """

    name = "open_vocab"

    def __init__(self, concepts, *, clip: CLIPScorer | None = None, text: np.ndarray | None = None,
                 columns=None, similarity: str = "soft_wpmi", kwargs: Mapping | None = None,
                 permutations: int = 0, q: float = 0.05, metrics: bool = False,
                 label_names: Sequence[str] | None = None, class_names: Sequence[str] = (), scorer: str = ""):
        self.concepts, self.clip, self.text = list(concepts), clip, text
        self.columns = None if columns is None else np.asarray(columns, np.int64)
        self.similarity, self.kwargs = similarity, dict(kwargs or {})
        self.permutations, self.q, self.metrics = int(permutations), float(q), bool(metrics)
        self.label_names = list(label_names or [])
        self.class_names = list(class_names)
        self.scorer = scorer or (LABELS if clip is None else clip.name)
        self.labelled = len(self.label_names) > 1
        self.metrics = self.metrics and (self.labelled or bool(self.class_names))
        if clip is None and not (self.labelled or self.class_names):
            raise ConfigError("{scorer}=labels needs labels: the run has none")

    @classmethod
    def from_run(cls, config: DissectConfig, run) -> "OpenVocab":
        """The strategy of a :class:`jaxdissect.pipelines.dissect.Dissection`'s config (its tables, data,
        images and cache directory)."""
        from jaxdissect.fileio import default_cache_dir

        names = list(run.tables.label_names or [])
        classes = list(getattr(run.data, "class_names", None) or []) if "label" in run.probe else []
        try:
            concepts, columns = vocabulary_concepts(config, names, classes)
            kwargs = resolve_top_k(config, run.num_images)
            directory = resolve_scorer(config.scorer)
        except VocabularyError as e:
            raise DissectError(f"vocabulary: {e}") from None
        clip = text = None
        if directory is not None and run.generator:
            raise ConfigError("{scorer}: a CLIP scorer embeds the images a classifier reads; a generator's images "
                              "are its output, which the passes do not keep; use {scorer}=labels (a segmenter's "
                              "labels of the generated images)")
        if directory is not None:
            clip = CLIPScorer(directory)
            text = clip.text_embeddings(concepts, run.cache_dir or default_cache_dir())
        return cls(concepts, clip=clip, text=text, columns=columns, similarity=config.similarity, kwargs=kwargs,
                   permutations=config.permutations if config.significance else 0, q=config.q,
                   metrics=config.label_metrics, label_names=names, class_names=classes, scorer=config.scorer)

    # -- the passes ---------------------------------------------------------------------------------------
    def check(self, driver):
        import jax

        if jax.process_count() > 1:
            raise DissectError("open-vocabulary labels run in one process; drop scorer for a multi-host run")

    def identity(self):
        """What the labels depend on beyond the config: the concepts and the scorer's weights."""
        return {"concepts": array_digest(np.frombuffer("\n".join(self.concepts).encode("utf-8"), np.uint8)),
                "scorer": self.clip.model_id if self.clip is not None else LABELS}

    def needs_presence(self) -> bool:
        """Whether pass 3 records the labels per image: the ``labels`` scorer's concepts, or the metrics."""
        return (self.labelled or bool(self.class_names)) and (self.clip is None or self.metrics)

    def tap(self, pass_name, driver):
        n = driver.num_images
        if pass_name == "pass1":
            units = {v: p.num_units for v, p in driver.plans.items()}
            host = {"pooled": {v: np.zeros((n, u), np.float32) for v, u in units.items()},
                    "seen": np.zeros((n,), bool)}
            if self.metrics:
                host["max"] = {v: np.zeros((n, u), np.float32) for v, u in units.items()}
            params = {}
            if self.clip is not None:
                host["embedding"] = np.zeros((n, self.text.shape[1]), np.float32)
                params = self.clip.variables
            update = _Pooled(tuple(driver.views), self.metrics, self.clip.module if self.clip else None,
                             self.clip.module.image_resolution if self.clip else 224)
            return Tap(update=update, params=params, host_init=host, fold=_fold_rows,
                       keys=("display",) if self.clip is not None else (),
                       identity={"open_vocab": self.identity(), "maxima": self.metrics})
        if pass_name == "pass3" and self.needs_presence():
            host = {"present": np.zeros((n, len(self.label_names)), bool), "seen": np.zeros((n,), bool)}
            if self.class_names:
                host["class"] = np.full((n,), -1, np.int64)
            return Tap(update=_Presence(len(self.label_names), bool(self.class_names)), host_init=host,
                       fold=_fold_rows, keys=("label",) if self.class_names else ())
        return None

    @property
    def cache_keys(self):
        return ("label",) if self.class_names and self.needs_presence() else ()

    # -- after the passes ------------------------------------------------------------------------------------
    def concept_matrix(self, pass1: Mapping, pass3: Mapping | None) -> tuple[np.ndarray, np.ndarray]:
        """``(clip_feats [images, concepts], seen [N])`` over the images read."""
        seen = np.asarray(pass1["seen"], bool)
        if self.clip is not None:
            return open_vocab.concept_activations(pass1["embedding"][seen], self.text), seen
        every, label_column, class_column = label_concepts(self.label_names if self.labelled else ["-"],
                                                           self.class_names)
        feats = np.zeros((int(seen.sum()), len(every)), np.float32)
        if self.labelled:
            present = pass3["present"][seen]
            for label in np.flatnonzero(label_column >= 0):
                c = label_column[label]
                feats[:, c] = np.maximum(feats[:, c], present[:, label])
        if self.class_names:
            cls = pass3["class"][seen]
            ok = cls >= 0
            feats[np.flatnonzero(ok), class_column[cls[ok]]] = 1.0
        return feats[:, self.columns], seen

    def presence(self, concept: int, pass3: Mapping, seen) -> np.ndarray | None:
        """Bool ``[images]``: the concept (a label or class of the run) is in the image; None if it is neither."""
        every, label_column, class_column = label_concepts(self.label_names if self.labelled else ["-"],
                                                           self.class_names)
        name = self.concepts[concept]
        if name not in every:
            return None
        c = every.index(name)
        out = np.zeros(int(seen.sum()), bool)
        if self.labelled:
            out |= pass3["present"][seen][:, label_column == c].any(1)
        if self.class_names:
            out |= np.isin(pass3["class"][seen], np.flatnonzero(class_column == c))
        return out

    def finish(self, driver, taps):
        pass1 = taps["pass1"][1]
        pass3 = taps["pass3"][1] if "pass3" in taps else None
        clip_feats, seen = self.concept_matrix(pass1, pass3)
        fn = open_vocab.similarity(self.similarity)
        driver.log(f"open-vocabulary labels: {self.similarity} over {clip_feats.shape[0]} images x "
                   f"{clip_feats.shape[1]} concepts" + (f", {self.permutations} permutations" if self.permutations
                                                         else ""))
        perms = [np.random.default_rng([0, i]).permutation(clip_feats.shape[0]) for i in range(self.permutations)]
        out = {}
        for v in driver.views:
            target = pass1["pooled"][v][seen]
            scores = fn(clip_feats, target, **self.kwargs)
            units = self.units(scores, driver.results[v])
            if perms:
                from jaxdissect.explain.significance import benjamini_hochberg

                best = scores.max(1)
                exceed = np.zeros(len(best), np.int64)
                for perm in perms:
                    exceed += fn(clip_feats[perm], target, **self.kwargs).max(1) >= best
                p = (1.0 + exceed) / (1.0 + len(perms))
                significant, adjusted = benjamini_hochberg(p, self.q)
                for u, entry in enumerate(units):
                    entry.update(ov_p_value=float(p[u]), ov_q_value=float(adjusted[u]),
                                 ov_significant=bool(significant[u]))
            if self.metrics and pass3 is not None:
                self.add_metrics(units, scores.argmax(1), pass1["max"][v][seen], pass3, seen,
                                 driver.results[v].thresholds)
            out[v] = units
        return out

    def units(self, scores, result) -> list[dict]:
        """Per unit: label, score, top concepts, agreement and rank of the IoU label."""
        order = np.argsort(-scores, axis=1, kind="stable")
        names = result.label_names or []
        dead = np.asarray(result.active) == 0
        out = []
        for u in range(scores.shape[0]):
            best = order[u, 0]
            entry = {"ov_label": self.concepts[best], "ov_score": float(scores[u, best]),
                     "ov_top": [[self.concepts[c], float(scores[u, c])] for c in order[u, :TOP]]}
            label = int(result.label[u])
            iou_label = names[label] if 0 < label < len(names) and not dead[u] and result.label_iou[u] > 0 else ""
            entry["agreement"] = agreement(self.concepts[best], iou_label) if iou_label else None
            cleaned = broden_concepts([iou_label]) if iou_label else []
            if cleaned and cleaned[0] in self.concepts:
                c = self.concepts.index(cleaned[0])
                entry["iou_label_rank"] = int(np.flatnonzero(order[u] == c)[0]) + 1
            else:
                entry["iou_label_rank"] = None
            out.append(entry)
        return out

    def add_metrics(self, units, best, maxima, pass3, seen, thresholds) -> None:
        """Image-level label metrics of each unit against its open-vocabulary label, where the run has it."""
        from jaxdissect.explain import unit_metrics

        present = {c: self.presence(c, pass3, seen) for c in set(best.tolist())}
        columns = [u for u in range(len(units)) if present[int(best[u])] is not None]
        for u in range(len(units)):
            units[u]["ov_metrics"] = None
        if not columns:
            return
        table = np.stack([present[int(best[u])] for u in columns], 1)
        found = unit_metrics.image_metrics(maxima[:, columns], table, np.asarray(thresholds)[columns])
        for i, u in enumerate(columns):
            units[u]["ov_metrics"] = {"image": {m: float(found[m][i]) for m in unit_metrics.METRIC_NAMES}}

    # -- outputs -------------------------------------------------------------------------------------------
    def unit_fields(self, view, found):
        return found

    def summary_row(self, view, found, units):
        agree = [u.get("agreement") for u in units]
        row = {"ov_concepts": len({u["ov_label"] for u in units}),
               "ov_same": agree.count("same"), "ov_word": agree.count("word"),
               "ov_compared": sum(a is not None for a in agree)}
        if self.permutations:
            row["ov_significant"] = sum(bool(u.get("ov_significant")) for u in units)
        return row

    def layer_numbers(self, view, result, units):
        row = self.summary_row(view, None, units)
        numbers = {"open-vocabulary concepts": row["ov_concepts"]}
        if row["ov_compared"]:
            numbers["agreement with IoU labels"] = (f"{row['ov_same']} same, {row['ov_word']} word-level of "
                                                    f"{row['ov_compared']} units with both labels")
        if self.permutations:
            numbers[f"open-vocabulary labels significant at q = {self.q:g}"] = row["ov_significant"]
        return numbers

    def settings(self):
        from jaxdissect.explain import unit_metrics

        top_k = f", top_k={self.kwargs['top_k']}" if "top_k" in self.kwargs else ""
        out = {"open-vocabulary scorer": (f"{self.scorer}: CLIP image-text cosine similarity ({self.clip.directory})"
                                          if self.clip is not None else
                                          f"{LABELS}: per image 1 where a label of the run is anywhere in it "
                                          "(and for its class), else 0"),
               "vocabulary": f"{len(self.concepts)} concepts",
               "similarity": f"{self.similarity} (CLIP-Dissect's defaults{top_k})",
               "pooled activations": POOLING, "agreement": AGREEMENT}
        if self.permutations:
            out["open-vocabulary significance"] = (f"image-permutation p-values of the best score ({self.permutations}"
                                                   " permutations), Benjamini-Hochberg q over the layer's units")
        if self.metrics:
            out["open-vocabulary label metrics"] = ("image level, where the label is one of the run's: each "
                                                    "image's max raw activation vs the label anywhere in the image; "
                                                    + unit_metrics.SANITY)
        return out

    def page_options(self):
        columns = [{"key": "ov_label", "title": "open-vocabulary label", "kind": "text"},
                   {"key": "ov_score", "title": f"{self.similarity}", "kind": "number", "digits": 3},
                   {"key": "agreement", "title": "agreement", "kind": "text"},
                   {"key": "iou_label_rank", "title": "IoU label's rank", "kind": "number", "digits": 0,
                    "ascending": True}]
        if self.permutations:
            columns += [{"key": "ov_p_value", "title": "ov p-value", "kind": "number", "digits": 4,
                         "ascending": True},
                        {"key": "ov_q_value", "title": "ov q-value (BH)", "kind": "number", "digits": 4,
                         "ascending": True}]
        if self.metrics:
            columns += [{"key": f"ov_metrics.image.{m}", "title": f"ov image {m}", "kind": "number", "digits": 3}
                        for m in ("f1", "auprc", "pearson")]
        return {"columns": columns}
