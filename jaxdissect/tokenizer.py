"""CLIP's text tokenizer on Hugging Face ``tokenizers``: byte-level BPE, start/end tokens, 77 positions.

CLIP's rules (OpenAI ``simple_tokenizer.py``), in order: ``ftfy.fix_text``,
HTML entities unescaped twice, runs of whitespace made one space, stripped,
lowercased; split by the pattern ``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|
[^\\s\\p{L}\\p{N}]+`` (letters runs, single digits, punctuation runs,
whitespace dropped); each piece's UTF-8 bytes mapped to printable characters
(GPT-2's byte-to-unicode table), ``</w>`` appended to its last character, and
merged by the BPE ranks. A row is ``<|startoftext|>``, the tokens,
``<|endoftext|>``, zeros to ``context_length`` (77).

The vocabulary is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (a merges list;
:meth:`ClipTokenizer.from_bpe_file`): 256 byte characters, the same with
``</w>``, one token per merge (the first 48,894 merges), the two special
tokens: 49,408 ids. The cleaning runs in Python (``ftfy``, ``html``), the
rest in ``tokenizers`` (Rust).
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Sequence

import numpy as np

from jaxdissect.errors import JaxDissectError

PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
START, END = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
# OpenAI's vocabulary: 49152 - 256 - 2 merges of the file are used.
MERGES_USED = 49152 - 256 - 2


class TokenizerError(JaxDissectError, ValueError):
    """A vocabulary file that cannot be read, or a text that does not fit the context."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from the 256 byte values to printable characters, in CLIP's vocabulary order.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to
    themselves and come first; the other 68 bytes, in increasing order, map
    to ``chr(256)``, ``chr(257)`` ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]))


def vocabulary(merges: Sequence[tuple[str, str]]) -> list[str]:
    """CLIP's token list for ``merges``: bytes, bytes + ``</w>``, one per merge, start, end."""
    chars = list(bytes_to_unicode().values())
    return chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [START, END]


def clean(text: str) -> str:
    """CLIP's ``basic_clean``: ftfy, HTML entities unescaped twice, stripped (the rest runs in the tokenizer)."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


class ClipTokenizer:
    """Token ids ``[N, context_length]`` for texts, with CLIP's rules and a given BPE vocabulary."""

    def __init__(self, merges: Sequence[tuple[str, str]], context_length: int = CONTEXT_LENGTH):
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

        merges = [tuple(m) for m in merges]
        tokens = vocabulary(merges)
        self.vocab = {t: i for i, t in enumerate(tokens)}
        if len(self.vocab) != len(tokens):
            raise TokenizerError("the merges list makes the same token twice; is it a BPE merges file?")
        self.start_id, self.end_id = self.vocab[START], self.vocab[END]
        self.context_length = context_length
        bpe = models.BPE(vocab=self.vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                         fuse_unk=False)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._tokenizer = tok

    @classmethod
    def from_bpe_file(cls, path: str, context_length: int = CONTEXT_LENGTH) -> ClipTokenizer:
        """Read OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (gzip or plain text: a header line, then merges)."""
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise TokenizerError(f"cannot read the BPE vocabulary {path}: {e}") from None
        merges = [tuple(line.split()) for line in lines[1:MERGES_USED + 1] if line.strip()]
        bad = [i + 2 for i, m in enumerate(merges) if len(m) != 2]
        if bad:
            raise TokenizerError(f"{path} line {bad[0]} is not a merge of two symbols; is it CLIP's "
                                 "bpe_simple_vocab_16e6.txt.gz?")
        return cls(merges, context_length)

    @classmethod
    def from_model_dir(cls, directory: str) -> ClipTokenizer:
        """The tokenizer a converted CLIP directory carries (``jaxdissect.convert.clip.convert(vocab_path=...)``)."""
        import json
        import os

        try:
            with open(os.path.join(directory, "model.json")) as f:
                tokenizer = json.load(f).get("metadata", {}).get("tokenizer") or {}
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read {directory}/model.json: {e}") from None
        if not tokenizer.get("bpe_file"):
            raise TokenizerError(f"{directory} holds no tokenizer vocabulary; convert it again with "
                                 "python -m converters.clip --input=... --vocab=bpe_simple_vocab_16e6.txt.gz, "
                                 "or use the published name clip_vit_b16")
        return cls.from_bpe_file(os.path.join(directory, tokenizer["bpe_file"]),
                                 tokenizer.get("context_length", CONTEXT_LENGTH))

    def tokenize(self, text: str) -> list[int]:
        """The BPE ids of one text, without start and end tokens."""
        return self._tokenizer.encode(clean(text), add_special_tokens=False).ids

    def __call__(self, texts: Sequence[str] | str, truncate: bool = False) -> np.ndarray:
        """``[N, context_length]`` int32 rows: start, tokens, end, zeros.

        A text too long raises (naming it) unless ``truncate``, which keeps the
        first ``context_length - 1`` tokens and ends the row with the end
        token, as CLIP's ``tokenize(truncate=True)``.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self._tokenizer.encode_batch([clean(t) for t in texts], add_special_tokens=False)
        out = np.zeros((len(texts), self.context_length), np.int32)
        for row, (text, enc) in enumerate(zip(texts, encoded)):
            ids = [self.start_id] + enc.ids + [self.end_id]
            if len(ids) > self.context_length:
                if not truncate:
                    raise TokenizerError(f"text {text[:40]!r} is {len(ids)} tokens, more than the context of "
                                         f"{self.context_length}; shorten it or pass truncate=True")
                ids = ids[:self.context_length]
                ids[-1] = self.end_id
            out[row, :len(ids)] = ids
        return out
