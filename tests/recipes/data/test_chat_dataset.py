"""Chat datasets: epochs, split, blend ratios, shuffling, resume, truncation, the
preprocessed path. Rows are read back through their tokens alone (documents cut
at every position 0, each decoded to its conversation's tag) and compared with
counts worked out here from the inputs."""

import collections
import itertools
import re

import numpy as np
import pytest

from recipes.config import DataConfig
from recipes.data import build_chat_datasets, build_tokenizer, make_data_iterator
from recipes.data.chat_sources import metadata_path
from recipes.data.preprocess import main as preprocess_main
from tests.recipes.data.chat_helpers import (LIBRARY, conversations, copy_demo_tokenizer,
                                             reference, write_chat_jsonl)

TAG = re.compile(r"<([ab]\d+)>")
SEQ = 256  # longer than every generated conversation (at most 255 tokens)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chat_demo")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    small = conversations("a", 40, seed=1)
    large = conversations("b", 200, seed=2)
    return {"a": write_chat_jsonl(folder / "a.jsonl", small), "b": write_chat_jsonl(folder / "b.jsonl", large),
            "a_convs": small, "b_convs": large, "folder": folder}


def config(paths, **kwargs):
    return DataConfig(kind="chat", paths=[str(p) for p in paths], tokenizer="chat_demo", **kwargs)


def documents(sample):
    """Token lists of a row's documents (the filler tail, all loss-free, dropped)."""
    starts = np.flatnonzero(sample["position_ids"] == 0).tolist() + [len(sample["tokens"])]
    docs = [(a, b) for a, b in zip(starts, starts[1:])]
    return [sample["tokens"][a:b].tolist() for a, b in docs
            if TAG.search(LIBRARY.decode(sample["tokens"][a:b].tolist()))]


def tags(dataset):
    return [TAG.search(LIBRARY.decode(doc)).group(1)
            for row in range(len(dataset)) for doc in documents(dataset[row])]


def test_epochs_cover_each_train_conversation_once_per_epoch(files, tokenizer):
    cfg = config([files["b"]], split="90,10,0")
    one_epoch = len(build_chat_datasets(cfg, SEQ, 7, 1, 4, tokenizer)[0])
    train, valid = build_chat_datasets(cfg, SEQ, 7, one_epoch + 1, 4, tokenizer)
    train_tags, valid_tags = collections.Counter(tags(train)), collections.Counter(tags(valid))
    epochs = train.counts.epochs
    assert epochs == 2 and len(train) > one_epoch
    assert len(valid_tags) == 20 and set(valid_tags.values()) == {1}  # round(10% of 200)
    assert not set(valid_tags) & set(train_tags)
    assert len(train_tags) == 180 and set(train_tags.values()) == {epochs}
    # Whole conversations in their own token order, next-token labels and the assistant-only
    # loss mask inside each one, nothing across a boundary: all against the reference.
    by_tag = {f"b{i}": m for i, m in enumerate(files["b_convs"])}
    for row in range(0, len(train), 5):
        sample = train[row]
        starts = np.flatnonzero(sample["position_ids"] == 0).tolist() + [SEQ]
        for a, b in zip(starts, starts[1:]):
            doc = sample["tokens"][a:b].tolist()
            tag = TAG.search(LIBRARY.decode(doc))
            if tag is None:  # the filler tail
                assert not sample["loss_mask"][a:].any()
                continue
            ids, mask = reference(by_tag[tag.group(1)])
            assert doc == ids
            assert sample["labels"][a:b - 1].tolist() == ids[1:]
            assert sample["loss_mask"][a:b].tolist() == mask[1:] + [0]


def test_split_ignores_the_seed_and_shuffle_follows_it(files, tokenizer):
    cfg = config([files["b"]], split="90,10,0")
    one = build_chat_datasets(cfg, SEQ, 1, 10, 4, tokenizer)
    again = build_chat_datasets(cfg, SEQ, 1, 10, 4, tokenizer)
    other = build_chat_datasets(cfg, SEQ, 2, 10, 4, tokenizer)
    assert set(tags(one[1])) == set(tags(other[1]))
    assert tags(one[0]) == tags(again[0]) and tags(one[0]) != tags(other[0])
    for row in range(len(one[0])):
        for key, value in one[0][row].items():
            assert np.array_equal(value, again[0][row][key])


def test_blend_weights_set_each_sources_share_per_epoch(files, tokenizer):
    cfg = config(["0.75", files["a"], "0.25", files["b"]], split="100,0,0")
    one_epoch = len(build_chat_datasets(cfg, SEQ, 3, 1, 0, tokenizer)[0])
    train, valid = build_chat_datasets(cfg, SEQ, 3, 3 * one_epoch, 0, tokenizer)
    assert valid is None
    counts = collections.Counter(tags(train))
    epochs = train.counts.epochs
    assert epochs >= 3
    from_a = sum(n for tag, n in counts.items() if tag.startswith("a"))
    from_b = sum(n for tag, n in counts.items() if tag.startswith("b"))
    assert (from_a, from_b) == (180 * epochs, 60 * epochs)  # 0.75 and 0.25 of 240 per epoch
    # A repeated source goes through whole passes: counts differ by at most one.
    a_counts = [counts[f"a{i}"] for i in range(40)]
    assert max(a_counts) - min(a_counts) <= 1
    # The large source is walked part by part: no repeat before all 200 were seen.
    b_counts = [counts[f"b{i}"] for i in range(200)]
    assert max(b_counts) - min(b_counts) <= 1 and sum(b_counts) == 60 * epochs


