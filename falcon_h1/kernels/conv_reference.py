"""Causal depthwise conv1d + SiLU over the sequence, pure PyTorch (any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [b, l, c], weight [c, k], bias [c] -> silu(conv) [b, l, c]; output t sees inputs t-k+1..t."""
    k = weight.shape[-1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[-1])
    return F.silu(out).transpose(1, 2)
