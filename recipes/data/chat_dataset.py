"""`data.kind: chat`: train/valid datasets of conversation rows from `data.*`.

    train, valid = build_chat_datasets(recipe.data, seq_length, seed,
                                       num_train_samples, num_valid_samples, tokenizer)
    batches = make_data_iterator(train, micro_batch_size, dp_rank, dp_size, consumed_samples, seed)

The same signature and sample keys as the pretraining datasets, so the same
iterator (and its resume from `consumed_samples` rows) serves both. Every rank
builds the same datasets from the same inputs: nothing depends on the rank.

* Sources: each `data.paths` entry is a JSON-lines file (tokenized at start),
  a prefix made by `falcon-preprocess --chat`, or `chat_demo` (the bundled set).
* Split by conversation (`data.split` shares): a permutation with a fixed seed,
  independent of `train.seed`, so changing the run's seed never moves a
  conversation between train and valid.
* Too long for a row (`data.overlong`): `truncate` keeps the first seq_length
  tokens (dropped if no assistant token is left to learn), `drop` skips it;
  both counted in the report.
* Epochs: without weights an epoch is every train conversation once; with
  weights (`[0.7, a, 0.3, b]`) an epoch draws round(share * total) conversations
  from each source, walking each source's own reshuffled passes, so a small
  source is repeated and a large one is seen part by part across epochs.
  Each epoch is shuffled with (train.seed, epoch) and packed on its own
  (`data.packing`, see chat_packing.py); epochs are appended until the run's
  `num_train_samples` rows exist.
* Valid: every source's valid conversations once, in a fixed shuffled order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from recipes.data.chat import is_chat_file
from recipes.data.chat_demo import CHAT_DEMO, TRAIN_FILE as CHAT_DEMO_FILE
from recipes.data.chat_packing import one_per_row, pack_best_fit_decreasing, row_sample
from recipes.data.chat_sources import IndexedChatSource, TokenizedChatSource
from recipes.data.chat_validation import validate_chat_data_config
from recipes.data.validation import parse_blend, parse_split

logger = logging.getLogger(__name__)

# The split's permutation seed: fixed, so train/valid membership never depends on train.seed.
SPLIT_SEED = 20261202
_EPOCH_ORDER, _SOURCE_PASS, _VALID_ORDER = 1, 2, 3  # streams of the seeded generators


def open_chat_source(entry: str, tokenizer):
    if entry == CHAT_DEMO:
        entry = str(CHAT_DEMO_FILE)
    if is_chat_file(entry):
        return TokenizedChatSource.from_file(entry, tokenizer)
    return IndexedChatSource(entry, tokenizer)


@dataclass
class SourceCounts:
    name: str
    conversations: int = 0
    skipped_no_assistant: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_truncated_without_assistant: int = 0


@dataclass
class RowsCounts:
    rows: int = 0
    conversations: int = 0
    real_tokens: int = 0
    row_tokens: int = 0
    epochs: int = 0

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / row tokens: what share of the model's compute sees conversation text."""
        return self.real_tokens / max(1, self.row_tokens)


@dataclass
class ChatDataReport:
    """What building the chat datasets kept, skipped and packed; `lines()` says it."""

    seq_length: int
    packing: bool
    overlong: str
    sources: list[SourceCounts] = field(default_factory=list)
    train: RowsCounts = field(default_factory=RowsCounts)
    valid: RowsCounts = field(default_factory=RowsCounts)

    def lines(self) -> list[str]:
        out = []
        for s in self.sources:
            out.append(
                f"chat data {s.name}: {s.conversations} conversations; skipped "
                f"{s.skipped_no_assistant} without an assistant turn; longer than seq_length "
                f"{self.seq_length} (data.overlong = {self.overlong}): {s.truncated} truncated, "
                f"{s.dropped_overlong} dropped, {s.dropped_truncated_without_assistant} dropped "
                f"as no assistant token was left after truncation"
            )
        mode = "packed" if self.packing else "one conversation per row"
        for name, rows in (("train", self.train), ("valid", self.valid)):
            if rows.rows:
                out.append(
                    f"chat {name}: {rows.rows} rows of {self.seq_length} tokens ({mode}) from "
                    f"{rows.conversations} conversations over {rows.epochs} epoch(s); packing "
                    f"efficiency {rows.packing_efficiency:.1%} (real tokens / row tokens)"
                )
        return out


class ChatRowsDataset(torch.utils.data.Dataset):
    """Rows of whole conversations; item i is row i's sample (see chat_packing.py)."""

    def __init__(self, sources, rows: list[np.ndarray], seq_length: int, filler: int,
                 counts: RowsCounts, report: ChatDataReport) -> None:
        self.sources = sources
        self.seq_length = seq_length
        self.filler = filler
        self.counts = counts
        self.report = report
        # Row i holds conversations (source_of[j], index_of[j]) for j in starts[i]:starts[i+1].
        pairs = np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)
        self._starts = np.concatenate([[0], np.cumsum([len(row) for row in rows])])
        self._source_of, self._index_of = pairs[:, 0], pairs[:, 1]
        counts.rows = len(rows)
        counts.row_tokens = len(rows) * seq_length

    def __len__(self) -> int:
        return len(self._starts) - 1

    def conversations(self, row: int) -> list[tuple[int, int]]:
        """(source number, conversation index) of each conversation in row `row`, in order."""
        span = slice(self._starts[row], self._starts[row + 1])
        return list(zip(self._source_of[span].tolist(), self._index_of[span].tolist()))

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        pieces = []
        for source, index in self.conversations(row):
            ids, mask = self.sources[source].conversation(index)
            pieces.append((ids[: self.seq_length], mask[: self.seq_length]))
        return row_sample(pieces, self.seq_length, self.filler)