def test_resume_at_a_row_count_yields_the_uninterrupted_batches(files, tokenizer):
    cfg = config([files["a"], files["b"]], split="100,0,0")
    train, _ = build_chat_datasets(cfg, SEQ, 5, 60, 0, tokenizer)
    resumed_train, _ = build_chat_datasets(cfg, SEQ, 5, 60, 0, tokenizer)  # a fresh process's build
    for dp_rank in range(2):
        straight = list(itertools.islice(make_data_iterator(train, 2, dp_rank, 2, 0, 5), 12))
        resumed = list(itertools.islice(make_data_iterator(resumed_train, 2, dp_rank, 2, 4 * 7, 5), 5))
        for expected, got in zip(straight[7:], resumed):
            for key in expected:
                assert expected[key].equal(got[key]), key


def test_dataloader_workers_give_the_same_batches(files, tokenizer):
    train, _ = build_chat_datasets(config([files["a"]], split="100,0,0"), SEQ, 5, 8, 0, tokenizer)
    inline = list(itertools.islice(make_data_iterator(train, 2, 0, 1, 0, 5), 4))
    workers = list(itertools.islice(make_data_iterator(train, 2, 0, 1, 0, 5, num_workers=1), 4))
    for a, b in zip(inline, workers):
        assert all(a[key].equal(b[key]) for key in a)


@pytest.mark.parametrize("packing", [True, False])
def test_rows_and_packing_efficiency(files, tokenizer, packing):
    cfg = config([files["b"]], split="100,0,0", packing=packing)
    train, _ = build_chat_datasets(cfg, SEQ, 1, 1, 0, tokenizer)
    lengths = [len(reference(m)[0]) for m in files["b_convs"]]
    assert train.counts.epochs == 1
    efficiency = sum(lengths) / (len(train) * SEQ)
    assert train.counts.packing_efficiency == pytest.approx(efficiency)
    if packing:
        assert len(train) < len(lengths) and efficiency > 0.85
    else:
        assert len(train) == len(lengths)
        for row in range(len(train)):
            sample = train[row]
            assert len(documents(sample)) == 1
            n = len(documents(sample)[0])
            assert not sample["loss_mask"][n - 1:].any()  # the last token and the padding
            assert sample["position_ids"][n:].tolist() == list(range(SEQ - n))
    assert any(f"packing efficiency {efficiency:.1%}" in line for line in train.report.lines())


def test_overlong_conversations_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    short = [[{"role": "user", "content": f"<a{i}> hi"}, {"role": "assistant", "content": "ok"}]
             for i in range(10)]
    long_answer = [{"role": "user", "content": "<a10> q"}, {"role": "assistant", "content": "x " * 80}]
    long_question = [{"role": "user", "content": "<a11> " + "y " * 80},
                     {"role": "assistant", "content": "z"}]
    path = write_chat_jsonl(tmp_path / "c.jsonl", short + [long_answer, long_question])
    seq = 48
    assert len(reference(long_answer)[0]) > seq and len(reference(long_question)[0]) > seq

    train, _ = build_chat_datasets(config([path], split="100,0,0"), seq, 1, 1, 0, tokenizer)
    found = {TAG.search(LIBRARY.decode(doc)).group(1): doc
             for row in range(len(train)) for doc in documents(train[row])}
    assert found["a10"] == reference(long_answer)[0][:seq]  # cut to seq_length, kept
    assert "a11" not in found  # no assistant token left after the cut
    counts = train.report.sources[0]
    assert (counts.truncated, counts.dropped_truncated_without_assistant) == (1, 1)
    assert "1 truncated" in train.report.lines()[0]

    dropped, _ = build_chat_datasets(config([path], split="100,0,0", overlong="drop"), seq, 1, 1, 0,
                                     tokenizer)
    assert sorted(tags(dropped)) == sorted(f"a{i}" for i in range(10))
    assert dropped.report.sources[0].dropped_overlong == 2
    assert "2 dropped" in dropped.report.lines()[0]


def test_preprocessed_chat_set_gives_the_same_rows(files, tokenizer, capsys):
    prefix = files["folder"] / "pre" / "ab"
    argv = ["--chat", str(files["a"]), str(files["b"]), "--output-prefix", str(prefix),
            "--tokenizer", "chat_demo"]
    assert preprocess_main(argv) == 0
    assert "240 conversations" in capsys.readouterr().out
    # One preprocessed set holds both files: compare with their concatenation.
    joined = write_chat_jsonl(files["folder"] / "ab.jsonl", files["a_convs"] + files["b_convs"])
    expected, expected_valid = build_chat_datasets(config([joined], split="95,5,0"), SEQ, 9, 30, 4,
                                                   tokenizer)
    got, got_valid = build_chat_datasets(config([prefix], split="95,5,0"), SEQ, 9, 30, 4, tokenizer)
    assert len(got) == len(expected) and len(got_valid) == len(expected_valid)
    for mine, theirs in ((got, expected), (got_valid, expected_valid)):
        for row in range(len(theirs)):
            assert all(np.array_equal(mine[row][k], theirs[row][k]) for k in theirs[row])


def test_preprocessed_set_refuses_another_chat_template(files, tmp_path):
    prefix = tmp_path / "set"
    write_chat_jsonl(tmp_path / "x.jsonl", conversations("a", 5, seed=8))
    assert preprocess_main(["--chat", str(tmp_path / "x.jsonl"), "--output-prefix", str(prefix),
                            "--tokenizer", "chat_demo"]) == 0
    assert metadata_path(str(prefix)).endswith(".chat.json")
    other = copy_demo_tokenizer(tmp_path / "tok", {"chat_template": "{{ messages[0]['content'] }}"})
    cfg = DataConfig(kind="chat", paths=[str(prefix)], tokenizer=str(other))
    with pytest.raises(ValueError, match="another tokenizer or chat template"):
        build_chat_datasets(cfg, SEQ, 1, 1, 0, build_tokenizer(str(other)))
