"""Whole conversations into `seq_length`-long rows, and the sample each row becomes.

Packing is best-fit decreasing: conversations are taken longest first (ties in
stream order) and each goes into the open row with the least room left that
still holds it, or opens a new row. It is never split. Best fit has the same
worst case as first fit (11/9 of the optimum row count, plus a constant) and
is O(n log seq_length) here: rows are kept in buckets by the room they have left.
A row then lists its conversations in stream order, and rows are ordered by
their first conversation, so the stream's shuffle decides what a batch holds.

A row's sample (the keys the training loop reads, as for pretraining):
  tokens        the conversations back to back, then filler up to seq_length
  labels        tokens shifted by one inside each conversation (filler at each
                conversation's last token and on filler)
  loss_mask     1 where the label is an assistant token, 0 elsewhere: never
                across a conversation boundary, never on filler
  position_ids  0, 1, ... restarting at every conversation and for the filler
                tail, so every position 0 starts a new document (Hugging Face's
                packed-sequence convention; the model needs no other argument)
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of item indices; every length must be in 1..capacity."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must be in 1..{capacity}; got {lengths.min()}..{lengths.max()}")
    rows: list[list[int]] = []
    rows_by_room: dict[int, list[int]] = {}
    rooms: list[int] = []  # sorted keys of rows_by_room with a row in them
    for item in np.argsort(-lengths, kind="stable"):
        length = int(lengths[item])
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms[at]
            row = rows_by_room[room].pop()
            if not rows_by_room[room]:
                del rooms[at]
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(int(item))
        room -= length
        if room:
            if not rows_by_room.get(room):
                rows_by_room[room] = []
                bisect.insort(rooms, room)
            rows_by_room[room].append(row)
    for row in rows:
        row.sort()
    rows.sort(key=lambda row: row[0])
    return rows


def one_per_row(count: int) -> list[list[int]]:
    return [[item] for item in range(count)]


def row_sample(conversations: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int,
               filler: int) -> dict[str, np.ndarray]:
    """The training sample of one row from its (token ids, assistant mask) pairs."""
    tokens = np.full(seq_length, filler, dtype=np.int64)
    labels = np.full(seq_length, filler, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.empty(seq_length, dtype=np.int64)
    start = 0
    for ids, mask in conversations:
        end = start + len(ids)
        if end > seq_length:
            raise ValueError(f"conversations of {end} tokens do not fit a row of {seq_length}")
        tokens[start:end] = ids
        labels[start:end - 1] = ids[1:]
        loss_mask[start:end - 1] = mask[1:]
        position_ids[start:end] = np.arange(len(ids))
        start = end
    position_ids[start:] = np.arange(seq_length - start)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids}
