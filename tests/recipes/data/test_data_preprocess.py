"""falcon-preprocess -> Megatron IndexedDataset, read back and compared to independent
tokenization (Python's UTF-8 codec, the `tokenizers` library)."""

import gzip
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer

from recipes.data.preprocess import main
from tests.recipes.data.corpus_helpers import random_documents, train_tiny_bpe, write_jsonl

BYTE_EOD = 256


def read_back(prefix):
    dataset = IndexedDataset(str(prefix))
    return dataset, [dataset[i].tolist() for i in range(len(dataset))]


def test_byte_preprocess_of_jsonl_and_text_files(tmp_path):
    first = random_documents(7, seed=3)
    second = random_documents(4, seed=4)
    write_jsonl(tmp_path / "a.jsonl", first[:3] + [""] + first[3:])  # the empty one is skipped
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as stream:
        stream.write((tmp_path / "a.jsonl").read_text().replace('"text"', '"other"'))
    (tmp_path / "c.txt").write_text("\n\n".join(second), encoding="utf-8")

    assert main([str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "out")]) == 0
    dataset, documents = read_back(tmp_path / "out")
    assert documents == [list(text.encode("utf-8")) + [BYTE_EOD] for text in first]
    # A vocabulary of 320 fits uint16, as in Megatron's own preprocessing.
    assert dataset.index.dtype == np.uint16
    assert len(dataset.document_indices) == len(first) + 1

    inputs = [str(tmp_path / "b.jsonl.gz"), str(tmp_path / "c.txt")]
    assert main([*inputs, "--json-key", "other", "--output-prefix", str(tmp_path / "mix")]) == 0
    _, documents = read_back(tmp_path / "mix")
    expected = first + ["\n\n".join(second)]  # a plain-text file is one document
    assert documents == [list(text.encode("utf-8")) + [BYTE_EOD] for text in expected]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_hf_tokenizer_preprocess_matches_library(tmp_path):
    texts = random_documents(20, seed=5)
    bpe = train_tiny_bpe(tmp_path / "tokenizer.json", texts)
    write_jsonl(tmp_path / "docs.jsonl", texts)
    argv = [str(tmp_path / "docs.jsonl"), "--tokenizer", str(bpe), "--output-prefix"]
    assert main([*argv, str(tmp_path / "bpe")]) == 0
    reference = Tokenizer.from_file(str(bpe))
    eod = reference.token_to_id("<|endoftext|>")
    _, documents = read_back(tmp_path / "bpe")
    assert documents == [reference.encode(t, add_special_tokens=False).ids + [eod] for t in texts]


def test_missing_json_key_is_reported_with_line(tmp_path, capsys):
    write_jsonl(tmp_path / "docs.jsonl", ["x"], key="body")
    assert main([str(tmp_path / "docs.jsonl"), "--output-prefix", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "docs.jsonl:1" in err and "'text'" in err and "--json-key" in err


def test_module_entry_point(tmp_path):
    (tmp_path / "one.txt").write_text("héllo")
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.data.preprocess", str(tmp_path / "one.txt"),
         "--output-prefix", str(tmp_path / "one")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, documents = read_back(tmp_path / "one")
    assert documents == [list("héllo".encode("utf-8")) + [BYTE_EOD]]


@pytest.mark.parametrize("bad", [["--output-prefix", "x"], []])
def test_cli_requires_inputs_and_prefix(bad):
    with pytest.raises(SystemExit):
        main(bad)
