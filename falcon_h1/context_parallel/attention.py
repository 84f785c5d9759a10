"""Exact causal attention over the whole sequence when each rank holds a shard of it.

The rank's queries stay local; keys and values (after RoPE, at their global positions) are
all-gathered over the context-parallel group (one collective, K and V together) and put in
sequence order. Each local chunk g then attends to the keys of chunks 0..g with the causal
mask aligned to the end of that key span, which is the ordinary causal mask of the whole
sequence restricted to the chunk's queries: the result is exact, not an approximation.
The backward of the gather sums every rank's K/V gradients onto the rank that owns them.
"""

from __future__ import annotations

import torch

from falcon_h1 import kernels
from falcon_h1.context_parallel.layout import ContextParallelLayout


def context_parallel_attention(q, k, v, scale: float, backend: str, layout: ContextParallelLayout):
    """q [b, hq, s, d], k/v [b, hkv, s, d] for this rank's s tokens -> [b, hq, s, d]."""
    c = layout.chunk_length(q.shape[2])
    # gathered sequence-major ([s, b, heads, d], how the mixer made k and v before permuting them)
    kv = torch.cat([k.movedim(2, 0), v.movedim(2, 0)], dim=2)
    kv = layout.in_sequence_order(layout.gather(kv, dim=0), dim=0).movedim(0, 2)
    k_all, v_all = kv.split([k.shape[1], v.shape[1]], dim=1)
    out = []
    for j, g in enumerate(layout.local_chunks):
        end = (g + 1) * c
        out.append(kernels.causal_attention(q[:, :, j * c:(j + 1) * c], k_all[:, :, :end], v_all[:, :, :end],
                                            scale=scale, backend=backend))
    return torch.cat(out, dim=2)
