"""Pure-PyTorch chunked SSD scan (Mamba-2), the reference for the Triton path.

Computes, per head h and position t (state S of shape [p, N]):
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T
    y_t = S_t C_t + D_h * x_t
chunked: exact quadratic attention-like form inside each chunk of length Q and a
linear recurrence over chunk states between chunks. Runs on any device, in fp32 (in
float64 for float64 inputs).

With seq_idx [b, l] (document number per token, non-decreasing along the row; see
kernels.documents) the state restarts from zero at each document's first token: every decay
factor that spans a document boundary is replaced by an exact zero (a mask, not a -inf in the
log-decays, so no inf - inf arises forward or backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segment_sum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum_{k=j+1..i} a[..., k] for j <= i, -inf above the diagonal."""
    q = a.size(-1)
    a = a[..., None].expand(*a.shape, q)
    strict_lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~strict_lower, 0.0)
    sums = torch.cumsum(a, dim=-2)
    lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=0)
    return sums.masked_fill(~lower, float("-inf"))


def ssd_chunk_scan_reference(
    x: torch.Tensor,   # [b, l, h, p]
    dt: torch.Tensor,  # [b, l, h]  (already biased, softplus'ed and clamped)
    A: torch.Tensor,   # [h]        (negative)
    B: torch.Tensor,   # [b, l, g, n]
    C: torch.Tensor,   # [b, l, g, n]
    chunk_size: int,
    D: torch.Tensor | None = None,  # [h]
    seq_idx: torch.Tensor | None = None,  # [b, l] int
    initial_states: torch.Tensor | None = None,  # [b, h, p, n]: the state before the first token
) -> torch.Tensor:
    """Returns y [b, l, h, p] in fp32 (float64 for float64 inputs)."""
    b, l, h, p = x.shape
    g = B.shape[2]
    compute = torch.promote_types(x.dtype, torch.float32)
    x, dt, B, C = (t.to(compute) for t in (x, dt, B, C))
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    pad = (-l) % chunk_size
    if pad:
        # zero dt on padded steps keeps the states of real steps untouched
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
        if seq_idx is not None:  # padded steps join the last document (their dt is 0 anyway)
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    n_chunks = (l + pad) // chunk_size

    def chunks(t):
        return t.reshape(b, n_chunks, chunk_size, *t.shape[2:])

    xdt = chunks(x * dt[..., None])                # [b, c, q, h, p]
    Bc, Cc = chunks(B), chunks(C)                  # [b, c, q, h, n]
    a = chunks(dt * A.to(compute)).permute(0, 3, 1, 2)  # [b, h, c, q]
    a_cum = torch.cumsum(a, dim=-1)

    # within chunks: y_t += sum_{s<=t} C_t.B_s * exp(a_cum_t - a_cum_s) * x_s dt_s
    decay = torch.exp(_segment_sum(a))             # [b, h, c, q, q]
    if seq_idx is not None:
        doc = chunks(seq_idx)                       # [b, c, q]
        decay = decay * (doc[:, None, :, :, None] == doc[:, None, :, None, :])
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # state at the end of each chunk from that chunk's own inputs
    to_end = torch.exp(a_cum[..., -1:] - a_cum)    # [b, h, c, q]
    if seq_idx is not None:  # only the chunk's last document reaches its end state
        last = doc[:, :, -1:]                       # [b, c, 1]
        to_end = to_end * (doc == last)[:, None]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, to_end, xdt)
    # carry states across chunks: S_c = exp(sum a over chunk c) S_{c-1} + states_c
    chunk_decay = torch.exp(_segment_sum(F.pad(a_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    into_chunk = torch.exp(a_cum)                  # [b, h, c, q]: entering state -> position
    if seq_idx is not None:
        # end-state c (index c+1; index 0 is the zero start) survives to end-state z only in
        # one document; the state entering chunk z reaches only tokens of its document
        ends = F.pad(last[..., 0], (1, 0), value=-1)  # [b, c+1]
        chunk_decay = chunk_decay * (ends[:, None, :, None] == ends[:, None, None, :])
        into_chunk = into_chunk * (doc == ends[:, :-1, None])[:, None]
    start = torch.zeros_like(states[:, :1]) if initial_states is None else initial_states.to(compute)[:, None]
    states = torch.cat([start, states], dim=1)
    carried = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]  # state entering chunk z
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, carried, into_chunk)

    y = y.reshape(b, n_chunks * chunk_size, h, p)[:, :l]
    if D is not None:
        y = y + x[:, :l] * D.to(compute)[:, None]
    return y


def ssd_sequential_float64(x, dt, A, B, C, D=None, seq_idx=None) -> torch.Tensor:
    """Step-by-step recurrence in float64: the independent check of the chunked form.
    With seq_idx [b, l], the state is zeroed where the document number changes."""
    b, l, h, p = x.shape
    g = B.shape[2]
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(state.dtype)[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + torch.einsum("bhp,bhn->bhpn", x[:, t] * dt[:, t, :, None], B[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D.double()[:, None]
    return y
