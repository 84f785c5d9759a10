"""Issue 18 item 10: bad data fails before training, naming the file.

Token ids beyond the model's vocabulary used to crash inside the embedding mid-run, and a
truncated .idx/.bin gave errors without the file name."""

from __future__ import annotations

import numpy as np
import pytest

from recipes.api import compose_recipe
from recipes.config import DataConfig
from recipes.data import build_tokenizer, validate_data_config
from recipes.data.preprocess import write_indexed_dataset
from tests.recipes import reliability_runs as runs


def _write_ids(prefix, documents: list[list[int]], dtype=np.int32) -> str:
    """An indexed dataset holding exactly these token ids (Megatron's own writer)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for document in documents:
        builder.add_document(np.array(document, dtype=dtype), [len(document)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_token_ids_beyond_the_vocabulary_stop_training_before_it_starts(megatron_single, tmp_path):
    from recipes.training import train

    documents = [[5, 6, 7] * 50 for _ in range(40)] + [[1, 2, 400, 3] * 40]
    prefix = _write_ids(tmp_path / "ids", documents)
    recipe = compose_recipe(runs.COMMON + [f"train.run_dir={tmp_path / 'run'}", "train.max_steps=4",
                                           f"data.paths=[{prefix}]", f"data.cache_dir={tmp_path / 'cache'}",
                                           "data.split='100,0,0'"])
    with pytest.raises(ValueError) as error:
        train(recipe)
    message = str(error.value)
    assert f"{prefix}.bin holds token ids 1..400" in message and "model.vocab_size = 320" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # Ids inside the vocabulary pass (the scan is remembered per file version).
    from recipes.data.validation import check_token_ids_fit

    fine = _write_ids(tmp_path / "fine", [[5, 6, 319] * 30 for _ in range(10)])
    check_token_ids_fit(DataConfig(paths=[fine], cache_dir=str(tmp_path / "cache")), 320)
    check_token_ids_fit(DataConfig(paths=[fine], cache_dir=str(tmp_path / "cache")), 320)
    with pytest.raises(ValueError, match=r"fine\.bin holds token ids 5\.\.319"):
        check_token_ids_fit(DataConfig(paths=[fine], cache_dir=str(tmp_path / "cache")), 300)


@pytest.mark.parametrize("suffix, cut, said", [
    (".bin", 7, r"\.bin is truncated: \d+ bytes, but .*\.idx describes \d+ bytes of tokens"),
    (".idx", 5, r"\.idx is truncated: \d+ bytes, but its header .* needs \d+"),
    (".idx", 10**6, r"\.idx is not a Megatron index file"),
])
def test_truncated_index_or_token_file_is_named(tmp_path, suffix, cut, said):
    prefix = tmp_path / "corpus"
    write_indexed_dataset(["some text", "more text here"] * 20, build_tokenizer("byte"), prefix)
    path = tmp_path / f"corpus{suffix}"
    with open(path, "r+b") as stream:
        stream.truncate(max(path.stat().st_size - cut, 0))
    with pytest.raises(ValueError, match=said) as error:
        validate_data_config(DataConfig(paths=[str(prefix)]))
    assert str(path) in str(error.value) and "data.paths" in str(error.value)
