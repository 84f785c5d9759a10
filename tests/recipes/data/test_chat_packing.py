"""Packing and row samples vs plain-Python references.

Best-fit decreasing is checked against a naive O(n^2) implementation written
here (same rule, other data structures: rows with equal room are
interchangeable, so the multiset of row fills must agree); a row's sample is
checked position by position against the definition of next-token labels
inside each document.
"""

import random

import numpy as np
import pytest

from recipes.data.chat_packing import one_per_row, pack_best_fit_decreasing, row_sample


def naive_best_fit_decreasing(lengths, capacity):
    fills = []
    for length in sorted(lengths, reverse=True):
        fitting = [i for i, fill in enumerate(fills) if fill + length <= capacity]
        if fitting:
            best = min(fitting, key=lambda i: capacity - fills[i])
            fills[best] += length
        else:
            fills.append(length)
    return sorted(fills)


@pytest.mark.parametrize("seed", range(6))
def test_best_fit_decreasing_matches_naive_reference(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 37, 128])
    lengths = [rng.randint(1, capacity) if rng.random() < 0.2 else rng.randint(1, capacity // 3 + 1)
               for _ in range(rng.randint(1, 300))]
    rows = pack_best_fit_decreasing(lengths, capacity)
    # Every conversation exactly once, whole, and rows never overfull.
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    assert sorted(sum(lengths[i] for i in row) for row in rows) == naive_best_fit_decreasing(
        lengths, capacity)
    # Stream order inside a row and across rows (by their first conversation).
    assert all(row == sorted(row) for row in rows)
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)
    assert len(rows) >= -(-sum(lengths) // capacity)


def test_packing_refuses_items_that_do_not_fit():
    with pytest.raises(ValueError, match="1..8"):
        pack_best_fit_decreasing([3, 9], 8)
    assert one_per_row(3) == [[0], [1], [2]]


def random_conversation(rng, length):
    ids = np.array([rng.randrange(5, 300) for _ in range(length)], dtype=np.int64)
    mask = np.array([rng.random() < 0.5 for _ in range(length)], dtype=np.uint8)
    return ids, mask


@pytest.mark.parametrize("lengths", [[5, 1, 7], [16], [3, 13], [2, 2, 2, 2, 2, 2]])
def test_row_sample_labels_masks_and_positions_per_document(lengths):
    rng = random.Random(sum(lengths))
    seq_length, filler = 16, 1
    pieces = [random_conversation(rng, n) for n in lengths]
    sample = row_sample(pieces, seq_length, filler)
    assert {k: v.shape for k, v in sample.items()} == {k: (seq_length,) for k in sample}
    # Reference: walk the documents position by position.
    expected = {"tokens": [], "labels": [], "loss_mask": [], "position_ids": []}
    for ids, mask in pieces:
        for j in range(len(ids)):
            last = j == len(ids) - 1
            expected["tokens"].append(int(ids[j]))
            expected["labels"].append(filler if last else int(ids[j + 1]))
            expected["loss_mask"].append(0.0 if last else float(mask[j + 1]))
            expected["position_ids"].append(j)
    pad = seq_length - len(expected["tokens"])
    expected["tokens"] += [filler] * pad
    expected["labels"] += [filler] * pad
    expected["loss_mask"] += [0.0] * pad
    expected["position_ids"] += list(range(pad))
    for key, values in expected.items():
        assert sample[key].tolist() == values, key
    # Documents are recovered from position_ids alone (every 0 starts one), whole and in order.
    starts = np.flatnonzero(sample["position_ids"] == 0).tolist() + [seq_length]
    documents = [sample["tokens"][a:b].tolist() for a, b in zip(starts, starts[1:])]
    assert documents[: len(pieces)] == [ids.tolist() for ids, _ in pieces]


def test_row_sample_refuses_overfull_row():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="do not fit"):
        row_sample([random_conversation(rng, 5), random_conversation(rng, 5)], 8, 0)
