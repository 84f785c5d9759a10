"""The Mamba-2 branch when each rank holds a shard of the sequence: exact, in two small exchanges.

A rank's chunks are processed as a batch ([chunks * b, c, .], `as_chunk_batch`), each
continuing the chunk before it in the sequence, wherever that one lives:

1. Conv halo. The depthwise conv of a chunk's first d_conv - 1 tokens reads the previous
   chunk's last d_conv - 1 inputs. Every rank all-gathers those tails of all chunks and
   prepends its chunks' predecessors' (zeros before chunk 0) before the conv.
2. SSM state. Per head the state after token t is S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,
   linear in the entering state, so a chunk's end state is its zero-start end state E plus
   exp(a) times the state it entered with, a = sum over the chunk of dt A. Every rank
   computes E and a of its chunks, all-gathers them, and folds them in sequence order:
   S_in(0) = 0, S_in(g + 1) = exp(a_g) S_in(g) + E_g. Each chunk is then scanned once,
   from S_in (mamba_ssm's `initial_states` on GPU, the reference's carried state on CPU).

Both are plain autograd: the all-gathers' backward sums the gradients every rank's later
chunks send back (kernels return the initial state's gradient), so the gradient is exact too.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from falcon_h1 import kernels
from falcon_h1.context_parallel.layout import ContextParallelLayout


def as_chunk_batch(t: torch.Tensor, layout: ContextParallelLayout) -> torch.Tensor:
    """[s, b, ch] (Megatron's layout, s = this rank's tokens) -> [chunks * b, c, ch], row j * b + i
    holding chunk j of sample i."""
    s, b = t.shape[:2]
    m = len(layout.local_chunks)
    c = layout.chunk_length(s)
    return t.reshape(m, c, b, *t.shape[2:]).transpose(1, 2).reshape(m * b, c, *t.shape[2:])


def from_chunk_batch(t: torch.Tensor, layout: ContextParallelLayout) -> torch.Tensor:
    """Inverse of `as_chunk_batch`: [chunks * b, c, ch] -> [chunks * c, b, ch]."""
    mb, c = t.shape[:2]
    m = len(layout.local_chunks)
    return t.reshape(m, mb // m, c, *t.shape[2:]).transpose(1, 2).reshape(m * c, mb // m, *t.shape[2:])


def _previous_chunks(per_chunk: torch.Tensor, layout: ContextParallelLayout) -> torch.Tensor:
    """per_chunk [gathered chunks, ...] -> [local chunks, ...]: each local chunk's predecessor's row
    (zeros for chunk 0)."""
    rows = [torch.zeros_like(per_chunk[0]) if g == 0 else per_chunk[layout.slot(g - 1)] for g in layout.local_chunks]
    return torch.stack(rows)


def causal_conv1d_silu(xBC, weight, bias, triton: bool, out_scale, layout: ContextParallelLayout,
                       streaming: bool = False):
    """xBC [chunks * b, c, ch] -> silu(causal conv) of the same shape, over the whole sequence
    (streaming: kernels.causal_conv1d_silu's)."""
    halo = weight.shape[-1] - 1
    mb, c, ch = xBC.shape
    if c < halo:
        raise ValueError(f"a context-parallel chunk of {c} tokens is shorter than the conv's "
                         f"model.mamba_d_conv - 1 = {halo} inputs it must pass to the next chunk")
    b = mb // len(layout.local_chunks)
    tails = layout.gather(xBC[:, c - halo:], dim=0).unflatten(0, (-1, b))  # [gathered chunks, b, halo, ch]
    before = _previous_chunks(tails, layout).flatten(0, 1)
    out = kernels.causal_conv1d_silu(torch.cat([before, xBC], dim=1), weight, bias, triton, out_scale=out_scale,
                                     streaming=streaming)
    return out[:, halo:]


def chunk_end_states(x, dt, A, B):
    """The state at the end of each chunk scanned from zero, and the chunk's log decay.

    x [n, c, h, p], dt [n, c, h] (processed), A [h], B [n, c, g, n_state] ->
    (E [n, h, p, n_state], a [n, h] = sum_t dt_t A), in dt's dtype.
    """
    n, c, h, p = x.shape
    groups = B.shape[2]
    log_decay = torch.cumsum(dt * A.to(dt.dtype), dim=1)                  # [n, c, h]
    total = log_decay[:, -1]
    weight = dt * torch.exp(total[:, None] - log_decay)                   # step t's share of the end state
    xw = (x.to(dt.dtype) * weight[..., None]).unflatten(2, (groups, h // groups))  # [n, c, g, h/g, p]
    end = torch.einsum("ncgrp,ncgs->ngrps", xw, B.to(dt.dtype)).flatten(1, 2)
    return end, total


def carried_in_states(x, dt_raw, A, B, dt_bias, dt_limit, layout: ContextParallelLayout):
    """x [chunks * b, c, h, p], dt_raw [chunks * b, c, h], B [chunks * b, c, g, n_state] of this
    rank's chunks -> the state [chunks * b, h, p, n_state] (fp32, or float64) each chunk starts from."""
    # recomputed in the backward: it would otherwise keep an fp32 copy of x per layer (no randomness
    # inside, so no RNG state to save, which a CUDA graph capture could not do)
    end, total = checkpoint(chunk_end_states, x, kernels.scan_step_sizes(dt_raw, dt_bias, dt_limit), A, B,
                            use_reentrant=False, preserve_rng_state=False)
    mb, h, p, n = end.shape
    b = mb // len(layout.local_chunks)
    packed = torch.cat([end.flatten(2), total[..., None]], dim=-1)        # one collective for both
    gathered = layout.gather(packed, dim=0).unflatten(0, (-1, b))          # [gathered chunks, b, h, p*n + 1]
    entering = [torch.zeros_like(gathered[0, ..., :-1])]
    for g in range(max(layout.local_chunks)):
        row = gathered[layout.slot(g)]
        entering.append(torch.exp(row[..., -1:]) * entering[-1] + row[..., :-1])
    return torch.stack([entering[g] for g in layout.local_chunks]).reshape(mb, h, p, n)
