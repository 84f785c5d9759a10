"""Packed rows for the document-boundary tests: HF-convention position_ids built from
document lengths, and where each document lies, so a test can run every document alone."""

import torch


def position_ids(rows: list[list[int]]) -> torch.Tensor:
    """[[len, len, ...], ...] (equal row totals) -> position_ids [b, s] restarting at every document."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])


def documents(rows: list[list[int]]):
    """-> [(row, start, end)] of every document, in row-major order."""
    spans = []
    for row, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            spans.append((row, start, start + n))
            start += n
    return spans
