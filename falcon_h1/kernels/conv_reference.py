"""Causal depthwise conv1d + SiLU over the sequence, pure PyTorch (any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """x [b, l, c], weight [c, k], bias [c] -> silu(conv) [b, l, c]; output t sees inputs t-k+1..t.

    seq_idx [b, l] (document number per token, kernels.documents): an input of another
    document than the output's reads as zero, so every document's window starts empty.
    """
    if seq_idx is not None:
        return F.silu(_document_conv(x, weight, bias, seq_idx))
    k = weight.shape[-1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[-1])
    return F.silu(out).transpose(1, 2)


def _document_conv(x, weight, bias, seq_idx):
    """The conv as a sum over taps, each shifted input masked to the output's document."""
    length, k = x.shape[1], weight.shape[-1]
    acc = x * weight[:, k - 1]
    for shift in range(1, min(k, length)):
        same = seq_idx[:, shift:] == seq_idx[:, :-shift]          # [b, l - shift]
        shifted = x[:, :-shift] * same[..., None].to(x.dtype)
        acc = acc + F.pad(shifted * weight[:, k - 1 - shift], (0, 0, shift, 0))
    return acc if bias is None else acc + bias
