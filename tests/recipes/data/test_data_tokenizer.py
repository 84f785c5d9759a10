"""Tokenizers vs independent references: Python's UTF-8 codec and the `tokenizers` library."""

import json

import pytest
from tokenizers import Tokenizer

from recipes.data.tokenizer import ByteTokenizer, HFJsonTokenizer, build_tokenizer
from tests.recipes.data.corpus_helpers import random_documents, train_tiny_bpe

TEXTS = [
    "",
    "plain ascii, with punctuation!\n\ttabs",
    "Émigrés à la crème brûlée — naïve façade",
    "東京タワー 🦊🦊 mixed ß ẞ ﬁ",
    "nul\x00byte and \x7f del",
]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_matches_utf8_and_round_trips(text):
    tokenizer = build_tokenizer("byte")
    ids = tokenizer.tokenize(text)
    assert ids == list(text.encode("utf-8"))
    assert [int(i) for i in tokenizer.tokenize_batch([text])[0]] == ids
    # Special ids are dropped when decoding, so eod/pad never leak into the text.
    assert tokenizer.detokenize(ids + [tokenizer.eod, tokenizer.pad]) == text


def test_byte_tokenizer_special_ids_and_padded_vocab():
    tokenizer = ByteTokenizer()
    assert tokenizer.eod == 256 and tokenizer.pad == 257
    assert tokenizer.vocab_size % 64 == 0 and tokenizer.vocab_size == 320
    assert tokenizer.vocab_size > max(tokenizer.eod, tokenizer.pad)
    assert len(set(tokenizer.vocab.values())) == 258
    assert tokenizer.unique_identifiers["class"].endswith("ByteTokenizer")


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    return train_tiny_bpe(folder / "tokenizer.json", random_documents(200, seed=0))


def test_hf_json_tokenizer_loads_and_matches_library(bpe_file):
    reference = Tokenizer.from_file(str(bpe_file))
    tokenizer = build_tokenizer(str(bpe_file))
    assert isinstance(tokenizer, HFJsonTokenizer)
    assert tokenizer.eod == reference.token_to_id("<|endoftext|>")
    assert tokenizer.pad == reference.token_to_id("<|pad|>")
    raw = reference.get_vocab_size(with_added_tokens=True)
    assert tokenizer.vocab_size % 64 == 0 and raw <= tokenizer.vocab_size < raw + 64
    for text in random_documents(5, seed=1):
        ids = tokenizer.tokenize(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert [int(i) for i in tokenizer.tokenize_batch([text])[0]] == ids
        assert tokenizer.detokenize(ids + [tokenizer.eod]) == text


def test_hf_tokenizer_accepts_folder_and_declared_eos(tmp_path):
    train_tiny_bpe(tmp_path / "tokenizer.json", random_documents(50, seed=2), eos="<|my_eos|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|my_eos|>"}))
    tokenizer = build_tokenizer(str(tmp_path))
    assert tokenizer.eod == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id(
        "<|my_eos|>"
    )


def test_missing_tokenizer_file_names_field_value_and_choices(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError) as error:
        build_tokenizer(missing)
    message = str(error.value)
    assert "data.tokenizer" in message and missing in message and "'byte'" in message


def test_tokenizer_without_eod_token_is_rejected(tmp_path):
    from tokenizers import models

    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="data.tokenizer.*end-of-document"):
        build_tokenizer(str(tmp_path / "tokenizer.json"))
