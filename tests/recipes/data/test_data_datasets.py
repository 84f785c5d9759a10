"""Megatron GPT datasets built from data.* on CPU: sample windows, blending, validation errors."""

import random
from dataclasses import replace

import pytest
import torch

from recipes.config import DataConfig
from recipes.data import build_tokenizer, build_train_valid_datasets, validate_data_config
from recipes.data.preprocess import write_indexed_dataset
from tests.recipes.data.corpus_helpers import random_documents

BYTE_EOD = 256
SEQ = 16


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("byte")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("corpus")
    texts = random_documents(60, seed=7)
    write_indexed_dataset(texts, tokenizer, folder / "words")
    return folder, texts


def _pieces_fit_documents(window: list[int], documents: list[list[int]]) -> bool:
    """A window of the packed stream, cut at eod, is suffix + whole docs + prefix of documents."""
    pieces = []
    current = []
    for token in window:
        if token == BYTE_EOD:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    pieces.append(current)

    def contains(doc, piece):
        return any(doc[i:i + len(piece)] == piece for i in range(len(doc) - len(piece) + 1))

    if len(pieces) == 1:
        return any(contains(doc, pieces[0]) for doc in documents)
    first, *middle, last = pieces
    return (
        any(doc[len(doc) - len(first):] == first for doc in documents)
        and all(piece in documents for piece in middle)
        and any(doc[:len(last)] == last for doc in documents)
    )


def test_samples_are_seq_plus_one_windows_of_the_documents(corpus, tokenizer):
    folder, texts = corpus
    cfg = DataConfig(paths=[str(folder / "words")], split="90,10,0", cache_dir=str(folder / "c"))
    train, valid = build_train_valid_datasets(cfg, SEQ, 1234, 200, 20, tokenizer)
    assert len(train) >= 200 and len(valid) >= 20
    documents = [list(text.encode("utf-8")) for text in texts]
    for index in range(60):
        sample = train[index]
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens.shape == labels.shape == (SEQ,)
        assert torch.equal(tokens[1:], labels[:-1])
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        assert torch.equal(sample["loss_mask"], torch.ones(SEQ))
        window = tokens.tolist() + [labels[-1].item()]
        assert _pieces_fit_documents(window, documents), window


def test_valid_split_uses_other_documents(corpus, tokenizer):
    folder, texts = corpus
    cfg = DataConfig(paths=[str(folder / "words")], split="50,50,0", cache_dir=str(folder / "c"))
    train, valid = build_train_valid_datasets(cfg, SEQ, 1, 10, 10, tokenizer)
    # Megatron splits by document order: train gets the first 30 documents, valid the last 30.
    first, second = (
        [list(t.encode("utf-8")) for t in texts[:30]],
        [list(t.encode("utf-8")) for t in texts[30:]],
    )
    for index in range(len(valid)):
        sample = valid[index]
        window = sample["tokens"].tolist() + [sample["labels"][-1].item()]
        assert _pieces_fit_documents(window, second)
    sample = train[0]
    assert _pieces_fit_documents(sample["tokens"].tolist() + [sample["labels"][-1].item()], first)


def _two_source_corpus(folder, tokenizer, docs_a: int, docs_b: int):
    rng = random.Random(0)
    for name, count in (("a", docs_a), ("b", docs_b)):
        texts = [name * rng.randint(20, 60) for _ in range(count)]
        write_indexed_dataset(texts, tokenizer, folder / name)
    return str(folder / "a"), str(folder / "b")


def _fraction_from_a(dataset) -> float:
    from_a = sum(ord("a") in dataset[i]["tokens"].tolist() for i in range(len(dataset)))
    return from_a / len(dataset)


def test_blend_weights_are_respected(tmp_path, tokenizer):
    a, b = _two_source_corpus(tmp_path, tokenizer, 100, 100)
    cfg = DataConfig(paths=["0.7", a, "0.3", b], split="100,0,0", cache_dir=str(tmp_path / "c"))
    train, valid = build_train_valid_datasets(cfg, 8, 3, 1000, 0, tokenizer)
    assert valid is None
    assert len(train) == 1000
    assert _fraction_from_a(train) == pytest.approx(0.7, abs=0.02)


def test_unweighted_blend_follows_dataset_sizes(tmp_path, tokenizer):
    a, b = _two_source_corpus(tmp_path, tokenizer, 150, 50)
    cfg = DataConfig(paths=[a, b], split="100,0,0", cache_dir=str(tmp_path / "c"))
    train, _ = build_train_valid_datasets(cfg, 8, 3, 500, 0, tokenizer)
    assert _fraction_from_a(train) == pytest.approx(0.75, abs=0.05)


def test_split_without_documents_is_named(tmp_path, tokenizer):
    write_indexed_dataset(["one doc", "two doc", "three"], tokenizer, tmp_path / "tiny")
    cfg = DataConfig(paths=[str(tmp_path / "tiny")], cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"data.split = '98,2,0'.*valid"):
        build_train_valid_datasets(cfg, 8, 3, 10, 1, tokenizer)


def _error(cfg) -> str:
    with pytest.raises(ValueError) as error:
        validate_data_config(cfg)
    message = str(error.value)
    assert "\n" not in message  # one paragraph
    return message


def test_missing_dataset_names_paths_and_files(tmp_path):
    prefix = str(tmp_path / "nowhere" / "data_text_document")
    message = _error(DataConfig(paths=[prefix]))
    assert "data.paths" in message and f"{prefix}.bin" in message and f"{prefix}.idx" in message


def test_missing_idx_only_and_suffix_hint(tmp_path, tokenizer):
    write_indexed_dataset(["doc"], tokenizer, tmp_path / "half")
    (tmp_path / "half.idx").unlink()
    message = _error(DataConfig(paths=["bundled", str(tmp_path / "half")]))
    assert f"{tmp_path / 'half'}.idx" in message and f"{tmp_path / 'half'}.bin" not in message
    assert "Drop the '.bin' suffix" in _error(DataConfig(paths=[str(tmp_path / "half.bin")]))


@pytest.mark.parametrize(
    "paths, expected",
    [
        (["0.7", "bundled", "0.3"], "odd number"),
        (["0.7", "bundled", "heavy", "bundled"], "data.paths[2] = 'heavy' is not a number"),
        (["-1", "bundled"], "data.paths[0] = '-1'"),
        (["bundled", "0.5"], "mixes prefixes with weights"),
        ([], "data.paths is empty"),
    ],
)
def test_bad_weights_are_named(paths, expected):
    assert expected in _error(DataConfig(paths=paths))


def test_bad_split_tokenizer_and_seq_length_are_named(tmp_path):
    cfg = DataConfig(split="98,x", tokenizer=str(tmp_path / "tok.json"), seq_length=0)
    message = _error(cfg)
    assert "data.split = '98,x'" in message
    assert "data.tokenizer" in message and "tok.json" in message
    assert "data.seq_length = 0" in message


def test_valid_config_passes(corpus):
    folder, _ = corpus
    validate_data_config(DataConfig())
    validate_data_config(replace(DataConfig(), paths=["1", "bundled", "2", str(folder / "words")]))
