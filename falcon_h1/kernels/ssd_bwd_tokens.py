"""The token side of the gated SSD scan's backward in Triton: dx, the step-size gradient (ddt), dA
and dD, from the forward's saved layout and the chunk-state gradients (kernels.ssd_bwd_*).

Per chunk c, head h, positions t, s of the chunk (the math and the names are
kernels.ssd_backward_reference's, which the tests compare against in float64):
    M[t, s]   = (C_t . B_s) exp(cs_t - cs_s)  where t >= s and doc_t = doc_s, else 0
    to_end_s  = [doc_s = last_c] exp(cs_{Q-1} - cs_s)      into_t = [doc_t = prev_c] exp(cs_t)
    inner_s   = sum_t M[t, s] dy_t + to_end_s (B_s @ dS_out[c]^T)                     [p]
    dx_s      = dt_s inner_s + D dy_s                   ddt_direct_s = inner_s . x_s
    W[t, s]   = M[t, s] dt_s (dy_t . x_s)               (dL/d log decay_ts)
    inter_t   = into_t dy_t . (C_t @ S_in[c]^T)        chunk_end_s = to_end_s dt_s x_s . (B_s @ dS_out[c]^T)
    dcs_t     = sum_s W[t, s] - sum_u W[u, t] + inter_t - chunk_end_t
                + [t = Q-1] (sum_s chunk_end_s + ddA_last[c])
    da_t      = sum_{t' >= t} dcs_t'   (cs is the cumsum of a = dt A: a reverse cumsum)
    ddt_t     = ddt_direct_t + A da_t       dA = sum da_t dt_t       dD = sum dy . x

C_t . B_s comes from the forward's per-group cb = kernels.ssd_fwd.chunk_cb(B, C, Q), formed once
for all heads of a group rather than over n again in every head's program.

Two kernels:
1. `_token_gradients_kernel`, one program per (block of rows s, chunk, head): it loops over
   the blocks of t >= its rows (the cb tile, the decay, dy.x on tiles; tl.dot in the input
   dtype with fp32 accumulation) and writes dx and ddt_direct for its rows. The two halves of
   dcs: its rows' own part (- sum_t W[t, s], inter, chunk_end) is known to it, while the row
   sums sum_s W[t, s] belong to the rows t of later blocks. Those go by fp32 atomics into a
   zeroed dcs [b, h, nc, Q] buffer: one atomic per position t per tile, against recomputing
   every off-diagonal tile's dy.x a second time in the program owning t (a second loop over
   the s blocks <= it: +33% of the tile work at Q=128 in 64-blocks, +60% at Q=256). The
   atomics make dcs's fp32 summation order (so ddt and dA in their last bits) run-dependent.
2. `_chunk_reverse_cumsum_kernel`, one program per (chunk, block of heads), once every term of
   dcs is in: da, ddt, dA's partial sums, and in `token_and_step_size_gradients` the chain back
   through the step sizes' bias, softplus and clamp too.

Layouts (kernels.ssd_launch's policy: an input whose last stride is not 1 is copied, the output dx is
refused): x, dy, dx [b, l, h, p] and B, C [b, l, g, n] with any strides but a last one of 1;
dt_raw, ddt_raw [b, l, h] any strides; dt, dA_cumsum [b, h, nc, Q] fp32 (last stride 1); states,
dS_out [b, nc, h, p, n] (last stride 1); ddA_last [b, h, nc] fp32; seq_idx [b, l] int32 or None;
cb [b, nc, g, Q, Q] fp32 (last stride 1), cb[b, c, g, t, s] = C_t . B_s, valid only where t >= s
(chunk_cb leaves the tiles above the diagonal unwritten: the kernel's loads of it are masked there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from falcon_h1.kernels.ssd_launch import (SOFTPLUS_THRESHOLD, check_written_in_place, last_dim_contiguous,
                                           seq_idx_args, step_limits, tile_edge)


@dataclass(frozen=True)
class TokenBlocks:
    """Tile sizes and launch settings of the two kernels (powers of 2; tl.dot on the GPU needs
    block_s, block_t, block_n >= 16)."""

    block_s: int    # positions s a program of kernel 1 owns (its rows of dx)
    block_t: int    # positions t per step of its loop over the chunk
    block_n: int    # state columns per step of its n loops (the K of C @ S_in^T and B @ dS_out^T)
    num_warps: int
    num_stages: int
    block_h: int    # heads per program of kernel 2


def token_blocks(chunk_size: int, headdim: int, dstate: int, n_heads: int) -> TokenBlocks:
    """Default tiles: 64 x 64 position tiles (never a whole [Q, Q] fp32 tile at Q=256), the head
    dim whole (the dy.x tile needs all of it), n in 64-column steps; 8 warps when p > 64, where
    the [block_s, p] fp32 accumulator is 64 registers a thread at 4 warps; one stage (two held
    255 registers and spilled: the whole backward was 1.033 ms at 0.5B on the H200, 0.931 with one,
    benchmarks/results/2026-12-04b). Kernel 2 covers as many heads as keep its [heads, Q] tiles at
    <= 1024 elements: with 4096, one program a chunk at 0.5B (128 programs for 132 SMs, 6% achieved
    occupancy in ncu, 14.6 us)."""
    q = triton.next_power_of_2(chunk_size)
    rows = tile_edge(q, 64)
    return TokenBlocks(
        block_s=rows, block_t=rows, block_n=tile_edge(dstate, 64),
        num_warps=4 if headdim <= 64 else 8, num_stages=1,
        block_h=max(1, min(triton.next_power_of_2(n_heads), 1024 // q)),
    )


@triton.jit
def _state_rows(rows_base, rows, rows_ok, stride_rows, state_base, stride_state_p, cols_p, p_ok, dstate,
                BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """[rows, p] fp32 = R @ S^T over n in BLOCK_N steps, for R = B or C rows [rows, n] and a state
    S [p, n] of one chunk and head (loaded as S^T tiles [n, p])."""
    acc = tl.zeros([BLOCK_ROWS, BLOCK_P], dtype=tl.float32)
    cols_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, dstate, BLOCK_N):
        n = n0 + cols_n
        n_ok = n < dstate
        r = tl.load(rows_base + rows[:, None] * stride_rows + n[None, :], mask=rows_ok[:, None] & n_ok[None, :],
                    other=0.0)
        s_t = tl.load(state_base + n[:, None] + cols_p[None, :] * stride_state_p, mask=n_ok[:, None] & p_ok[None, :],
                      other=0.0)
        acc += tl.dot(r, s_t.to(r.dtype))
    return acc


@triton.jit
def _token_gradients_kernel(
    x_ptr, dy_ptr, dt_ptr, cs_ptr, b_ptr, c_ptr, cb_ptr, states_ptr, ds_out_ptr, dda_last_ptr, d_ptr, seq_idx_ptr,
    dx_ptr, ddt_ptr, dcs_ptr, dd_partial_ptr,
    seq_len, chunk_size, n_chunks, n_heads, heads_per_group, headdim, dstate,
    stride_xb, stride_xl, stride_xh, stride_dyb, stride_dyl, stride_dyh, stride_dxb, stride_dxl, stride_dxh,
    stride_dtb, stride_dth, stride_dtc, stride_csb, stride_csh, stride_csc,
    stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
    stride_cbmat_b, stride_cbmat_c, stride_cbmat_g, stride_cbmat_t,
    stride_stb, stride_stc, stride_sth, stride_stp, stride_dsb, stride_dsc, stride_dsh, stride_dsp,
    stride_ddab, stride_ddah, stride_ddac, stride_seqb, stride_seql, stride_ob, stride_oh, stride_oc,
    HAS_D: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Rows s = [pid_s * BLOCK_S, +BLOCK_S) of chunk c, head h: writes dx_s and ddt_direct_s
    (into ddt [b, h, nc, Q]), adds dcs's terms (module docstring) into the zeroed fp32 dcs
    [b, h, nc, Q] (the row sums of W at the rows t they belong to), and stores this program's
    sum of dy . x over its rows at dd_partial[b, c, h, pid_s]. C_t . B_s is read from the group's
    cb [b, nc, g, Q, Q] as [s, t] tiles; B and C only feed the state terms."""
    pid_s, pid_bc, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch = pid_bc // n_chunks
    chunk = pid_bc % n_chunks
    group = head // heads_per_group
    start = chunk * chunk_size
    chunk_len = tl.minimum(chunk_size, seq_len - start)

    x_base = x_ptr + batch.to(tl.int64) * stride_xb + start.to(tl.int64) * stride_xl + head * stride_xh
    dy_base = dy_ptr + batch.to(tl.int64) * stride_dyb + start.to(tl.int64) * stride_dyl + head * stride_dyh
    dx_base = dx_ptr + batch.to(tl.int64) * stride_dxb + start.to(tl.int64) * stride_dxl + head * stride_dxh
    b_base = b_ptr + batch.to(tl.int64) * stride_bb + start.to(tl.int64) * stride_bl + group * stride_bg
    c_base = c_ptr + batch.to(tl.int64) * stride_cb + start.to(tl.int64) * stride_cl + group * stride_cg
    cb_base = (cb_ptr + batch.to(tl.int64) * stride_cbmat_b + chunk.to(tl.int64) * stride_cbmat_c
               + group * stride_cbmat_g)
    dt_base = dt_ptr + batch.to(tl.int64) * stride_dtb + head * stride_dth + chunk * stride_dtc
    cs_base = cs_ptr + batch.to(tl.int64) * stride_csb + head * stride_csh + chunk * stride_csc
    st_base = states_ptr + batch.to(tl.int64) * stride_stb + chunk.to(tl.int64) * stride_stc + head * stride_sth
    ds_base = ds_out_ptr + batch.to(tl.int64) * stride_dsb + chunk.to(tl.int64) * stride_dsc + head * stride_dsh
    out_offset = batch.to(tl.int64) * stride_ob + head * stride_oh + chunk * stride_oc
    dcs_base = dcs_ptr + out_offset

    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < chunk_len
    s_in_chunk = s < chunk_size
    cols_p = tl.arange(0, BLOCK_P)
    p_ok = cols_p < headdim
    sp_mask = s_ok[:, None] & p_ok[None, :]

    dt_s = tl.load(dt_base + s, mask=s_in_chunk, other=0.0)
    cs_s = tl.load(cs_base + s, mask=s_in_chunk, other=0.0)
    cs_last = tl.load(cs_base + chunk_size - 1)
    if HAS_SEQ_IDX:
        seq_base = seq_idx_ptr + batch.to(tl.int64) * stride_seqb
        doc_s = tl.load(seq_base + (start + s) * stride_seql, mask=s_ok, other=-2)
        doc_last = tl.load(seq_base + (start + chunk_len - 1) * stride_seql)
        doc_prev = tl.load(seq_base + tl.maximum(start - 1, 0) * stride_seql, mask=chunk > 0, other=-1)
        to_end_ok = doc_s == doc_last
        into_ok = doc_s == doc_prev
    else:
        to_end_ok = s_ok
        into_ok = s_ok
    # cs falls along the chunk (dt >= 0, A < 0): both exponents are <= 0
    to_end = tl.where(to_end_ok, tl.exp(cs_last - cs_s), 0.0)
    into = tl.where(into_ok, tl.exp(cs_s), 0.0)

    x_s = tl.load(x_base + s[:, None] * stride_xl + cols_p[None, :], mask=sp_mask, other=0.0)
    dy_s = tl.load(dy_base + s[:, None] * stride_dyl + cols_p[None, :], mask=sp_mask, other=0.0)
    dyx_sum = tl.sum(tl.sum(dy_s.to(tl.float32) * x_s.to(tl.float32), axis=1), axis=0)

    # the state entering the chunk, seen from the rows' C: inter_s
    c_state = _state_rows(c_base, s, s_ok, stride_cl, st_base, stride_stp, cols_p, p_ok, dstate,
                          BLOCK_S, BLOCK_N, BLOCK_P)
    inter = into * tl.sum(dy_s.to(tl.float32) * c_state, axis=1)
    # the state leaving it: dS_out B_s, the rows' share of dx and of chunk_end
    state_dot = _state_rows(b_base, s, s_ok, stride_bl, ds_base, stride_dsp, cols_p, p_ok, dstate,
                            BLOCK_S, BLOCK_N, BLOCK_P)
    chunk_end = to_end * dt_s * tl.sum(x_s.to(tl.float32) * state_dot, axis=1)
    inner = to_end[:, None] * state_dot

    # intra-chunk pairs t >= s, as [s, t] tiles
    w_over_t = tl.zeros([BLOCK_S], dtype=tl.float32)  # sum_t W[t, s]
    t_first = (pid_s * BLOCK_S // BLOCK_T) * BLOCK_T
    for t0 in range(t_first, chunk_len, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < chunk_len
        cs_t = tl.load(cs_base + t, mask=t_ok, other=0.0)
        keep = (t[None, :] >= s[:, None]) & t_ok[None, :] & s_ok[:, None]
        if HAS_SEQ_IDX:
            doc_t = tl.load(seq_base + (start + t) * stride_seql, mask=t_ok, other=-3)
            keep &= doc_t[None, :] == doc_s[:, None]
        # cb is unwritten (any bits, NaN included) above the diagonal: never load it there
        cb = tl.load(cb_base + t[None, :] * stride_cbmat_t + s[:, None], mask=keep, other=0.0)
        # masked before the exp: above the diagonal cs_t - cs_s > 0 and could overflow
        m = cb * tl.exp(tl.where(keep, cs_t[None, :] - cs_s[:, None], float("-inf")))
        dy_t = tl.load(dy_base + t[:, None] * stride_dyl + cols_p[None, :], mask=t_ok[:, None] & p_ok[None, :],
                       other=0.0)
        dyx = tl.dot(x_s, tl.trans(dy_t.to(x_s.dtype)))                         # [s, t] = x_s . dy_t
        inner += tl.dot(m.to(dy_t.dtype), dy_t)
        w = m * dyx * dt_s[:, None]
        w_over_t += tl.sum(w, axis=1)
        tl.atomic_add(dcs_base + t, tl.sum(w, axis=0), mask=t_ok, sem="relaxed")

    dx = inner * dt_s[:, None]
    if HAS_D:  # dy_s again (an L2 hit) rather than held through the loop: registers are the limit
        dy_s = tl.load(dy_base + s[:, None] * stride_dyl + cols_p[None, :], mask=sp_mask, other=0.0)
        dx += tl.load(d_ptr + head).to(tl.float32) * dy_s.to(tl.float32)
    tl.store(dx_base + s[:, None] * stride_dxl + cols_p[None, :], dx.to(dx_ptr.dtype.element_ty), mask=sp_mask)
    tl.store(ddt_ptr + out_offset + s, tl.sum(inner * x_s.to(tl.float32), axis=1), mask=s_in_chunk)
    tl.atomic_add(dcs_base + s, inter - chunk_end - w_over_t, mask=s_in_chunk, sem="relaxed")
    # cs_{Q-1} enters every chunk_end and the carried state
    at_end = tl.sum(chunk_end, axis=0)
    if pid_s == 0:
        at_end += tl.load(dda_last_ptr + batch.to(tl.int64) * stride_ddab + head * stride_ddah + chunk * stride_ddac)
    tl.atomic_add(dcs_base + chunk_size - 1, at_end, sem="relaxed")
    tl.store(dd_partial_ptr + (pid_bc * n_heads + head) * tl.num_programs(0) + pid_s, dyx_sum)


@triton.jit
def _step_size_grad(ddt, dt_raw, dt_bias, dt_lo, dt_hi):
    """dL/d(dt_raw) from dL/d(dt), dt = clamp(softplus(dt_raw + dt_bias), dt_lo, dt_hi), fp32, as
    torch's autograd of kernels.scan_step_sizes: softplus is the identity above the threshold
    (slope 1), else log1p(e^v) with slope e^v / (e^v + 1); the clamp passes the gradient where
    lo <= softplus <= hi (ends included, as torch.clamp's backward)."""
    v = dt_raw + dt_bias
    linear = v > SOFTPLUS_THRESHOLD
    e = tl.exp(tl.minimum(v, SOFTPLUS_THRESHOLD))
    one_plus = 1.0 + e
    # log1p(e) to full precision without libdevice: log(1 + e) * e / ((1 + e) - 1)
    log1p_e = tl.where(one_plus == 1.0, e, tl.log(one_plus) * (e / (one_plus - 1.0)))
    softplus = tl.where(linear, v, log1p_e)
    slope = tl.where(linear, 1.0, e / one_plus)
    inside = (softplus >= dt_lo) & (softplus <= dt_hi)
    return tl.where(inside, ddt * slope, 0.0)


@triton.jit
def _step_chain_tile(ddt, heads, h_ok, pos, real, batch, dt_raw_ptr, dt_bias_ptr, ddt_raw_ptr, dbias_partial_ptr,
                     pid_bc, n_heads, dt_lo, dt_hi, stride_rb, stride_rl, stride_rh, stride_gb, stride_gl, stride_gh):
    """The step-size chain on a [heads, positions] tile of ddt: writes ddt_raw, stores the tile's
    bias gradient at dbias_partial[pid_bc, heads]."""
    mask = h_ok[:, None] & real[None, :]
    raw = tl.load(dt_raw_ptr + batch.to(tl.int64) * stride_rb + pos[None, :].to(tl.int64) * stride_rl
                  + heads[:, None] * stride_rh, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(dt_bias_ptr + heads, mask=h_ok, other=0.0).to(tl.float32)
    draw = tl.where(mask, _step_size_grad(ddt, raw, bias[:, None], dt_lo, dt_hi), 0.0)
    tl.store(ddt_raw_ptr + batch.to(tl.int64) * stride_gb + pos[None, :].to(tl.int64) * stride_gl
             + heads[:, None] * stride_gh, draw.to(ddt_raw_ptr.dtype.element_ty), mask=mask)
    tl.store(dbias_partial_ptr + pid_bc * n_heads + heads, tl.sum(draw, axis=1), mask=h_ok)


@triton.jit
def _chunk_reverse_cumsum_kernel(
    dcs_ptr, ddt_ptr, dt_ptr, a_ptr, da_partial_ptr, dt_raw_ptr, dt_bias_ptr, ddt_raw_ptr, dbias_partial_ptr,
    seq_len, chunk_size, n_chunks, n_heads, dt_lo, dt_hi,
    stride_ob, stride_oh, stride_oc, stride_dtb, stride_dth, stride_dtc,
    stride_rb, stride_rl, stride_rh, stride_gb, stride_gl, stride_gh,
    STEP_CHAIN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Chunk c, heads [pid_h * BLOCK_H, +BLOCK_H): da = reverse cumsum of dcs over the chunk,
    ddt = ddt_direct + A da in place (0 past the sequence end, where dt is a constant),
    da_partial[b, c, heads] = sum_t da_t dt_t; with STEP_CHAIN, ddt_raw and the bias partials."""
    pid_bc, pid_h = tl.program_id(0), tl.program_id(1)
    batch = pid_bc // n_chunks
    chunk = pid_bc % n_chunks
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < n_heads
    q = tl.arange(0, BLOCK_Q)
    pos = chunk * chunk_size + q
    real = (q < chunk_size) & (pos < seq_len)
    in_chunk = h_ok[:, None] & (q < chunk_size)[None, :]
    offsets = batch.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + chunk * stride_oc + q[None, :]
    dcs = tl.load(dcs_ptr + offsets, mask=in_chunk, other=0.0)
    da = tl.cumsum(dcs, axis=1, reverse=True)
    a = tl.load(a_ptr + heads, mask=h_ok, other=0.0).to(tl.float32)
    ddt = tl.load(ddt_ptr + offsets, mask=in_chunk, other=0.0) + da * a[:, None]
    ddt = tl.where(real[None, :], ddt, 0.0)
    tl.store(ddt_ptr + offsets, ddt, mask=in_chunk)
    dt = tl.load(dt_ptr + batch.to(tl.int64) * stride_dtb + heads[:, None] * stride_dth + chunk * stride_dtc
                 + q[None, :], mask=in_chunk, other=0.0)
    tl.store(da_partial_ptr + pid_bc * n_heads + heads, tl.sum(da * dt, axis=1), mask=h_ok)
    if STEP_CHAIN:
        _step_chain_tile(ddt, heads, h_ok, pos, real, batch, dt_raw_ptr, dt_bias_ptr, ddt_raw_ptr, dbias_partial_ptr,
                         pid_bc, n_heads, dt_lo, dt_hi, stride_rb, stride_rl, stride_rh, stride_gb, stride_gl,
                         stride_gh)


def _launch(x, dy, dt, dA_cumsum, B, C, cb, states, dS_out, ddA_last, A, chunk_size, D, seq_idx, dx, blocks, step):
    """Both kernels; step = (dt_raw, dt_bias, dt_limit, ddt_raw) runs the step-size chain in the second.
    -> (ddt, dA, dD, ddt_bias or None)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = dt.shape[2]
    if (h % g or dt.shape != (b, h, nc, chunk_size) or nc != triton.cdiv(l, chunk_size) or dx is None
            or cb.shape != (b, nc, g, chunk_size, chunk_size) or cb.dtype != torch.float32):
        raise ValueError(f"ssd_bwd_tokens: x {tuple(x.shape)}, B {tuple(B.shape)}, dt {tuple(dt.shape)}, cb "
                         f"{tuple(cb.shape)} {cb.dtype}, chunk_size {chunk_size} and dx "
                         f"{None if dx is None else tuple(dx.shape)} do not fit together")
    x, dy, dt, dA_cumsum, B, C, cb, states, dS_out = (
        last_dim_contiguous(t) for t in (x, dy, dt, dA_cumsum, B, C, cb, states, dS_out))
    check_written_in_place("ssd_bwd_tokens", dx=dx)
    blocks = blocks or token_blocks(chunk_size, p, n, h)
    block_p = tile_edge(p)
    n_row_blocks = triton.cdiv(chunk_size, blocks.block_s)
    ddt = torch.empty(b, h, nc, chunk_size, device=x.device, dtype=torch.float32)
    dcs = torch.zeros_like(ddt)
    dd_partial = torch.empty(b * nc * h * n_row_blocks, device=x.device, dtype=torch.float32)
    seq, *seq_strides = seq_idx_args(seq_idx, dt)
    _token_gradients_kernel[(n_row_blocks, b * nc, h)](
        x, dy, dt, dA_cumsum, B, C, cb, states, dS_out, ddA_last, D if D is not None else A,
        seq, dx, ddt, dcs, dd_partial,
        l, chunk_size, nc, h, h // g, p, n,
        *x.stride()[:3], *dy.stride()[:3], *dx.stride()[:3], *dt.stride()[:3], *dA_cumsum.stride()[:3],
        *B.stride()[:3], *C.stride()[:3], *cb.stride()[:4], *states.stride()[:4], *dS_out.stride()[:4],
        *ddA_last.stride(),
        *seq_strides, *ddt.stride()[:3],
        HAS_D=D is not None, HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_S=blocks.block_s, BLOCK_T=blocks.block_t, BLOCK_N=blocks.block_n, BLOCK_P=block_p,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    da_partial = torch.empty(b * nc, h, device=x.device, dtype=torch.float32)
    if step is not None:
        dt_raw, dt_bias, dt_limit, ddt_raw = step
        dbias_partial = torch.empty(b * nc, h, device=x.device, dtype=torch.float32)
        lo, hi = step_limits(dt_limit)
        step_args = (dt_raw, dt_bias, ddt_raw, dbias_partial)
        step_strides = (*dt_raw.stride(), *ddt_raw.stride())
    else:
        lo, hi = 0.0, math.inf
        step_args = (dt, A, ddt, da_partial)  # never read: STEP_CHAIN is off
        step_strides = (0,) * 6
    _chunk_reverse_cumsum_kernel[(b * nc, triton.cdiv(h, blocks.block_h))](
        dcs, ddt, dt, A, da_partial, *step_args, l, chunk_size, nc, h, lo, hi,
        *ddt.stride()[:3], *dt.stride()[:3], *step_strides,
        STEP_CHAIN=step is not None, BLOCK_H=blocks.block_h, BLOCK_Q=triton.next_power_of_2(chunk_size),
    )
    dD = dd_partial.view(b * nc, h, n_row_blocks).sum((0, 2)) if D is not None else None
    return ddt, da_partial.sum(0), dD, dbias_partial.sum(0) if step is not None else None


def token_gradients(x, dy, dt, dA_cumsum, B, C, states, dS_out, ddA_last, A, chunk_size, D=None, seq_idx=None, *,
                    cb, dx, blocks: Optional[TokenBlocks] = None):
    """Writes dx into `dx` ([b, l, h, p], any strides with the last 1); returns ddt [b, h, nc, Q] fp32
    (dL/d(processed dt), 0 past the sequence end), dA [h] fp32 and dD [h] fp32 (None without D):
    the module docstring's math. cb: kernels.ssd_fwd.chunk_cb(B, C, chunk_size) (B and C still
    feed the state terms). blocks: the tiles (default `token_blocks` of the shape)."""
    ddt, dA, dD, _ = _launch(x, dy, dt, dA_cumsum, B, C, cb, states, dS_out, ddA_last, A, chunk_size, D, seq_idx,
                             dx, blocks, None)
    return ddt, dA, dD


def token_and_step_size_gradients(x, dy, dt, dA_cumsum, B, C, states, dS_out, ddA_last, A, chunk_size, dt_raw,
                                  dt_bias, dt_limit, D=None, seq_idx=None, *, cb, dx, ddt_raw,
                                  blocks: Optional[TokenBlocks] = None):
    """token_gradients with the chain back through dt = kernels.scan_step_sizes(dt_raw, dt_bias,
    dt_limit) in its second kernel (no launch or pass over ddt of its own): writes dx and
    dL/d(dt_raw) into ddt_raw [b, l, h] (any strides); returns dA, dD and ddt_bias [h] fp32."""
    _, dA, dD, ddt_bias = _launch(x, dy, dt, dA_cumsum, B, C, cb, states, dS_out, ddA_last, A, chunk_size, D, seq_idx,
                                  dx, blocks, (dt_raw, dt_bias, dt_limit, ddt_raw))
    return dA, dD, ddt_bias
