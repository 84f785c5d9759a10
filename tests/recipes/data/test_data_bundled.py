"""The shipped public-domain corpus: size, provenance, first-use build, concurrent builders."""

import gzip
import json
import threading
import time
from pathlib import Path

from megatron.core.datasets.indexed_dataset import IndexedDataset

from recipes.config import DataConfig
from recipes.data import bundled, build_tokenizer, build_train_valid_datasets
BYTE_EOD = 256


def corpus_texts():
    with gzip.open(bundled.CORPUS_FILE, "rt", encoding="utf-8") as stream:
        return [json.loads(line)["text"] for line in stream]


def test_corpus_is_small_documented_public_domain_jsonl():
    assert bundled.CORPUS_FILE.stat().st_size < 5 * 2**20
    texts = corpus_texts()
    assert len(texts) > 100 and all(texts)
    assert 1 * 2**20 < sum(len(t.encode("utf-8")) for t in texts) < 5 * 2**20
    source = (bundled.CORPUS_DIR / "SOURCE.md").read_text()
    assert "public domain" in source.lower() and "Jane Austen" in source


def test_bundled_build_matches_corpus_and_is_fast_and_cached(tmp_path):
    tokenizer = build_tokenizer("byte")
    start = time.perf_counter()
    prefix = bundled.ensure_bundled_dataset(tokenizer, str(tmp_path))
    assert time.perf_counter() - start < 20
    dataset = IndexedDataset(prefix)
    texts = corpus_texts()
    assert len(dataset) == len(texts)
    for index in (0, len(texts) // 2, len(texts) - 1):
        assert dataset[index].tolist() == list(texts[index].encode("utf-8")) + [BYTE_EOD]
    stamp = Path(prefix + ".bin").stat().st_mtime_ns
    assert bundled.ensure_bundled_dataset(tokenizer, str(tmp_path)) == prefix
    assert Path(prefix + ".bin").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_concurrent_builders_build_once(tmp_path, monkeypatch):
    calls = []
    real = bundled.preprocess_files

    def slow_counting_preprocess(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)  # widen the race window
        return real(*args, **kwargs)

    monkeypatch.setattr(bundled, "preprocess_files", slow_counting_preprocess)
    tokenizer = build_tokenizer("byte")
    results = []

    def build():
        results.append(bundled._build_if_missing(tmp_path, tokenizer))

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3
    assert not list(tmp_path.glob("*partial*"))
    assert len(IndexedDataset(str(results[0]))) == len(corpus_texts())


def test_default_config_trains_on_bundled(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    train, valid = build_train_valid_datasets(cfg, 128, 1234, 64, 8, build_tokenizer("byte"))
    assert len(train) >= 64 and len(valid) >= 8
    assert train[0]["tokens"].max() < 320

