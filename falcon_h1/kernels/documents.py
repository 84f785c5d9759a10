"""Where the documents of packed rows lie, in the forms the kernels take.

Hugging Face's packed-sequence convention: `position_ids` [b, s] restart at 0 at the first
token of every document, so a row holding several documents needs no other argument. The
first token of a row always starts a document (a row never continues the previous one).

From that, once per batch (every layer shares it):
- `seq_idx` [b, s] int32, the document number of each token within its row (0, 1, ...,
  non-decreasing): what mamba_ssm's SSD kernels and this package's conv kernels take;
- `attention_mask` [b, 1, s, s] bool, True where a query may attend a key (same document,
  key not after query): for SDPA and the unfused reference;
- `cu_seqlens` / `max_seqlen` over the b*s tokens flattened row-major: for varlen kernels;
- `block_mask`: FlexAttention's block-sparse form of the same mask.
Each is built on first use and kept (the object lives for one batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch


FLEX_BLOCK_SIZE = 128  # FlexAttention's default sparse block


@dataclass(frozen=True, eq=False)
class Documents:
    """The documents of a batch of packed rows (see the module docstring)."""

    seq_idx: torch.Tensor  # [b, s] int32, non-decreasing along each row, 0 at column 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.seq_idx.shape)

    @cached_property
    def attention_mask(self) -> torch.Tensor:
        """[b, 1, s, s] bool: query t may attend key u iff u <= t and both are in one document."""
        s = self.seq_idx.shape[1]
        same = self.seq_idx[:, :, None] == self.seq_idx[:, None, :]
        causal = torch.ones(s, s, dtype=torch.bool, device=self.seq_idx.device).tril()
        return (same & causal)[:, None]

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 [n + 1]: offsets of the n documents in the b*s tokens flattened row-major."""
        b, s = self.seq_idx.shape
        starts = _document_starts(self.seq_idx).flatten().nonzero().flatten()
        total = torch.tensor([b * s], device=starts.device, dtype=starts.dtype)
        return torch.cat([starts, total]).to(torch.int32)

    @cached_property
    def max_seqlen(self) -> int:
        """The longest document's length (a host sync, once per batch)."""
        return int(self.cu_seqlens.diff().max().item())

    @cached_property
    def block_mask(self):
        """FlexAttention BlockMask of `attention_mask` (built once, shared by every layer)."""
        from torch.nn.attention.flex_attention import create_block_mask

        b, s = self.seq_idx.shape
        # create_block_mask evaluates the mask on indices rounded up to whole blocks; on CUDA an index
        # past the row's end is a device-side assert (pytorch#137801), so the lookup has a -1 tail.
        # A real query never matches the tail (its id is >= 0); padded queries are dropped by flex.
        seq_idx = torch.nn.functional.pad(self.seq_idx, (0, -s % FLEX_BLOCK_SIZE), value=-1)

        def same_document_causal(b, h, q, kv):
            return (seq_idx[b, q] == seq_idx[b, kv]) & (kv <= q)

        return create_block_mask(same_document_causal, b, None, s, s, device=seq_idx.device,
                                 BLOCK_SIZE=FLEX_BLOCK_SIZE)


def _document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """[b, s] bool: True at the first token of each document."""
    first = torch.ones_like(seq_idx[:, :1], dtype=torch.bool)
    return torch.cat([first, seq_idx[:, 1:] != seq_idx[:, :-1]], dim=1)


def _check_position_ids(position_ids: torch.Tensor) -> None:
    if position_ids.dim() != 2 or position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise ValueError(
            f"position_ids: got a {position_ids.dim()}-d {position_ids.dtype} tensor of shape "
            f"{tuple(position_ids.shape)}; expected integer positions of shape [batch, seq], restarting "
            "at 0 at the first token of every packed document (Hugging Face's convention).")


def documents_from_position_ids(position_ids: torch.Tensor) -> Documents:
    """position_ids [b, s] (HF's packed convention: 0 starts a document) -> Documents."""
    _check_position_ids(position_ids)
    starts = position_ids == 0
    starts[:, 0] = True
    return Documents(seq_idx=starts.cumsum(dim=1, dtype=torch.int32) - 1)


def packed_documents(position_ids: Optional[torch.Tensor], batch: int) -> Optional[Documents]:
    """The Documents of a batch whose positions restart (a 0 after column 0) in some row, for
    `batch` rows ([1, s] positions stand for every row); None when no row restarts, so ordinary
    rows (0..s-1, or a continuation k..k+s-1) keep the unpacked kernels unchanged.

    Whether a row restarts is read on the host (one sync per forward), which a CUDA graph
    capture cannot do: there the positions must be left out."""
    if position_ids is None:
        return None
    _check_position_ids(position_ids)
    if position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids: shape {tuple(position_ids.shape)} for a batch of {batch} rows; "
                         f"expected [{batch}, seq] or [1, seq].")
    # one token a row (a decode step) cannot hold a second document: no host read needed
    if position_ids.shape[1] < 2:
        return None
    if position_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "position_ids given while a CUDA graph is being captured: whether the rows are packed is "
            "decided on the host. Capture without position_ids (rows 0..s-1), or run packed rows eagerly.")
    if not bool((position_ids[:, 1:] == 0).any()):
        return None
    return documents_from_position_ids(position_ids.expand(batch, -1))


def check_seq_idx(seq_idx: torch.Tensor | None, batch_seq) -> None:
    """A kernel's seq_idx must be int32 [batch, seq] of its input (None: one document per row)."""
    if seq_idx is None:
        return
    if tuple(seq_idx.shape) != tuple(batch_seq) or seq_idx.dtype != torch.int32:
        raise ValueError(
            f"seq_idx: got a {seq_idx.dtype} tensor of shape {tuple(seq_idx.shape)}; expected int32 of shape "
            f"[batch, seq] = {list(batch_seq)} (document number per token, from "
            "kernels.documents.documents_from_position_ids).")
