"""kernels.documents: the forms of HF's packed convention (position_ids restarting at 0 at every
document) against hand-written expectations and explicit loops."""

import pytest
import torch

from falcon_h1.kernels.documents import check_seq_idx, documents_from_position_ids
from tests.falcon_h1.packed_rows import position_ids


def test_seq_idx_and_cu_seqlens_from_position_ids():
    docs = documents_from_position_ids(position_ids([[3, 1, 2], [6]]))
    assert docs.seq_idx.dtype == torch.int32
    assert docs.seq_idx.tolist() == [[0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 0, 0]]
    assert docs.cu_seqlens.tolist() == [0, 3, 4, 6, 12]   # over the rows flattened row-major
    assert docs.cu_seqlens.dtype == torch.int32
    assert docs.max_seqlen == 6


def test_a_row_not_starting_at_position_zero_starts_a_document():
    docs = documents_from_position_ids(torch.tensor([[4, 5, 0, 1], [0, 1, 2, 0]]))
    assert docs.seq_idx.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert docs.cu_seqlens.tolist() == [0, 2, 4, 7, 8]


def test_attention_mask_is_causal_within_documents():
    rows = [[3, 1, 4], [5, 3]]
    docs = documents_from_position_ids(position_ids(rows))
    want = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    for b, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            for t in range(start, start + n):
                for u in range(start, t + 1):
                    want[b, 0, t, u] = True
            start += n
    assert torch.equal(docs.attention_mask, want)


def test_block_mask_matches_the_boolean_mask():
    rows = [[70, 90, 40]]   # more than one 128-token block
    docs = documents_from_position_ids(position_ids(rows))
    dense = docs.block_mask.to_dense()   # [b, h, q blocks, kv blocks]: blocks with any allowed entry
    mask = docs.attention_mask[0, 0]
    for qb in range(dense.shape[2]):
        for kb in range(dense.shape[3]):
            any_allowed = mask[qb * 128:(qb + 1) * 128, kb * 128:(kb + 1) * 128].any().item()
            assert bool(dense[0, 0, qb, kb]) == any_allowed, (qb, kb)


def test_block_mask_rule_takes_the_indices_of_whole_blocks():
    """create_block_mask may evaluate the rule past the row's end, up to a whole 128-token block
    (on CUDA an out-of-range lookup is a device-side assert): there it must answer, and allow
    no real query to see a padded key."""
    docs = documents_from_position_ids(position_ids([[13, 37, 22]]))   # 72 tokens, one partial block
    rule = docs.block_mask.mask_mod
    at = lambda i: torch.tensor(i)
    assert not rule(at(0), at(0), at(71), at(127))        # a real query, a padded key
    assert rule(at(0), at(0), at(71), at(50))             # the last document's first token
    assert not rule(at(0), at(0), at(71), at(49))         # the middle document's last token
    rule(at(0), at(0), at(127), at(127))                  # a padded query: answered, not an IndexError


@pytest.mark.parametrize("bad", [torch.zeros(6), torch.zeros(1, 6), torch.zeros(1, 6, dtype=torch.bool)])
def test_bad_position_ids_are_refused(bad):
    with pytest.raises(ValueError, match="position_ids"):
        documents_from_position_ids(bad)


def test_seq_idx_of_the_wrong_shape_or_dtype_is_refused():
    check_seq_idx(None, (2, 5))
    check_seq_idx(torch.zeros(2, 5, dtype=torch.int32), (2, 5))
    for bad in (torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 5, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"seq_idx.*int32 of shape \[batch, seq\] = \[2, 5\]"):
            check_seq_idx(bad, (2, 5))