def _split(count: int, fractions: list[float]) -> list[np.ndarray]:
    order = np.random.RandomState(SPLIT_SEED).permutation(count)
    bounds = np.round(np.cumsum([0.0] + fractions) * count).astype(int)
    return [np.sort(order[bounds[i]:bounds[i + 1]]) for i in range(len(fractions))]


def _apply_overlong(source, indices: np.ndarray, seq_length: int, policy: str,
                    counts: SourceCounts) -> np.ndarray:
    over = source.lengths[indices] > seq_length
    if policy == "drop":
        counts.dropped_overlong += int(over.sum())
        return indices[~over]
    keep = np.ones(len(indices), dtype=bool)
    for position in np.flatnonzero(over):
        _, mask = source.conversation(int(indices[position]))
        if mask[1:seq_length].any():  # position 0 is never a label
            counts.truncated += 1
        else:
            keep[position] = False
            counts.dropped_truncated_without_assistant += 1
    return indices[keep]


def _weighted_epoch(train: list[np.ndarray], weights: list[float], seed: int,
                    epoch: int) -> list[np.ndarray]:
    total = sum(len(indices) for indices in train)
    shares = np.asarray(weights) / sum(weights)
    picked = []
    for source, indices in enumerate(train):
        quota = max(1, int(round(shares[source] * total)))
        positions = np.arange(epoch * quota, (epoch + 1) * quota)
        passes = positions // len(indices)
        chosen = np.empty(quota, dtype=np.int64)
        for one_pass in np.unique(passes):
            order = np.random.RandomState([seed, _SOURCE_PASS, source, int(one_pass)]).permutation(
                len(indices))
            here = passes == one_pass
            chosen[here] = indices[order[positions[here] % len(indices)]]
        picked.append(chosen)
    return picked


def _rows(picked: list[np.ndarray], order_seed: list[int], sources, seq_length: int,
          packing: bool, counts: RowsCounts) -> list[np.ndarray]:
    """One pass over `picked` (per source, conversation indices): shuffled, then packed."""
    pairs = np.concatenate([np.stack([np.full(len(ix), s), ix], axis=1)
                            for s, ix in enumerate(picked)]).astype(np.int64)
    lengths = np.concatenate([sources[s].lengths[ix] for s, ix in enumerate(picked)])
    order = np.random.RandomState(order_seed).permutation(len(pairs))
    pairs, lengths = pairs[order], np.minimum(lengths[order], seq_length)
    groups = pack_best_fit_decreasing(lengths, seq_length) if packing else one_per_row(len(pairs))
    counts.conversations += len(pairs)
    counts.real_tokens += int(np.sum(lengths))
    counts.epochs += 1
    return [pairs[group] for group in groups]


def build_chat_datasets(data_cfg, seq_length: int, seed: int, num_train_samples: int,
                        num_valid_samples: int, tokenizer):
    """(train, valid) ChatRowsDatasets; valid is None when data.split gives it no share.

    `train` has at least `num_train_samples` rows (whole epochs); `num_valid_samples`
    is accepted for the pretraining signature: the valid set is one pass, which the
    iterator repeats as needed. `train.report` (a ChatDataReport) says what was
    skipped, truncated and how well rows are filled; it is logged here too.
    """
    validate_chat_data_config(data_cfg)
    entries, weights = parse_blend(data_cfg.paths)
    fractions = parse_split(data_cfg.split)
    report = ChatDataReport(seq_length, data_cfg.packing, data_cfg.overlong)
    sources, train_parts, valid_parts = [], [], []
    for entry in entries:
        source = open_chat_source(entry, tokenizer)
        counts = SourceCounts(source.name, len(source.lengths), source.skipped_no_assistant)
        train_ix, valid_ix, _ = _split(len(source.lengths), fractions)
        train_ix = _apply_overlong(source, train_ix, seq_length, data_cfg.overlong, counts)
        valid_ix = _apply_overlong(source, valid_ix, seq_length, data_cfg.overlong, counts)
        if not len(train_ix):
            raise ValueError(
                f"data.paths entry {entry!r} leaves no train conversation (data.split = "
                f"{data_cfg.split!r}, data.overlong = {data_cfg.overlong!r}, seq_length "
                f"{seq_length}, {counts.conversations} conversations); allowed: a larger "
                f"train share, a longer seq_length or data.overlong = truncate."
            )
        sources.append(source)
        train_parts.append(train_ix)
        valid_parts.append(valid_ix)
        report.sources.append(counts)
    filler = tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod

    train_rows: list[np.ndarray] = []
    while len(train_rows) < max(1, num_train_samples):
        epoch = report.train.epochs
        picked = train_parts if weights is None else _weighted_epoch(train_parts, weights, seed, epoch)
        train_rows += _rows(picked, [seed, _EPOCH_ORDER, epoch], sources, seq_length,
                            data_cfg.packing, report.train)
    train = ChatRowsDataset(sources, train_rows, seq_length, filler, report.train, report)

    valid = None
    if fractions[1] > 0:
        if not sum(len(ix) for ix in valid_parts):
            raise ValueError(
                f"data.split = {data_cfg.split!r} leaves the valid split without conversations; "
                f"allowed: a larger valid share, or 0 for no validation."
            )
        valid_rows = _rows(valid_parts, [seed, _VALID_ORDER], sources, seq_length,
                           data_cfg.packing, report.valid)
        valid = ChatRowsDataset(sources, valid_rows, seq_length, filler, report.valid, report)
    for line in report.lines():
        logger.info(line)
    return train, valid
