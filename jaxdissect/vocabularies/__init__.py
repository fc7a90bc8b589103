"""Concept vocabularies for open-vocabulary labels: word lists as data, and their cached text embeddings.

:func:`load_vocabulary` takes

* ``20k``: the 20,000 most frequent plain English words (``20k.txt``, from
  wordfreq; CC BY-SA 4.0, see ``LICENSE.md``), standing in for CLIP-Dissect's
  ``20k.txt`` (its default concept set), which we do not redistribute;
* ``broden``: the label names of the dataset being dissected (Broden's
  ``label.csv`` names, or the synthetic data's), cleaned as CLIP-Dissect's
  ``broden_labels_clean.txt`` is: category suffixes (``-s`` scene, ``-c``
  colour) dropped, ``_`` made spaces, duplicates after cleaning kept once
  (:func:`broden_concepts`);
* a path: a UTF-8 text file, one concept a line (:func:`read_word_list`).

A word list with an empty line, a repeated entry or bytes that are not UTF-8
is refused with a one-line error naming the line. :func:`text_embeddings`
embeds a vocabulary with a CLIP text tower once per (model, vocabulary) and
keeps the ``[concepts, D]`` array in the per-user cache (CLIP-Dissect's prompt:
the concept itself, no template).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence

import numpy as np

from jaxdissect import fileio
from jaxdissect.errors import JaxDissectError

HERE = os.path.dirname(os.path.abspath(__file__))
NAMED = {"20k": os.path.join(HERE, "20k.txt")}


class VocabularyError(JaxDissectError, ValueError):
    """A word list that cannot be used as a concept vocabulary; the message names the line and the fix."""


def parse_word_list(data: bytes, source: str) -> list[str]:
    """Concepts from the bytes of a word list: one a line, stripped; a final newline is allowed."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    words: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        try:
            word = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise VocabularyError(f"{source} line {number}: byte {raw[e.start:e.start + 1]!r} at column "
                                  f"{e.start + 1} is not UTF-8; save the file as UTF-8") from None
        if not word:
            raise VocabularyError(f"{source} line {number} is empty; remove empty lines (one concept a line)")
        if word in seen:
            raise VocabularyError(f"{source} line {number}: {word!r} repeats line {seen[word]}; "
                                  "list each concept once")
        seen[word] = number
        words.append(word)
    if not words:
        raise VocabularyError(f"{source} has no concepts; write one concept a line")
    return words


def read_word_list(path: str) -> list[str]:
    """A word-list file (UTF-8, one concept a line) as a list; see :func:`parse_word_list` for what is refused."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise VocabularyError(f"cannot read the vocabulary file {path}: {e.strerror or e}") from None
    return parse_word_list(data, path)


def broden_concepts(label_names: Sequence[str]) -> list[str]:
    """Broden-style label names as concepts: ``wine_cellar-bottle_storage-s`` -> ``wine cellar-bottle storage``.

    The category suffix (``-s``, ``-c``, any ``-x`` of one letter) is dropped,
    underscores become spaces; the "no label" entry (``-`` or empty) and
    repeats after cleaning are left out, first one kept.
    """
    out, seen = [], set()
    for name in label_names:
        word = re.sub(r"-[a-z]$", "", str(name).strip()).replace("_", " ").strip()
        if word and word != "-" and word not in seen:
            seen.add(word)
            out.append(word)
    return out


def load_vocabulary(spec: str, label_names: Sequence[str] | None = None) -> list[str]:
    """The concepts of ``spec``: ``20k``, ``broden`` (needs the dataset's ``label_names``) or a file path."""
    if spec in NAMED:
        return read_word_list(NAMED[spec])
    if spec == "broden":
        if not label_names:
            raise VocabularyError("vocabulary 'broden' takes the label names of a Broden (or synthetic) dataset; "
                                  "dissect with --data=broden:DIR, or give a word-list file")
        return broden_concepts(label_names)
    if os.path.isfile(os.path.expanduser(spec)):
        return read_word_list(os.path.expanduser(spec))
    raise VocabularyError(f"vocabulary {spec!r} is not one of {', '.join([*NAMED, 'broden'])} and no such file "
                          "exists; give a name or the path of a word list (one concept a line)")


def vocabulary_key(model_id: str, concepts: Sequence[str], context_length: int) -> str:
    """A cache key for a model's embeddings of ``concepts`` (the model, the exact list, the context)."""
    h = hashlib.sha256()
    h.update(f"{model_id}\n{context_length}\n".encode())
    h.update("\n".join(concepts).encode("utf-8"))
    return h.hexdigest()[:24]


def text_embeddings(encode, tokenizer, concepts: Sequence[str], *, model_id: str, cache_dir: str,
                    batch_size: int = 256) -> np.ndarray:
    """``[concepts, D]`` float32 text embeddings, computed once per (model, vocabulary) and kept in the cache.

    ``encode(tokens [B, context]) -> [B, D]`` is the text tower (e.g. a jitted
    ``module.apply(variables, t, method='encode_text')``); ``tokenizer`` a
    :class:`jaxdissect.tokenizer.ClipTokenizer`; ``model_id`` names the
    weights (e.g. the converted model's ``source_sha256``), so two models
    never share an entry. The file is ``<cache_dir>/text_embeddings/<key>.npy``,
    built by one process while others wait (:func:`jaxdissect.fileio.build_once`).
    """
    concepts = list(concepts)
    key = vocabulary_key(model_id, concepts, tokenizer.context_length)
    folder = fileio.require_writable_dir(os.path.join(cache_dir, "text_embeddings"), "embedding cache")
    target = os.path.join(folder, f"{key}.npy")

    def build(tmp: str) -> None:
        tokens = tokenizer(concepts)  # all first: a concept too long for the context fails before any work
        parts = []
        for start in range(0, len(concepts), batch_size):
            batch = tokens[start:start + batch_size]
            size = len(batch)
            if size < batch_size and len(concepts) > batch_size:  # one compiled shape: pad the last batch
                batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - size, axis=0)])
            parts.append(np.asarray(encode(batch), np.float32)[:size])
        with open(tmp, "wb") as f:
            np.save(f, np.concatenate(parts))

    fileio.build_once(target, build, what=f"text embeddings of {len(concepts)} concepts", directory=False)
    out = np.load(target)
    if out.shape[0] != len(concepts):
        raise VocabularyError(f"cached embeddings {target} hold {out.shape[0]} rows for {len(concepts)} concepts; "
                              "delete the file to rebuild it")
    return out
