"""Regenerate ``20k.txt``: the 20,000 most frequent English words of ``wordfreq`` (letters a-z only).

    pip install wordfreq==3.1.1 && python -m jaxdissect.vocabularies.generate

CLIP-Dissect's ``20k.txt`` (20,000 common English words) is not redistributed;
this list plays its part. ``wordfreq.top_n_list('en', 40000)`` in frequency
order, kept when the word is only the letters a-z (no digits, apostrophes or
accents), cut at 20,000. Words of equal (bucketed) frequency come in
wordfreq's order. The data is wordfreq's, under CC BY-SA 4.0 (``LICENSE.md``).
"""

from __future__ import annotations

import os
import re

from jaxdissect import fileio

SIZE = 20000


def top_words(n: int = SIZE) -> list[str]:
    """The ``n`` most frequent English words made of the letters a-z, by wordfreq."""
    import wordfreq

    words = [w for w in wordfreq.top_n_list("en", 2 * n) if re.fullmatch(r"[a-z]+", w)]
    if len(words) < n:
        raise RuntimeError(f"wordfreq gave only {len(words)} plain words; ask top_n_list for more")
    return words[:n]


def main() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "20k.txt")
    fileio.write_text(path, "\n".join(top_words()) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
