"""Tokenize text into a Megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`).

    falcon-preprocess corpus.jsonl more.jsonl.gz --output-prefix data/corpus --tokenizer byte
    python -m recipes.data.preprocess book.txt --output-prefix data/book --tokenizer tokenizer.json
    falcon-preprocess --chat chats.jsonl --output-prefix data/chats --tokenizer instruct_model_dir

With --chat the inputs are conversations and the output is a chat set (token ids
plus an assistant mask; see chat_sources.py) for `data.kind: chat`.

Inputs ending in .jsonl / .json (optionally .gz) hold one JSON object per line
and the document is the value under `--json-key` (default "text"). Any other
file (optionally .gz) is plain text and is one document. Each document is
written as its token ids followed by the tokenizer's eod id, the layout
Megatron's GPTDataset expects. Empty documents are skipped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from recipes.data.tokenizer import build_tokenizer

JSON_SUFFIXES = (".jsonl", ".json")
# Documents handed to the tokenizer at once: large enough for encode_batch's
# thread pool to pay off, small enough to keep memory flat on big corpora.
BATCH_DOCUMENTS = 512


@dataclass
class PreprocessStats:
    documents: int
    tokens: int
    seconds: float


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _is_json_lines(path: Path) -> bool:
    name = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    return name.endswith(JSON_SUFFIXES)


def read_documents(path: str | Path, json_key: str = "text") -> Iterator[str]:
    """Yield the documents of one input file (see the module docstring for formats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {str(path)!r}: no such file")
    with _open_text(path) as stream:
        if not _is_json_lines(path):
            yield stream.read()
            return
        for line_number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{line_number}: not a JSON object ({error})") from error
            if not isinstance(record, dict) or json_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{line_number}: no key {json_key!r} (--json-key); the line has {keys}"
                )
            yield str(record[json_key])


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_indexed_dataset(
    documents: Iterable[str], tokenizer, output_prefix: str | Path
) -> PreprocessStats:
    """Tokenize `documents`, append eod to each, write `output_prefix`.bin/.idx.

    Written under temporary names and renamed at the end, so a reader never sees
    a half-written dataset.
    """
    start = time.perf_counter()
    output_prefix = str(output_prefix)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    temp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    eod = np.array([tokenizer.eod], dtype=dtype)
    builder = IndexedDatasetBuilder(get_bin_path(temp_prefix), dtype=dtype)
    documents_written = tokens_written = 0
    try:
        for batch in _batched((d for d in documents if d), BATCH_DOCUMENTS):
            for ids in tokenizer.tokenize_batch(batch):
                if len(ids) == 0:
                    continue
                document = np.concatenate([np.asarray(ids, dtype=dtype), eod])
                builder.add_document(document, [document.size])
                documents_written += 1
                tokens_written += document.size
        builder.finalize(get_idx_path(temp_prefix))
        os.replace(get_bin_path(temp_prefix), get_bin_path(output_prefix))
        os.replace(get_idx_path(temp_prefix), get_idx_path(output_prefix))
    finally:
        for leftover in (get_bin_path(temp_prefix), get_idx_path(temp_prefix)):
            if os.path.exists(leftover):
                os.remove(leftover)
    return PreprocessStats(documents_written, tokens_written, time.perf_counter() - start)


def preprocess_files(
    inputs: Sequence[str | Path],
    tokenizer,
    output_prefix: str | Path,
    json_key: str = "text",
) -> PreprocessStats:
    documents = (doc for path in inputs for doc in read_documents(path, json_key))
    return write_indexed_dataset(documents, tokenizer, output_prefix)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="falcon-preprocess",
        description="Tokenize jsonl or plain-text files into a Megatron indexed dataset "
        "(PREFIX.bin + PREFIX.idx) for data.paths.",
    )
    parser.add_argument("inputs", nargs="+", help=".jsonl/.json[.gz] (one object per line) "
                        "or plain-text files (one document each)")
    parser.add_argument("--output-prefix", required=True,
                        help="written as PREFIX.bin and PREFIX.idx; use PREFIX in data.paths")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' or the path of a Hugging Face tokenizer.json (default: byte)")
    parser.add_argument("--json-key", default=None,
                        help="key holding the document in jsonl inputs (default: text)")
    parser.add_argument("--chat", action="store_true",
                        help="inputs are conversations ({\"messages\": [...]} per line), "
                        "rendered with the tokenizer folder's chat template; writes a chat set "
                        "for data.kind=chat")
    args = parser.parse_args(argv)
    if args.chat and args.json_key is not None:
        parser.error(f"--json-key {args.json_key!r} is for text inputs; --chat lines hold "
                     f"\"messages\"")
    return args


def _preprocess_chat(args) -> str:
    from recipes.data.chat_sources import write_chat_indexed_dataset

    tokenizer = build_tokenizer(args.tokenizer)
    stats = write_chat_indexed_dataset(args.inputs, tokenizer, args.output_prefix)
    return (
        f"wrote chat set {args.output_prefix}: {stats.conversations} conversations, "
        f"{stats.tokens} tokens ({stats.assistant_tokens} assistant), skipped "
        f"{stats.skipped_no_assistant} without an assistant turn, in {stats.seconds:.1f}s"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        if args.chat:
            print(_preprocess_chat(args))
            return 0
        tokenizer = build_tokenizer(args.tokenizer)
        stats = preprocess_files(args.inputs, tokenizer, args.output_prefix,
                                 args.json_key or "text")
    except (ValueError, FileNotFoundError) as error:
        print(f"falcon-preprocess: error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output_prefix}.bin/.idx: {stats.documents} documents, "
        f"{stats.tokens} tokens (vocab_size {tokenizer.vocab_size}) in {stats.seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
