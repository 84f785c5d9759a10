"""The gated SSD scan's forward on the project's own Triton kernels (GPU path).

Three launches where mamba_ssm 2.3.2's forward has five (cumsum, chunk state, state passing,
C·Bᵀ, chunk scan): the step sizes and their in-chunk cumsum are computed by the chunk-state
kernel, which also passes the states along (`_chunk_states_kernel`;
`blocks=dict(fused_states=False)` takes the chunk state and the passing as two launches). C·Bᵀ is
formed once per group (`_chunk_cb`) and read by every head of it: forming it inside the chunk scan
would repeat a K = n product for each of a group's heads (24 at the 0.5B and 7B shapes), which
measured 2x slower at 7B (n = 256). Per chunk c of Q positions, head h, in the notation of
kernels.ssd_backward_reference:
    _chunk_state:   dt = clamp(softplus(dt_raw + dt_bias)), cs = cumsum(dt A) in the chunk,
                    dS_chunk[c] = sum_s [doc_s = last_c] exp(cs_{Q-1} - cs_s) dt_s x_s B_sᵀ
    _state_passing: S_in[0] = 0, S_in[c+1] = [last_c = prev_c] exp(cs_{Q-1}) S_in[c] + dS_chunk[c]
    _chunk_scan:    y_t = sum_{s<=t, same doc} (C_t·B_s) exp(cs_t - cs_s) dt_s x_s
                          + [doc_t = prev_c] exp(cs_t) S_in[c] C_t + D x_t,   out = y silu(z)
It returns what mamba_ssm's `_mamba_chunk_scan_combined_fwd` returns for its backward (out, the
pre-gate y, dt and cs as [b, h, c, Q] fp32, the states entering each chunk [b, c, h, p, n] in the
input dtype), so either backward (kernels.ssd_bwd or mamba_ssm's) can follow it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from falcon_h1.kernels.ssd_launch import (SOFTPLUS_THRESHOLD, last_dim_contiguous, seq_idx_args, step_limits,
                                           tile_edge)


@triton.jit
def _chunk_dS(x_ptr, dt_raw_ptr, dt_bias_ptr, A_ptr, B_ptr, seq_ptr, dt_ptr, cs_ptr, b, c, h, g, seqlen, dt_lo, dt_hi,
              s_xb, s_xl, s_xh, s_dtrb, s_dtrl, s_dtrh, s_Bb, s_Bl, s_Bg, s_seqb, s_seql, s_csb, s_csh, s_csc,
              offs_p, offs_n, write_steps, P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Chunk c of (row b, head h): its step sizes and their in-chunk cumsum (written to dt_ptr and
    cs_ptr when write_steps), and (dS [offs_p, offs_n] fp32, cs at the chunk's end, the document of
    its last position; -1 without seq_idx)."""
    start = c * Q
    real = tl.minimum(seqlen - start, Q)
    offs_q = tl.arange(0, Q)
    in_seq = offs_q < real
    dt = tl.load(dt_raw_ptr + b * s_dtrb + (start + offs_q) * s_dtrl + h * s_dtrh, mask=in_seq, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(dt_bias_ptr + h).to(tl.float32)
    dt = tl.where(dt <= SOFTPLUS_THRESHOLD, tl.log(1.0 + tl.exp(dt)), dt)
    dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    dt = tl.where(in_seq, dt, 0.0)
    cs = tl.cumsum(dt * tl.load(A_ptr + h).to(tl.float32), axis=0)
    if write_steps:
        row = b * s_csb + h * s_csh + c * s_csc + offs_q
        tl.store(dt_ptr + row, dt)
        tl.store(cs_ptr + row, cs)
    cs_last = tl.sum(tl.where(offs_q == Q - 1, cs, 0.0), axis=0)
    weight = tl.exp(cs_last - cs) * dt
    seq_last = -1
    if HAS_SEQ:
        seq = tl.load(seq_ptr + b * s_seqb + (start + offs_q) * s_seql, mask=in_seq, other=-1)
        seq_last = tl.load(seq_ptr + b * s_seqb + (start + real - 1) * s_seql)
        weight = tl.where(seq == seq_last, weight, 0.0)
    x = tl.load(x_ptr + b * s_xb + h * s_xh + (start + offs_q)[:, None] * s_xl + offs_p[None, :],
                mask=in_seq[:, None] & (offs_p[None, :] < P), other=0.0)
    Bt = tl.load(B_ptr + b * s_Bb + g * s_Bg + (start + offs_q)[:, None] * s_Bl + offs_n[None, :],
                 mask=in_seq[:, None] & (offs_n[None, :] < N), other=0.0)
    Bw = (Bt.to(tl.float32) * weight[:, None]).to(x.dtype)
    return tl.dot(tl.trans(x), Bw), cs_last, seq_last


@triton.jit
def _chunk_state_kernel(
    x_ptr, dt_raw_ptr, dt_bias_ptr, A_ptr, B_ptr, seq_ptr, dS_ptr, dt_ptr, cs_ptr,
    seqlen, nchunks, heads_per_group, dt_lo, dt_hi,
    s_xb, s_xl, s_xh, s_dtrb, s_dtrl, s_dtrh, s_Bb, s_Bl, s_Bg, s_seqb, s_seql,
    s_dSb, s_dSc, s_dSh, s_dSp, s_csb, s_csh, s_csc,
    P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    pid_pn, pid_bc, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    n_pblocks = tl.cdiv(P, BP)
    pid_p, pid_n = pid_pn % n_pblocks, pid_pn // n_pblocks
    offs_p = pid_p * BP + tl.arange(0, BP)
    offs_n = pid_n * BN + tl.arange(0, BN)
    dS, _, _ = _chunk_dS(x_ptr, dt_raw_ptr, dt_bias_ptr, A_ptr, B_ptr, seq_ptr, dt_ptr, cs_ptr, b, c, h,
                         h // heads_per_group, seqlen, dt_lo, dt_hi, s_xb, s_xl, s_xh, s_dtrb, s_dtrl, s_dtrh,
                         s_Bb, s_Bl, s_Bg, s_seqb, s_seql, s_csb, s_csh, s_csc, offs_p, offs_n, pid_pn == 0,
                         P=P, N=N, Q=Q, HAS_BIAS=HAS_BIAS, HAS_SEQ=HAS_SEQ)
    tl.store(dS_ptr + b * s_dSb + c * s_dSc + h * s_dSh + offs_p[:, None] * s_dSp + offs_n[None, :], dS,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def _state_passing_kernel(
    dS_ptr, cs_ptr, seq_ptr, states_ptr, seqlen, nchunks,
    s_dSb, s_dSc, s_dSh, s_csb, s_csh, s_csc, s_stb, s_stc, s_sth, s_seqb, s_seql,
    PN: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    pid, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    keep = offs < PN
    state = tl.zeros([BLOCK], dtype=tl.float32)
    seq_before = -1
    for c in range(nchunks):
        tl.store(states_ptr + b * s_stb + c * s_stc + h * s_sth + offs, state.to(states_ptr.dtype.element_ty),
                 mask=keep)
        fresh = tl.load(dS_ptr + b * s_dSb + c * s_dSc + h * s_dSh + offs, mask=keep, other=0.0)
        scale = tl.exp(tl.load(cs_ptr + b * s_csb + h * s_csh + c * s_csc + Q - 1))
        if HAS_SEQ:
            seq_last = tl.load(seq_ptr + b * s_seqb + (tl.minimum((c + 1) * Q, seqlen) - 1) * s_seql)
            scale = tl.where(seq_last == seq_before, scale, 0.0)
            seq_before = seq_last
        state = scale * state + fresh


@triton.jit
def _chunk_states_kernel(
    x_ptr, dt_raw_ptr, dt_bias_ptr, A_ptr, B_ptr, seq_ptr, states_ptr, dt_ptr, cs_ptr,
    seqlen, nchunks, heads_per_group, dt_lo, dt_hi,
    s_xb, s_xl, s_xh, s_dtrb, s_dtrl, s_dtrh, s_Bb, s_Bl, s_Bg, s_seqb, s_seql,
    s_stb, s_stc, s_sth, s_stp, s_csb, s_csh, s_csc,
    P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, STAGES: tl.constexpr,
):
    """_chunk_state and _state_passing in one program per [BP, BN] tile of one (row, head)'s state,
    walking the chunks in order: each chunk's dS stays in registers, added to the running state the
    moment it is formed, so the fp32 dS never goes through memory (a write and a read of
    [b, c, h, p, n] fp32 saved). The same arithmetic in the same order: the same values."""
    pid_pn, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_pblocks = tl.cdiv(P, BP)
    pid_p, pid_n = pid_pn % n_pblocks, pid_pn // n_pblocks
    offs_p = pid_p * BP + tl.arange(0, BP)
    offs_n = pid_n * BN + tl.arange(0, BN)
    tile = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    state = tl.zeros([BP, BN], dtype=tl.float32)
    seq_before = -1
    for c in tl.range(0, nchunks, num_stages=STAGES):
        tl.store(states_ptr + b * s_stb + c * s_stc + h * s_sth + offs_p[:, None] * s_stp + offs_n[None, :],
                 state.to(states_ptr.dtype.element_ty), mask=tile)
        dS, cs_last, seq_last = _chunk_dS(
            x_ptr, dt_raw_ptr, dt_bias_ptr, A_ptr, B_ptr, seq_ptr, dt_ptr, cs_ptr, b, c, h, h // heads_per_group,
            seqlen, dt_lo, dt_hi, s_xb, s_xl, s_xh, s_dtrb, s_dtrl, s_dtrh, s_Bb, s_Bl, s_Bg, s_seqb, s_seql,
            s_csb, s_csh, s_csc, offs_p, offs_n, pid_pn == 0, P=P, N=N, Q=Q, HAS_BIAS=HAS_BIAS, HAS_SEQ=HAS_SEQ)
        scale = tl.exp(cs_last)
        if HAS_SEQ:
            scale = tl.where(seq_last == seq_before, scale, 0.0)
            seq_before = seq_last
        state = scale * state + dS


@triton.jit
def _chunk_cb_kernel(
    B_ptr, C_ptr, cb_ptr, seqlen, nchunks, groups, s_Bb, s_Bl, s_Bg, s_Cb, s_Cl, s_Cg, s_cbb, s_cbc, s_cbg, s_cbm,
    N: tl.constexpr, Q: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):
    """cb[b, c, g, t, s] = C_t . B_s within each chunk (fp32), for the tiles on or below the diagonal."""
    pid_mk, pid_bc, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    n_kblocks = tl.cdiv(Q, BK)
    pid_m, pid_k = pid_mk // n_kblocks, pid_mk % n_kblocks
    if pid_k * BK >= (pid_m + 1) * BM:  # above the diagonal: never read
        return
    start = c * Q
    real = tl.minimum(seqlen - start, Q)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        Cm = tl.load(C_ptr + b * s_Cb + g * s_Cg + (start + offs_m)[:, None] * s_Cl + offs_n[None, :],
                     mask=(offs_m[:, None] < real) & (offs_n[None, :] < N), other=0.0)
        Bk = tl.load(B_ptr + b * s_Bb + g * s_Bg + (start + offs_k)[None, :] * s_Bl + offs_n[:, None],
                     mask=(offs_k[None, :] < real) & (offs_n[:, None] < N), other=0.0)
        acc += tl.dot(Cm, Bk)
    tl.store(cb_ptr + b * s_cbb + c * s_cbc + g * s_cbg + offs_m[:, None] * s_cbm + offs_k[None, :], acc,
             mask=(offs_m[:, None] < Q) & (offs_k[None, :] < Q))


@triton.jit
def _chunk_scan_kernel(
    x_ptr, z_ptr, cb_ptr, C_ptr, D_ptr, dt_ptr, cs_ptr, seq_ptr, states_ptr, out_ptr, out_x_ptr,
    seqlen, nchunks, heads_per_group,
    s_xb, s_xl, s_xh, s_zb, s_zl, s_zh, s_cbb, s_cbc, s_cbg, s_cbm, s_Cb, s_Cl, s_Cg, s_csb, s_csh, s_csc,
    s_seqb, s_seql, s_stb, s_stc, s_sth, s_stp, s_ob, s_ol, s_oh, s_oxb, s_oxl, s_oxh,
    P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
    BN: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    pid_mp, pid_bc, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    n_pblocks = tl.cdiv(P, BP)
    pid_m, pid_p = pid_mp // n_pblocks, pid_mp % n_pblocks
    g = h // heads_per_group
    start = c * Q
    real = tl.minimum(seqlen - start, Q)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_p = pid_p * BP + tl.arange(0, BP)
    rows = offs_m < real
    cols = offs_p < P
    chunk_row = b * s_csb + h * s_csh + c * s_csc
    cs_m = tl.load(cs_ptr + chunk_row + offs_m, mask=offs_m < Q, other=0.0)
    x_base = x_ptr + b * s_xb + h * s_xh + start * s_xl
    C_base = C_ptr + b * s_Cb + g * s_Cg + start * s_Cl
    cb_base = cb_ptr + b * s_cbb + c * s_cbc + g * s_cbg
    if HAS_SEQ:
        seq_m = tl.load(seq_ptr + b * s_seqb + (start + offs_m) * s_seql, mask=rows, other=-2)

    acc = tl.zeros([BM, BP], dtype=tl.float32)
    if c > 0:  # the state entering the chunk (zero for the first)
        st_base = states_ptr + b * s_stb + c * s_stc + h * s_sth
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            Cm = tl.load(C_base + offs_m[:, None] * s_Cl + offs_n[None, :], mask=rows[:, None] & (offs_n[None, :] < N),
                         other=0.0)
            St = tl.load(st_base + offs_p[None, :] * s_stp + offs_n[:, None], mask=cols[None, :] & (offs_n[:, None] < N),
                         other=0.0)
            acc += tl.dot(Cm, St.to(Cm.dtype))
        into = tl.exp(cs_m)
        if HAS_SEQ:
            seq_prev = tl.load(seq_ptr + b * s_seqb + (start - 1) * s_seql)
            into = tl.where(seq_m == seq_prev, into, 0.0)
        acc *= into[:, None]

    hi = tl.minimum(pid_m * BM + BM, real)
    for k0 in range(0, hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        cols_k = offs_k < real
        cb = tl.load(cb_base + offs_m[:, None] * s_cbm + offs_k[None, :], mask=rows[:, None] & cols_k[None, :],
                     other=0.0)
        cs_k = tl.load(cs_ptr + chunk_row + offs_k, mask=offs_k < Q, other=0.0)
        dt_k = tl.load(dt_ptr + chunk_row + offs_k, mask=offs_k < Q, other=0.0)
        keep = (offs_m[:, None] >= offs_k[None, :]) & cols_k[None, :]
        if HAS_SEQ:
            seq_k = tl.load(seq_ptr + b * s_seqb + (start + offs_k) * s_seql, mask=cols_k, other=-3)
            keep = keep & (seq_m[:, None] == seq_k[None, :])
        decay = tl.exp(tl.where(keep, cs_m[:, None] - cs_k[None, :], float("-inf")))
        xk = tl.load(x_base + offs_k[:, None] * s_xl + offs_p[None, :], mask=cols_k[:, None] & cols[None, :], other=0.0)
        acc += tl.dot((cb * decay * dt_k[None, :]).to(xk.dtype), xk)

    xm = tl.load(x_base + offs_m[:, None] * s_xl + offs_p[None, :], mask=rows[:, None] & cols[None, :], other=0.0)
    if HAS_D:
        acc += tl.load(D_ptr + h).to(tl.float32) * xm.to(tl.float32)
    mask = rows[:, None] & cols[None, :]
    tl.store(out_x_ptr + b * s_oxb + h * s_oxh + (start + offs_m)[:, None] * s_oxl + offs_p[None, :], acc, mask=mask)
    if HAS_Z:
        zm = tl.load(z_ptr + b * s_zb + h * s_zh + (start + offs_m)[:, None] * s_zl + offs_p[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        acc *= zm * tl.sigmoid(zm)
    tl.store(out_ptr + b * s_ob + h * s_oh + (start + offs_m)[:, None] * s_ol + offs_p[None, :], acc, mask=mask)


def forward_blocks(p: int, n: int, chunk_size: int) -> dict:
    """Tile sizes by shape (H200 sweep, benchmarks/ssd_bench.py --forward-sweep): the chunk-state tile
    spans the whole chunk (its K dimension), with a 64 x 128 [p, n] output tile for chunks of 128
    and 64 x 64 for chunks of 256; the chunk scan takes 64-row tiles of the chunk, in 64-column
    steps, 32 for chunks of 256 (7B shape, H200 2026-12-04: 0.287 ms, the same as mamba_ssm's
    forward, benchmarks/results/2026-12-04/ssd_fwd_sweep.txt)."""
    state_n = 128 if chunk_size <= 128 else 64
    return dict(state_p=tile_edge(p, 64), state_n=tile_edge(n, state_n), scan_m=min(64, chunk_size),
                scan_k=min(64 if chunk_size <= 128 else 32, chunk_size), scan_p=tile_edge(p, 64),
                scan_n=tile_edge(n, 128), passing=1024, **FUSED_STATES)


# The chunk states and their passing in one walk over the chunks (`_chunk_states_kernel`), on
# [states_p, states_n] tiles: b x h x (p / 64) x (n / 32) programs (384 at the 0.5B and 7B shapes); off: a
# program per chunk and tile, then the passing over an fp32 dS buffer (the state_* and passing keys).
FUSED_STATES = dict(fused_states=True, states_p=64, states_n=32, states_stages=2)


def chunk_cb(B, C, chunk_size: int, block_m: int = 64, block_k: int = 64, block_n: int | None = None) -> torch.Tensor:
    """B, C [b, l, g, n] (strided, last dimension contiguous) -> cb [b, c, g, Q, Q] fp32 with
    cb[..., t, s] = C_t . B_s inside each chunk, for t's tile on or below s's tile (the tiles above
    the diagonal are left unwritten: no causal product reads them). block_n: the product's steps
    over n, default all of n up to 256 (sm_90a, Triton 3.6: two 128-wide steps over n = 256 spill
    472 bytes a thread, one step none; benchmarks/ssd_offline_report.py)."""
    b, l, g, n = B.shape
    q = chunk_size
    nc = triton.cdiv(l, q)
    block_m, block_k = min(block_m, q), min(block_k, q)
    cb = torch.empty(b, nc, g, q, q, device=B.device, dtype=torch.float32)
    grid = (triton.cdiv(q, block_m) * triton.cdiv(q, block_k), b * nc, g)
    _chunk_cb_kernel[grid](
        B, C, cb, l, nc, g, B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        cb.stride(0), cb.stride(1), cb.stride(2), cb.stride(3), N=n, Q=q, BM=block_m, BK=block_k,
        BN=tile_edge(n, block_n or 256))
    return cb


def ssd_forward_own(x, dt_raw, A, B, C, chunk_size: int, D=None, z=None, dt_bias=None,
                    dt_limit=(0.0, math.inf), seq_idx=None, blocks: dict | None = None):
    """x, z [b, l, h, p] and B, C [b, l, g, n] (strided, last dimension contiguous), dt_raw [b, l, h]
    (before bias / softplus / clamp), A, D, dt_bias [h], seq_idx [b, l] int32 or None ->
    (out = y silu(z) (y without z), y [b, l, h, p], dt [b, h, c, Q] fp32, dA_cumsum [b, h, c, Q] fp32,
    states entering each chunk [b, c, h, p, n] in x's dtype). blocks overrides forward_blocks' keys."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = chunk_size
    if q < 16 or q & (q - 1):
        raise ValueError(f"ssd_forward_own: chunk_size = {q}; the kernels need a power of two >= 16")
    x, dt_raw, B, C, z = (last_dim_contiguous(t) for t in (x, dt_raw, B, C, z))
    nc = triton.cdiv(l, q)
    blk = {**forward_blocks(p, n, q), **(blocks or {})}
    if x.is_cuda and blk["scan_p"] < tile_edge(p, 64):
        # seen on the H200 (Triton 3.6, benchmarks/results/2026-12-03d/ssd_forward_sweep_call3.txt):
        # scan_p = 32 at p = 64 gave wrong outputs and, at p = 128, a memory fault; cause not found
        # (the same tiling is exact in Triton's interpreter)
        raise ValueError(f"ssd_forward_own: blocks scan_p = {blk['scan_p']} is narrower than "
                         f"{tile_edge(p, 64)} for head dim {p}; on the GPU use at least that")
    dev = x.device
    dt = torch.empty(b, h, nc, q, device=dev, dtype=torch.float32)
    cs = torch.empty_like(dt)
    states = torch.empty(b, nc, h, p, n, device=dev, dtype=x.dtype)
    y = torch.empty(b, l, h, p, device=dev, dtype=x.dtype)
    out = torch.empty_like(y) if z is not None else y
    seq, *seq_strides = seq_idx_args(seq_idx, dt)
    lo, hi = step_limits(dt_limit)
    A = A.contiguous()

    step_args = (x, dt_raw, dt_bias if dt_bias is not None else A, A, B, seq)
    step_strides = (x.stride(0), x.stride(1), x.stride(2), dt_raw.stride(0), dt_raw.stride(1), dt_raw.stride(2),
                    B.stride(0), B.stride(1), B.stride(2), *seq_strides)
    if blk["fused_states"]:
        grid = (triton.cdiv(p, blk["states_p"]) * triton.cdiv(n, blk["states_n"]), b, h)
        _chunk_states_kernel[grid](
            *step_args, states, dt, cs, l, nc, h // g, lo, hi, *step_strides,
            states.stride(0), states.stride(1), states.stride(2), states.stride(3),
            dt.stride(0), dt.stride(1), dt.stride(2),
            P=p, N=n, Q=q, BP=blk["states_p"], BN=blk["states_n"], HAS_BIAS=dt_bias is not None,
            HAS_SEQ=seq_idx is not None, STAGES=blk["states_stages"])
    else:
        dS = torch.empty(b, nc, h, p, n, device=dev, dtype=torch.float32)
        grid = (triton.cdiv(p, blk["state_p"]) * triton.cdiv(n, blk["state_n"]), b * nc, h)
        _chunk_state_kernel[grid](
            *step_args, dS, dt, cs, l, nc, h // g, lo, hi, *step_strides,
            dS.stride(0), dS.stride(1), dS.stride(2), dS.stride(3), dt.stride(0), dt.stride(1), dt.stride(2),
            P=p, N=n, Q=q, BP=blk["state_p"], BN=blk["state_n"], HAS_BIAS=dt_bias is not None,
            HAS_SEQ=seq_idx is not None)
        grid = (triton.cdiv(p * n, blk["passing"]), b, h)
        _state_passing_kernel[grid](
            dS, cs, seq, states, l, nc, dS.stride(0), dS.stride(1), dS.stride(2), cs.stride(0), cs.stride(1),
            cs.stride(2), states.stride(0), states.stride(1), states.stride(2), *seq_strides,
            PN=p * n, Q=q, BLOCK=blk["passing"], HAS_SEQ=seq_idx is not None)
    cb = chunk_cb(B, C, q, block_m=blk["scan_m"], block_k=blk["scan_k"])
    zz = z if z is not None else x
    grid = (triton.cdiv(q, blk["scan_m"]) * triton.cdiv(p, blk["scan_p"]), b * nc, h)
    _chunk_scan_kernel[grid](
        x, zz, cb, C, D if D is not None else A, dt, cs, seq, states, out, y,
        l, nc, h // g,
        x.stride(0), x.stride(1), x.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
        cb.stride(0), cb.stride(1), cb.stride(2), cb.stride(3), C.stride(0), C.stride(1), C.stride(2),
        cs.stride(0), cs.stride(1), cs.stride(2), *seq_strides,
        states.stride(0), states.stride(1), states.stride(2), states.stride(3),
        out.stride(0), out.stride(1), out.stride(2), y.stride(0), y.stride(1), y.stride(2),
        P=p, N=n, Q=q, BM=blk["scan_m"], BK=blk["scan_k"], BP=blk["scan_p"], BN=blk["scan_n"],
        HAS_D=D is not None, HAS_Z=z is not None, HAS_SEQ=seq_idx is not None)
    return out, y, dt, cs, states
