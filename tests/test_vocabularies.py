"""Concept vocabularies: the shipped 20k list, Broden label cleaning, word-list errors, cached text embeddings."""

import jax
import numpy as np
import pytest

from jaxdissect import vocabularies
from jaxdissect.models.clip import CLIP, init_variables
from jaxdissect.tokenizer import ClipTokenizer
from jaxdissect.vocabularies import VocabularyError


def test_20k_is_20000_distinct_plain_words():
    words = vocabularies.load_vocabulary("20k")
    assert len(words) == 20000 == len(set(words))
    assert words[:3] == ["the", "to", "and"] and all(w.isascii() and w.isalpha() and w.islower() for w in words)


@pytest.mark.parametrize("data,message", [
    (b"cat\ndog\ncat\n", "line 3: 'cat' repeats line 1; list each concept once"),
    (b"cat\n\ndog\n", "line 2 is empty; remove empty lines"),
    (b"cat\n   \n", "line 2 is empty"),
    (b"cat\ncaf\xe9\n", "line 2: byte b'\\xe9' at column 4 is not UTF-8; save the file as UTF-8"),
    (b"", "has no concepts"),
])
def test_bad_word_lists_are_one_line_errors(tmp_path, data, message):
    path = tmp_path / "words.txt"
    path.write_bytes(data)
    with pytest.raises(VocabularyError) as e:
        vocabularies.load_vocabulary(str(path))
    assert message in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


def test_good_word_list_and_names(tmp_path):
    path = tmp_path / "words.txt"
    path.write_bytes("cat\r\n wine cellar \ncafé".encode())
    assert vocabularies.load_vocabulary(str(path)) == ["cat", "wine cellar", "café"]
    with pytest.raises(VocabularyError, match="'30k' is not one of 20k, broden and no such file"):
        vocabularies.load_vocabulary("30k")
    with pytest.raises(VocabularyError, match="takes the label names"):
        vocabularies.load_vocabulary("broden")


def test_broden_names_cleaned():
    names = ["-", "wine_cellar-bottle_storage-s", "red-c", "bird", "nuclear_power_plant-outdoor-s", "flecked",
             "red", "paper_towel"]
    assert vocabularies.load_vocabulary("broden", names) == [
        "wine cellar-bottle storage", "red", "bird", "nuclear power plant-outdoor", "flecked", "paper towel"]


@pytest.mark.slow
def test_text_embeddings_cached_per_model_and_vocabulary(tmp_path):
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    tok = ClipTokenizer(merges, context_length=12)
    module = CLIP(embed_dim=16, image_resolution=16, vision_layers=1, vision_width=32, vision_patch_size=8,
                  context_length=12, vocab_size=len(tok.vocab), transformer_width=32, transformer_heads=2,
                  transformer_layers=1, vision_heads=2)
    variables = init_variables(module, jax.random.PRNGKey(1))
    calls = []

    def encode(tokens):
        calls.append(tokens.shape)
        return module.apply(variables, tokens, method="encode_text")

    concepts = ["cat", "dog", "a cat", "cats and dogs", "bird"]
    first = vocabularies.text_embeddings(encode, tok, concepts, model_id="m1", cache_dir=str(tmp_path), batch_size=2)
    assert first.shape == (5, 16) and calls == [(2, 12), (2, 12), (2, 12)]  # the last batch padded to 2
    np.testing.assert_allclose(first, module.apply(variables, tok(concepts), method="encode_text"), rtol=1e-5,
                               atol=1e-6)
    again = vocabularies.text_embeddings(encode, tok, concepts, model_id="m1", cache_dir=str(tmp_path))
    assert len(calls) == 3 and np.array_equal(again, first)
    vocabularies.text_embeddings(encode, tok, concepts, model_id="m2", cache_dir=str(tmp_path))
    vocabularies.text_embeddings(encode, tok, concepts[:4], model_id="m1", cache_dir=str(tmp_path))
    assert len(calls) == 3 + 1 + 1
    assert len(list((tmp_path / "text_embeddings").glob("*.npy"))) == 3
