"""CLIP's tokenizer (on HF ``tokenizers``) against a pure-Python reference written from CLIP's rules.

The BPE vocabulary is synthetic: merges learnt here from a small corpus in
CLIP's byte-level alphabet, so no vocabulary file is downloaded. The reference
does each step by hand: ftfy, HTML unescaping, whitespace clean, lowercase,
the regex split (the ``regex`` module), byte-to-unicode, BPE by merge rank,
start/end tokens, zero padding to the context.
"""

import gzip
import html
from collections import Counter

import ftfy
import numpy as np
import pytest
import regex

from jaxdissect.tokenizer import ClipTokenizer, TokenizerError

PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                        r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def byte_table():
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


BYTES = byte_table()


def pieces(text):
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = regex.sub(r"\s+", " ", text).strip().lower()
    return ["".join(BYTES[b] for b in p.encode("utf-8")) for p in PATTERN.findall(text)]


def learn_merges(corpus, n):
    """Plain BPE learning over CLIP's alphabet (end-of-word ``</w>`` on each piece's last symbol)."""
    words = Counter()
    for text in corpus:
        for p in pieces(text):
            words[tuple(p[:-1]) + (p[-1] + "</w>",)] += 1
    merges = []
    for _ in range(n):
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return merges


class Reference:
    """CLIP's encoder from its rules: BPE by lowest merge rank until no ranked pair is left."""

    def __init__(self, merges, context=77):
        chars = list(BYTES.values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                      "<|endoftext|>"]
        self.ids = {t: i for i, t in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.context = context

    def bpe(self, piece):
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(self.ranks.get((a, b), np.inf), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            rank, _ = min(pairs)
            if rank == np.inf:
                break
            first, second = [k for k, v in self.ranks.items() if v == rank][0]
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    out.append(first + second)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def __call__(self, text):
        ids = [self.ids["<|startoftext|>"]]
        for p in pieces(text):
            ids += [self.ids[t] for t in self.bpe(p)]
        ids.append(self.ids["<|endoftext|>"])
        row = np.zeros(self.context, np.int32)
        row[:len(ids)] = ids
        return row


CORPUS = ["the cat sat on the mat", "a dog's bone", "the wine cellar", "cellar door", "dogs and cats",
          "painted ceiling", "ceilings", "sky-scraper 2024", "skyscraper", "the other side", "théâtre café",
          "they're here", "we'll see", "i'd go", "bottle storage", "storage room", "room", "rooms",
          "stained glass", "glass", "grass", "green grass", "red", "reddish", "blue sky"]

WORDS = ["cat", "Cats", "dog's", "wine cellar-bottle storage", "  multiple   spaces\tand\nnewlines ",
         "UPPER case", "café", "THÉÂTRE", "日本語", "emoji 🙂 face", "42 rooms", "3.14", "R&amp;D",
         "&lt;b&gt;bold&lt;/b&gt;", "they're we'll I'd you've", "hello!!! world???", "naïve façade",
         "skyscraper", "sky-scraper", "unknownwordxyz", "a", "", "—dash—", "mojibake: cafÃ©", "x" * 20]


@pytest.fixture(scope="module")
def merges():
    return learn_merges(CORPUS, 150)


def test_token_ids_equal_reference(merges):
    ours = ClipTokenizer(merges)
    ref = Reference(merges)
    got = ours(WORDS)
    assert got.shape == (len(WORDS), 77) and got.dtype == np.int32
    for text, row in zip(WORDS, got):
        np.testing.assert_array_equal(row, ref(text), err_msg=repr(text))
    # The merges are used: a learnt word is one token, not letters.
    assert ours.tokenize("skyscraper") == [ref.ids["skyscraper</w>"]]


def test_context_length_and_truncation(merges):
    ours = ClipTokenizer(merges, context_length=8)
    long = "one two three four five six seven eight nine"
    with pytest.raises(TokenizerError, match="more than the context of 8; shorten it or pass truncate=True"):
        ours([long])
    row = ours([long], truncate=True)[0]
    assert row[0] == ours.start_id and row[-1] == ours.end_id and (row != 0).all()
    np.testing.assert_array_equal(row[1:7], Reference(merges, 200)(long)[1:7])


def test_bpe_file(tmp_path, merges):
    """OpenAI's file format: a header line, then one merge a line; gzip or plain."""
    text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    with gzip.open(tmp_path / "bpe.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    tok = ClipTokenizer.from_bpe_file(str(tmp_path / "bpe.txt.gz"))
    np.testing.assert_array_equal(tok(WORDS[:5]), ClipTokenizer(merges)(WORDS[:5]))
    assert len(tok.vocab) == 512 + len(merges) + 2 and tok.end_id == len(tok.vocab) - 1
    (tmp_path / "bad.txt").write_text("#version\na b c\n")
    with pytest.raises(TokenizerError, match="line 2 is not a merge of two symbols"):
        ClipTokenizer.from_bpe_file(str(tmp_path / "bad.txt"))
    with pytest.raises(TokenizerError, match="cannot read"):
        ClipTokenizer.from_bpe_file(str(tmp_path / "missing.txt.gz"))
