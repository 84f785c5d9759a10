"""Where tokenized conversations come from: JSON-lines files tokenized in memory at
start (small sets), or a set preprocessed to disk (large sets).

`falcon-preprocess --chat a.jsonl --output-prefix PREFIX --tokenizer DIR` writes
three things next to each other:
  PREFIX.bin/.idx                  token ids, one Megatron indexed-dataset document
                                   per conversation (no eod: the template ends turns)
  PREFIX_assistant_mask.bin/.idx   its assistant mask (uint8), same lengths
  PREFIX.chat.json                 format, tokenizer + template fingerprint, counts
`data.paths: [PREFIX]` with `data.kind: chat` reads them back; a set made with
another tokenizer or chat template is refused instead of giving wrong tokens.
No sequence length is fixed here: truncation and packing happen at training.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from recipes.data.chat import read_chat_file, tokenize_conversations

FORMAT = "falcon-chat-v1"
MASK_SUFFIX = "_assistant_mask"
METADATA_SUFFIX = ".chat.json"


def metadata_path(prefix: str) -> str:
    return f"{prefix}{METADATA_SUFFIX}"


def _megatron_indexed_dataset():
    # Imported on use: the config checks (recipes.data.chat_validation) read this module
    # before any job starts, and importing Megatron Core takes seconds.
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def get_bin_path(prefix: str) -> str:
    return _megatron_indexed_dataset().get_bin_path(prefix)


def get_idx_path(prefix: str) -> str:
    return _megatron_indexed_dataset().get_idx_path(prefix)


def chat_indexed_files(prefix: str) -> list[str]:
    """Every file a preprocessed chat set consists of."""
    files = [get_bin_path(prefix), get_idx_path(prefix)]
    files += [get_bin_path(prefix + MASK_SUFFIX), get_idx_path(prefix + MASK_SUFFIX)]
    return files + [metadata_path(prefix)]


@dataclass
class ChatPreprocessStats:
    conversations: int
    tokens: int
    assistant_tokens: int
    skipped_no_assistant: int
    seconds: float


def write_chat_indexed_dataset(
    inputs: Sequence[str | Path], tokenizer, output_prefix: str | Path
) -> ChatPreprocessStats:
    """Read, check and tokenize every input file; write the set atomically (renamed at the end)."""
    start = time.perf_counter()
    output_prefix = str(output_prefix)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    temp = f"{output_prefix}.tmp-{os.getpid()}"
    indexed = _megatron_indexed_dataset()
    token_dtype = indexed.DType.optimal_dtype(tokenizer.vocab_size)
    tokens_out = indexed.IndexedDatasetBuilder(get_bin_path(temp), dtype=token_dtype)
    mask_out = indexed.IndexedDatasetBuilder(get_bin_path(temp + MASK_SUFFIX), dtype=np.uint8)
    stats = ChatPreprocessStats(0, 0, 0, 0, 0.0)
    try:
        for path in inputs:
            chat_file = read_chat_file(path)
            stats.skipped_no_assistant += len(chat_file.skipped_no_assistant)
            for ids, mask in tokenize_conversations(chat_file.conversations, tokenizer):
                tokens_out.add_document(ids.astype(token_dtype), [ids.size])
                mask_out.add_document(mask, [mask.size])
                stats.conversations += 1
                stats.tokens += ids.size
                stats.assistant_tokens += int(mask.sum())
        tokens_out.finalize(get_idx_path(temp))
        mask_out.finalize(get_idx_path(temp + MASK_SUFFIX))
        stats.seconds = time.perf_counter() - start
        metadata = {
            "format": FORMAT, "tokenizer_fingerprint": tokenizer.chat_fingerprint,
            "inputs": [str(p) for p in inputs], "conversations": stats.conversations,
            "tokens": stats.tokens, "assistant_tokens": stats.assistant_tokens,
            "skipped_no_assistant": stats.skipped_no_assistant,
        }
        Path(metadata_path(temp)).write_text(json.dumps(metadata, indent=2) + "\n")
        for temp_file, final in zip(chat_indexed_files(temp), chat_indexed_files(output_prefix)):
            os.replace(temp_file, final)
    finally:
        for leftover in chat_indexed_files(temp):
            if os.path.exists(leftover):
                os.remove(leftover)
    return stats


def read_metadata(prefix: str) -> dict:
    try:
        metadata = json.loads(Path(metadata_path(prefix)).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"data.paths entry {prefix!r}: {metadata_path(prefix)} is missing or unreadable "
            f"({error}); make the set with falcon-preprocess --chat."
        ) from error
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"data.paths entry {prefix!r}: {metadata_path(prefix)} has format "
            f"{metadata.get('format')!r}; allowed: {FORMAT!r} (rerun falcon-preprocess --chat)."
        )
    return metadata


class IndexedChatSource:
    """A preprocessed chat set read through memory maps (picklable for DataLoader workers)."""

    def __init__(self, prefix: str, tokenizer) -> None:
        metadata = read_metadata(prefix)
        if metadata["tokenizer_fingerprint"] != tokenizer.chat_fingerprint:
            raise ValueError(
                f"data.paths entry {prefix!r} was tokenized with another tokenizer or chat "
                f"template than data.tokenizer = {tokenizer.path!r}; allowed: the data.tokenizer "
                f"it was made with, or rerun falcon-preprocess --chat with this one."
            )
        self.name = prefix
        self.skipped_no_assistant = int(metadata["skipped_no_assistant"])
        indexed = _megatron_indexed_dataset()
        self._tokens = indexed.IndexedDataset(prefix)
        self._masks = indexed.IndexedDataset(prefix + MASK_SUFFIX)
        self.lengths = np.asarray(self._tokens.sequence_lengths, dtype=np.int64)
        if not np.array_equal(self.lengths, self._masks.sequence_lengths):
            raise ValueError(f"data.paths entry {prefix!r}: its token and assistant-mask files "
                             f"disagree on conversation lengths; rerun falcon-preprocess --chat.")

    def conversation(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._tokens[index].astype(np.int64), self._masks[index]


class TokenizedChatSource:
    """Conversations of JSON-lines files tokenized in memory, as flat arrays."""

    def __init__(self, name: str, pairs: Iterable[tuple[np.ndarray, np.ndarray]],
                 skipped_no_assistant: int) -> None:
        pairs = list(pairs)
        self.name = name
        self.skipped_no_assistant = skipped_no_assistant
        self.lengths = np.array([ids.size for ids, _ in pairs], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self._tokens = np.concatenate([ids for ids, _ in pairs]) if pairs else np.zeros(0, np.int64)
        self._masks = np.concatenate([m for _, m in pairs]) if pairs else np.zeros(0, np.uint8)

    @classmethod
    def from_file(cls, path: str, tokenizer) -> "TokenizedChatSource":
        chat_file = read_chat_file(path)
        pairs = tokenize_conversations(chat_file.conversations, tokenizer)
        return cls(path, pairs, len(chat_file.skipped_no_assistant))

    def conversation(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        begin, end = self._offsets[index], self._offsets[index + 1]
        return self._tokens[begin:end], self._masks[begin:end]
