"""dB and dC of the gated SSD chunk scan (Mamba-2) in one Triton kernel.

Per chunk c of Q positions, head h of group g, positions s, t in the chunk, cs = dA_cumsum of
head h, doc = packed-document number (kernels.ssd_backward_reference states the whole backward):
    dB_s = sum_{h in g} dt_s [ sum_{t >= s, doc_t = doc_s} exp(cs_t - cs_s) (dy_t . x_s) C_t
                               + [doc_s = last_c] exp(cs_{Q-1} - cs_s) x_s^T dS_out[c] ]
    dC_t = sum_{h in g} [ sum_{s <= t, doc_s = doc_t} exp(cs_t - cs_s) dt_s (dy_t . x_s) B_s
                          + [doc_t = prev_c] exp(cs_t) dy_t^T S_in[c] ]
where dS_out[c] is dL/d(state leaving chunk c), S_in[c] the state entering it, last_c the
document of the chunk's last real position and prev_c that of chunk c-1's last (none for c = 0).

One program owns a block of rows (positions) of one chunk, one group, one block of state columns
and a share of the group's heads, and computes both dB and dC of those rows: dB rows pair with the
partner blocks at or after them, dC rows with those at or before, so every program does the same
number of partner tiles (Q/BLOCK + 1 when the row and partner blocks are equal); two kernels would
give the row blocks triangular work. Its two phases run one after the other, so one fp32
accumulator is live at a time.

Heads: for each partner block the per-head weights W_h[row, partner] = decay * dt * (dy . x)
(fp32, K = head dim) are summed over the program's heads first, so the [rows, partners] x
[partners, n] product with C (or B), which the group shares, runs once per program instead of once
per head. The state terms are per head (dS_out and S_in are per head): a [rows, p] x [p, n]
product each, done in the same head loop as the diagonal partner block's weights so the row tile
of x (dB) or dy (dC) is loaded once for both. The head dim is walked in P_STEPS unrolled steps, so
the head loop is the innermost loop and the compiler can prefetch the next head's tiles.
With HEAD_SPLITS > 1 the group's heads are shared among that many programs (contiguous, balanced
ranges), each adding its partial sums into fp32 scratch with atomics; with one split the program
stores its rows directly.

Decays: exp only of non-positive arguments. Tiles that straddle the diagonal mask the argument
before the exp; tiles wholly on one side of it factor exp(cs_t - cs_s) = exp(cs_t - cs_m)
exp(cs_m - cs_s) with m between the two blocks (both factors <= 1, so the product cannot
overflow and underflows only where the exact value is below fp32's range), which takes
rows + partners exps instead of rows x partners: per head, a [64, 64] tile's 4096 exps would take
more of an SM's time (16 exps a clock) than its dy . x product on the tensor cores.

Layouts: x [b, l, h, p], dy [b, l, h, p], B, C [b, l, g, n], dB, dC [b, l, g, n] (any strides,
last dim contiguous); dt, dA_cumsum [b, h, nc, Q] fp32 (dt = 0 past the sequence end);
states (S_in), dS_out [b, nc, h, p, n]; seq_idx [b, l] int32 (non-decreasing along a row).
The launcher tells the kernel the largest power of 2 (up to 16 bytes) that divides the strided
views' strides, so their tile loads vectorize (the JIT sees only whether a runtime int is a multiple
of 16 elements: the in-projection buffer's row widths are typically multiples of 8 bf16, not 16).
Matrix-product operands are in the input dtype (W is cast to it), accumulation in fp32; fp32
inputs (tests, debugging: not a training dtype) multiply in full fp32 ("ieee"), not tf32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_h1.kernels.ssd_launch import check_written_in_place, last_dim_contiguous, seq_idx_args, tile_edge

# bc_gradient_blocks splits the heads until the grid has PROGRAMS_PER_SM_TARGET programs per SM of an H200
STREAMING_MULTIPROCESSORS = 132
PROGRAMS_PER_SM_TARGET = 4


@triton.jit
def _documents(seq_base, pos, pos_ok, stride_seq_l, HAS_SEQ_IDX: tl.constexpr):
    """Document number of each chunk position (0 without seq_idx; -1 past the sequence end)."""
    if HAS_SEQ_IDX:
        return tl.load(seq_base + pos.to(tl.int64) * stride_seq_l, mask=pos_ok, other=-1)
    return tl.where(pos_ok, 0, -1)


@triton.jit
def _decay(cs_later, cs_earlier, cs_mid, later_pos, earlier_pos, doc_later, doc_earlier,
           LATER_ON_ROWS: tl.constexpr, STRADDLES: tl.constexpr, HAS_SEQ_IDX: tl.constexpr):
    """exp(cs_t - cs_s) on the pairs (t later, s earlier) of a tile, 0 where t < s or the documents
    differ; laid out [later, earlier] if LATER_ON_ROWS else [earlier, later]. STRADDLES: the tile
    crosses the diagonal (mask the argument, one exp a pair); else every t >= cs_mid's position
    >= every s and the decay factors through cs_mid."""
    if LATER_ON_ROWS:
        lat = cs_later[:, None]
        ear = cs_earlier[None, :]
        causal = later_pos[:, None] >= earlier_pos[None, :]
        same_doc = doc_later[:, None] == doc_earlier[None, :]
    else:
        lat = cs_later[None, :]
        ear = cs_earlier[:, None]
        causal = later_pos[None, :] >= earlier_pos[:, None]
        same_doc = doc_later[None, :] == doc_earlier[:, None]
    if STRADDLES:
        keep = causal & same_doc if HAS_SEQ_IDX else causal
        return tl.exp(tl.where(keep, tl.minimum(lat - ear, 0.0), float("-inf")))
    # the clamps matter past the sequence end, where cs reads as 0 (those pairs' dy . x is 0, and
    # 0 * inf would be nan)
    decay = tl.exp(tl.minimum(lat - cs_mid, 0.0)) * tl.exp(tl.minimum(cs_mid - ear, 0.0))
    if HAS_SEQ_IDX:
        decay = tl.where(same_doc, decay, 0.0)
    return decay


@triton.jit
def _partner_block(acc, row_chunk, row_stride_h, row_stride_l, partner_chunk, partner_stride_h, partner_stride_l,
                   state_chunk, state_stride_h, state_stride_p, dt_chunk, stride_dt_h, stride_dt_q,
                   cs_chunk, stride_cs_h, stride_cs_q, head_start, head_end, head_dim, chunk_size,
                   rows, row_ok, doc_rows, state_row_ok, partners, partner_ok, doc_partners, mid_pos,
                   n_cols, state_col_ok,
                   LATER_ON_ROWS: tl.constexpr, STRADDLES: tl.constexpr, WITH_STATE: tl.constexpr,
                   HAS_SEQ_IDX: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_PARTNERS: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, P_STEPS: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """One partner block, heads head_start..head_end-1: returns (acc, W) with W [rows, partners] =
    sum_h decay * dt_earlier * (row . partner) and, if WITH_STATE, acc + sum_h of the rows' state
    term: dB (rows earlier, LATER_ON_ROWS False; rows of x, partners of dy, state dS_out):
    [doc ok] exp(cs_{Q-1} - cs_s) dt_s x_s^T dS_out; dC (rows later; rows of dy, partners of x,
    state S_in): [doc ok] exp(cs_t) dy_t^T S_in. state_row_ok: rows whose document the state
    reaches; state_col_ok: the state columns to read (all False where the chunk has no state term).
    mid_pos: a position between the blocks (unused if STRADDLES)."""
    w = tl.zeros([BLOCK_ROWS, BLOCK_PARTNERS], dtype=tl.float32)
    for head in range(head_start, head_end):
        cs_head = cs_chunk + head * stride_cs_h
        dt_head = dt_chunk + head * stride_dt_h
        cs_rows = tl.load(cs_head + rows * stride_cs_q, mask=row_ok, other=0.0)
        cs_partners = tl.load(cs_head + partners * stride_cs_q, mask=partner_ok, other=0.0)
        cs_mid = tl.load(cs_head + mid_pos * stride_cs_q)
        # the head's row . partner over the head dim and, if WITH_STATE, rows times its state
        # matrix [p, n], from one load of each row tile (rows, partners, state columns not ok read 0)
        row_head = row_chunk + head * row_stride_h
        partner_head = partner_chunk + head * partner_stride_h
        state_head = state_chunk + head * state_stride_h
        dots = tl.zeros([BLOCK_ROWS, BLOCK_PARTNERS], dtype=tl.float32)
        if WITH_STATE:
            state = tl.zeros([BLOCK_ROWS, BLOCK_N], dtype=tl.float32)
        for step in tl.static_range(P_STEPS):
            cols = step * BLOCK_P + tl.arange(0, BLOCK_P)
            col_ok = cols < head_dim
            a = tl.load(row_head + rows[:, None].to(tl.int64) * row_stride_l + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            b_t = tl.load(partner_head + partners[None, :].to(tl.int64) * partner_stride_l + cols[:, None],
                          mask=partner_ok[None, :] & col_ok[:, None], other=0.0)
            dots += tl.dot(a, b_t.to(a.dtype), input_precision=DOT_PRECISION)
            if WITH_STATE:
                state_tile = tl.load(state_head + cols[:, None].to(tl.int64) * state_stride_p + n_cols[None, :],
                                     mask=col_ok[:, None] & state_col_ok[None, :], other=0.0)
                state += tl.dot(a, state_tile.to(a.dtype), input_precision=DOT_PRECISION)
        if LATER_ON_ROWS:
            dt_partners = tl.load(dt_head + partners * stride_dt_q, mask=partner_ok, other=0.0)
            decay = _decay(cs_rows, cs_partners, cs_mid, rows, partners, doc_rows, doc_partners,
                           True, STRADDLES, HAS_SEQ_IDX)
            w += dots * decay * dt_partners[None, :]
            if WITH_STATE:
                into = tl.where(state_row_ok, tl.exp(tl.minimum(cs_rows, 0.0)), 0.0)
                acc += state * into[:, None]
        else:
            dt_rows = tl.load(dt_head + rows * stride_dt_q, mask=row_ok, other=0.0)
            decay = _decay(cs_partners, cs_rows, cs_mid, partners, rows, doc_partners, doc_rows,
                           False, STRADDLES, HAS_SEQ_IDX)
            w += dots * decay * dt_rows[:, None]
            if WITH_STATE:
                cs_end = tl.load(cs_head + (chunk_size - 1) * stride_cs_q)
                to_end = tl.where(state_row_ok, tl.exp(tl.minimum(cs_end - cs_rows, 0.0)) * dt_rows, 0.0)
                acc += state * to_end[:, None]
    return acc, w


@triton.jit
def _bc_gradients_kernel(
    x_ptr, dy_ptr, dt_ptr, cs_ptr, b_ptr, c_ptr, states_ptr, ds_out_ptr, seq_idx_ptr, db_ptr, dc_ptr,
    seq_len, chunk_size, n_chunks, n_groups, heads_per_group, head_splits, head_dim, state_dim,
    stride_x_b, stride_x_l, stride_x_h,
    stride_dy_b, stride_dy_l, stride_dy_h,
    stride_dt_b, stride_dt_h, stride_dt_c, stride_dt_q,
    stride_cs_b, stride_cs_h, stride_cs_c, stride_cs_q,
    stride_b_b, stride_b_l, stride_b_g,
    stride_c_b, stride_c_l, stride_c_g,
    stride_st_b, stride_st_c, stride_st_h, stride_st_p,
    stride_ds_b, stride_ds_c, stride_ds_h, stride_ds_p,
    stride_seq_b, stride_seq_l,
    stride_db_b, stride_db_l, stride_db_g,
    stride_dc_b, stride_dc_l, stride_dc_g,
    HAS_SEQ_IDX: tl.constexpr, ATOMIC_OUTPUT: tl.constexpr, STRIDE_MULTIPLE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_PARTNERS: tl.constexpr, BLOCK_P: tl.constexpr, P_STEPS: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (row blocks x n blocks, chunks, batch x groups x head splits): the sum over the group's
    heads [split * H / splits, (split + 1) * H / splits) (H heads a group) of dB and dC of
    BLOCK_ROWS positions of one chunk, BLOCK_N state columns (module docstring: the math); stored (ATOMIC_OUTPUT False: one split) or atomically
    added (into fp32 dB / dC). STRIDE_MULTIPLE divides every stride but the last of x, B, C, dB, dC."""
    # x, B, C, dB, dC are strided views (of the in-projection's buffer): runtime strides the JIT
    # cannot see are multiples of 16 bytes; written as (s // m) * m it knows, and vectorizes the
    # loads along their contiguous last dim
    m = STRIDE_MULTIPLE
    stride_x_b, stride_x_l, stride_x_h = stride_x_b // m * m, stride_x_l // m * m, stride_x_h // m * m
    stride_b_b, stride_b_l, stride_b_g = stride_b_b // m * m, stride_b_l // m * m, stride_b_g // m * m
    stride_c_b, stride_c_l, stride_c_g = stride_c_b // m * m, stride_c_l // m * m, stride_c_g // m * m
    stride_db_b, stride_db_l, stride_db_g = stride_db_b // m * m, stride_db_l // m * m, stride_db_g // m * m
    stride_dc_b, stride_dc_l, stride_dc_g = stride_dc_b // m * m, stride_dc_l // m * m, stride_dc_g // m * m
    n_blocks = tl.cdiv(state_dim, BLOCK_N)
    row_block = tl.program_id(0) // n_blocks
    n_block = tl.program_id(0) % n_blocks
    chunk = tl.program_id(1)
    split = tl.program_id(2) % head_splits
    batch_group = tl.program_id(2) // head_splits
    batch = (batch_group // n_groups).to(tl.int64)
    group = batch_group % n_groups
    chunk_start = chunk.to(tl.int64) * chunk_size
    chunk_len = tl.minimum(chunk_size, seq_len - chunk * chunk_size)
    row_start = row_block * BLOCK_ROWS
    if row_start < chunk_len:  # else the rows lie past the sequence end: nothing to write
        rows = row_start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < chunk_len
        n_cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n_cols < state_dim
        head_start = group * heads_per_group + split * heads_per_group // head_splits
        head_end = group * heads_per_group + (split + 1) * heads_per_group // head_splits

        # bases at (batch, chunk start): positions below are offsets inside the chunk
        x_chunk = x_ptr + batch * stride_x_b + chunk_start * stride_x_l
        dy_chunk = dy_ptr + batch * stride_dy_b + chunk_start * stride_dy_l
        b_chunk = b_ptr + batch * stride_b_b + chunk_start * stride_b_l + group * stride_b_g
        c_chunk = c_ptr + batch * stride_c_b + chunk_start * stride_c_l + group * stride_c_g
        dt_chunk = dt_ptr + batch * stride_dt_b + chunk * stride_dt_c
        cs_chunk = cs_ptr + batch * stride_cs_b + chunk * stride_cs_c
        st_chunk = states_ptr + batch * stride_st_b + chunk * stride_st_c
        ds_chunk = ds_out_ptr + batch * stride_ds_b + chunk * stride_ds_c
        seq_chunk = seq_idx_ptr + batch * stride_seq_b + chunk_start * stride_seq_l
        doc_rows = _documents(seq_chunk, rows, row_ok, stride_seq_l, HAS_SEQ_IDX)
        out_mask = row_ok[:, None] & n_ok[None, :]

        # ---- dB: rows are s, partners t >= s; the first partner block straddles the diagonal ----
        to_end_ok = row_ok
        if HAS_SEQ_IDX:
            to_end_ok = doc_rows == tl.load(seq_chunk + (chunk_len - 1) * stride_seq_l)
        ds_col_ok = n_ok & (chunk < n_chunks - 1)  # the last chunk's end state feeds nothing: dS_out = 0
        first = (row_start // BLOCK_PARTNERS) * BLOCK_PARTNERS
        ts = first + tl.arange(0, BLOCK_PARTNERS)
        t_ok = ts < chunk_len
        doc_ts = _documents(seq_chunk, ts, t_ok, stride_seq_l, HAS_SEQ_IDX)
        acc = tl.zeros([BLOCK_ROWS, BLOCK_N], dtype=tl.float32)
        acc, w = _partner_block(acc, x_chunk, stride_x_h, stride_x_l, dy_chunk, stride_dy_h, stride_dy_l,
                                ds_chunk, stride_ds_h, stride_ds_p, dt_chunk, stride_dt_h, stride_dt_q,
                                cs_chunk, stride_cs_h, stride_cs_q, head_start, head_end, head_dim, chunk_size,
                                rows, row_ok, doc_rows, to_end_ok, ts, t_ok, doc_ts, first, n_cols, ds_col_ok,
                                False, True, True, HAS_SEQ_IDX, BLOCK_ROWS, BLOCK_PARTNERS, BLOCK_P, BLOCK_N,
                                P_STEPS, DOT_PRECISION)
        c_tile = tl.load(c_chunk + ts[:, None].to(tl.int64) * stride_c_l + n_cols[None, :],
                         mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(w.to(c_tile.dtype), c_tile, input_precision=DOT_PRECISION)
        for t0 in range(first + BLOCK_PARTNERS, chunk_len, BLOCK_PARTNERS):
            ts = t0 + tl.arange(0, BLOCK_PARTNERS)
            t_ok = ts < chunk_len
            doc_ts = _documents(seq_chunk, ts, t_ok, stride_seq_l, HAS_SEQ_IDX)
            if t0 < row_start + BLOCK_ROWS:  # only when partner blocks are smaller than row blocks
                acc, w = _partner_block(acc, x_chunk, stride_x_h, stride_x_l, dy_chunk, stride_dy_h, stride_dy_l,
                                        ds_chunk, stride_ds_h, stride_ds_p, dt_chunk, stride_dt_h, stride_dt_q,
                                        cs_chunk, stride_cs_h, stride_cs_q, head_start, head_end, head_dim,
                                        chunk_size, rows, row_ok, doc_rows, to_end_ok, ts, t_ok, doc_ts, t0,
                                        n_cols, ds_col_ok, False, True, False, HAS_SEQ_IDX, BLOCK_ROWS,
                                        BLOCK_PARTNERS, BLOCK_P, BLOCK_N, P_STEPS, DOT_PRECISION)
            else:
                acc, w = _partner_block(acc, x_chunk, stride_x_h, stride_x_l, dy_chunk, stride_dy_h, stride_dy_l,
                                        ds_chunk, stride_ds_h, stride_ds_p, dt_chunk, stride_dt_h, stride_dt_q,
                                        cs_chunk, stride_cs_h, stride_cs_q, head_start, head_end, head_dim,
                                        chunk_size, rows, row_ok, doc_rows, to_end_ok, ts, t_ok, doc_ts, t0,
                                        n_cols, ds_col_ok, False, False, False, HAS_SEQ_IDX, BLOCK_ROWS,
                                        BLOCK_PARTNERS, BLOCK_P, BLOCK_N, P_STEPS, DOT_PRECISION)
            c_tile = tl.load(c_chunk + ts[:, None].to(tl.int64) * stride_c_l + n_cols[None, :],
                             mask=t_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(w.to(c_tile.dtype), c_tile, input_precision=DOT_PRECISION)
        db_ptrs = (db_ptr + batch * stride_db_b + (chunk_start + rows[:, None]) * stride_db_l
                   + group * stride_db_g + n_cols[None, :])
        if ATOMIC_OUTPUT:
            tl.atomic_add(db_ptrs, acc, mask=out_mask, sem="relaxed")
        else:
            tl.store(db_ptrs, acc.to(db_ptr.dtype.element_ty), mask=out_mask)

        # ---- dC: rows are t, partners s <= t; the last partner block straddles the diagonal ----
        into_ok = row_ok
        if HAS_SEQ_IDX:
            into_ok = doc_rows == tl.load(seq_chunk - stride_seq_l, mask=chunk > 0, other=-1)
        st_col_ok = n_ok & (chunk > 0)  # chunk 0 starts from the zero state
        last = ((tl.minimum(row_start + BLOCK_ROWS, chunk_len) - 1) // BLOCK_PARTNERS) * BLOCK_PARTNERS
        ss = last + tl.arange(0, BLOCK_PARTNERS)
        s_ok = ss < chunk_len
        doc_ss = _documents(seq_chunk, ss, s_ok, stride_seq_l, HAS_SEQ_IDX)
        acc = tl.zeros([BLOCK_ROWS, BLOCK_N], dtype=tl.float32)
        acc, w = _partner_block(acc, dy_chunk, stride_dy_h, stride_dy_l, x_chunk, stride_x_h, stride_x_l,
                                st_chunk, stride_st_h, stride_st_p, dt_chunk, stride_dt_h, stride_dt_q,
                                cs_chunk, stride_cs_h, stride_cs_q, head_start, head_end, head_dim, chunk_size,
                                rows, row_ok, doc_rows, into_ok, ss, s_ok, doc_ss, row_start, n_cols, st_col_ok,
                                True, True, True, HAS_SEQ_IDX, BLOCK_ROWS, BLOCK_PARTNERS, BLOCK_P, BLOCK_N,
                                P_STEPS, DOT_PRECISION)
        b_tile = tl.load(b_chunk + ss[:, None].to(tl.int64) * stride_b_l + n_cols[None, :],
                         mask=s_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(w.to(b_tile.dtype), b_tile, input_precision=DOT_PRECISION)
        for s0 in range(0, last, BLOCK_PARTNERS):
            ss = s0 + tl.arange(0, BLOCK_PARTNERS)
            s_ok = ss < chunk_len
            doc_ss = _documents(seq_chunk, ss, s_ok, stride_seq_l, HAS_SEQ_IDX)
            if s0 + BLOCK_PARTNERS > row_start:  # only when partner blocks are smaller than row blocks
                acc, w = _partner_block(acc, dy_chunk, stride_dy_h, stride_dy_l, x_chunk, stride_x_h, stride_x_l,
                                        st_chunk, stride_st_h, stride_st_p, dt_chunk, stride_dt_h, stride_dt_q,
                                        cs_chunk, stride_cs_h, stride_cs_q, head_start, head_end, head_dim,
                                        chunk_size, rows, row_ok, doc_rows, into_ok, ss, s_ok, doc_ss, row_start,
                                        n_cols, st_col_ok, True, True, False, HAS_SEQ_IDX, BLOCK_ROWS,
                                        BLOCK_PARTNERS, BLOCK_P, BLOCK_N, P_STEPS, DOT_PRECISION)
            else:
                acc, w = _partner_block(acc, dy_chunk, stride_dy_h, stride_dy_l, x_chunk, stride_x_h, stride_x_l,
                                        st_chunk, stride_st_h, stride_st_p, dt_chunk, stride_dt_h, stride_dt_q,
                                        cs_chunk, stride_cs_h, stride_cs_q, head_start, head_end, head_dim,
                                        chunk_size, rows, row_ok, doc_rows, into_ok, ss, s_ok, doc_ss, row_start,
                                        n_cols, st_col_ok, True, False, False, HAS_SEQ_IDX, BLOCK_ROWS,
                                        BLOCK_PARTNERS, BLOCK_P, BLOCK_N, P_STEPS, DOT_PRECISION)
            b_tile = tl.load(b_chunk + ss[:, None].to(tl.int64) * stride_b_l + n_cols[None, :],
                             mask=s_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(w.to(b_tile.dtype), b_tile, input_precision=DOT_PRECISION)
        dc_ptrs = (dc_ptr + batch * stride_dc_b + (chunk_start + rows[:, None]) * stride_dc_l
                   + group * stride_dc_g + n_cols[None, :])
        if ATOMIC_OUTPUT:
            tl.atomic_add(dc_ptrs, acc, mask=out_mask, sem="relaxed")
        else:
            tl.store(dc_ptrs, acc.to(dc_ptr.dtype.element_ty), mask=out_mask)


def _smallest_divisor_at_least(count: int, least: int) -> int:
    return next(d for d in range(max(1, least), count + 1) if count % d == 0) if least <= count else count


def bc_gradient_blocks(batch: int, seq_len: int, heads: int, groups: int, chunk_size: int, head_dim: int,
                       state_dim: int) -> dict:
    """Default tiling: rows and partners in blocks of up to 64 positions (a [64, 64] fp32 weight tile
    even at Q = 256), the head dim (the K of dy . x) in one step up to 128, up to 128 state columns a
    program (n = 128 then needs one pass over the pairs; n = 256 two), 8 warps once the fp32
    accumulator reaches 64 x 128; at least 16 each (tl.dot's minimum on the GPU).

    HEAD_SPLITS (programs sharing one group's heads): the fewest that give the grid at least
    PROGRAMS_PER_SM_TARGET x STREAMING_MULTIPROCESSORS programs, rounded up to a divisor of the
    heads per group (equal shares), at most one head a program. A prediction, to be measured: it
    pays only if more than one program fits on a SM (registers) or the last wave is short; e.g.
    0.5B (256 programs unsplit) -> 3 splits, 7B (128) -> 6, 34B (256, 16 heads a group) -> 4."""
    rows, block_n = tile_edge(chunk_size, 64), tile_edge(state_dim, 128)
    unsplit_programs = (triton.cdiv(chunk_size, rows) * triton.cdiv(state_dim, block_n)
                        * triton.cdiv(seq_len, chunk_size) * batch * groups)
    wanted = triton.cdiv(PROGRAMS_PER_SM_TARGET * STREAMING_MULTIPROCESSORS, unsplit_programs)
    return dict(BLOCK_ROWS=rows, BLOCK_PARTNERS=rows, BLOCK_P=tile_edge(head_dim, 128), BLOCK_N=block_n,
                HEAD_SPLITS=_smallest_divisor_at_least(heads // groups, wanted),
                num_warps=8 if rows * block_n >= 64 * 128 else 4, num_stages=2)


def _stride_multiple(*tensors: torch.Tensor) -> int:
    """The largest power of 2, up to 16 bytes' worth of elements, dividing every stride but the last
    of every tensor (strides of size-1 dims, only ever multiplied by index 0, aside)."""
    multiple = 16 // max(t.element_size() for t in tensors)
    while any(stride % multiple for t in tensors for stride, size in zip(t.stride()[:-1], t.shape[:-1]) if size > 1):
        multiple //= 2
    return multiple


def bc_gradients(x, dy, dt, dA_cumsum, B, C, states, dS_out, chunk_size, seq_idx=None, dB=None, dC=None,
                 blocks=None):
    """dB, dC [b, l, g, n] of the SSD chunk scan (module docstring: the math and layouts), written
    into the given strided views (allocated in B's / C's dtype if None); returns (dB, dC).

    blocks: overrides of bc_gradient_blocks' choice (BLOCK_ROWS, BLOCK_PARTNERS, BLOCK_P, BLOCK_N:
    powers of 2; HEAD_SPLITS: 1 .. heads per group (more are clamped); num_warps, num_stages,
    maxnreg: Triton's launch options).
    With HEAD_SPLITS > 1 the kernel adds into zeroed fp32 [b, l, g, n] scratch, then copied to
    dB / dC."""
    batch, seq_len, heads, head_dim = x.shape
    groups, state_dim = B.shape[2], B.shape[3]
    n_chunks = triton.cdiv(seq_len, chunk_size)
    assert heads % groups == 0, (heads, groups)
    assert dy.shape == x.shape and C.shape == B.shape == (batch, seq_len, groups, state_dim)
    assert dt.shape == dA_cumsum.shape == (batch, heads, n_chunks, chunk_size), (dt.shape, dA_cumsum.shape)
    assert states.shape == dS_out.shape == (batch, n_chunks, heads, head_dim, state_dim)
    x, dy, B, C, states, dS_out = (last_dim_contiguous(t) for t in (x, dy, B, C, states, dS_out))
    if dB is None:
        dB = torch.empty(batch, seq_len, groups, state_dim, dtype=B.dtype, device=B.device)
    if dC is None:
        dC = torch.empty(batch, seq_len, groups, state_dim, dtype=C.dtype, device=C.device)
    assert dB.shape == dC.shape == B.shape, (dB.shape, dC.shape, B.shape)
    check_written_in_place("bc_gradients", dB=dB, dC=dC)
    config = {**bc_gradient_blocks(batch, seq_len, heads, groups, chunk_size, head_dim, state_dim),
              **(blocks or {})}
    launch = {k: config.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in config}
    head_splits = max(1, min(config.pop("HEAD_SPLITS"), heads // groups))
    if head_splits > 1:
        db_out = torch.zeros(dB.shape, dtype=torch.float32, device=dB.device)
        dc_out = torch.zeros(dC.shape, dtype=torch.float32, device=dC.device)
    else:
        db_out, dc_out = dB, dC
    if seq_idx is not None:
        assert seq_idx.shape == (batch, seq_len), seq_idx.shape
    seq_args = seq_idx_args(seq_idx, dt)
    grid = (triton.cdiv(chunk_size, config["BLOCK_ROWS"]) * triton.cdiv(state_dim, config["BLOCK_N"]),
            n_chunks, batch * groups * head_splits)
    _bc_gradients_kernel[grid](
        x, dy, dt, dA_cumsum, B, C, states, dS_out, seq_args[0], db_out, dc_out,
        seq_len, chunk_size, n_chunks, groups, heads // groups, head_splits, head_dim, state_dim,
        x.stride(0), x.stride(1), x.stride(2),
        dy.stride(0), dy.stride(1), dy.stride(2),
        *dt.stride(), *dA_cumsum.stride(),
        B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2),
        states.stride(0), states.stride(1), states.stride(2), states.stride(3),
        dS_out.stride(0), dS_out.stride(1), dS_out.stride(2), dS_out.stride(3),
        seq_args[1], seq_args[2],
        db_out.stride(0), db_out.stride(1), db_out.stride(2),
        dc_out.stride(0), dc_out.stride(1), dc_out.stride(2),
        HAS_SEQ_IDX=seq_idx is not None, ATOMIC_OUTPUT=head_splits > 1,
        STRIDE_MULTIPLE=_stride_multiple(x, B, C, db_out, dc_out),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        P_STEPS=triton.cdiv(head_dim, config["BLOCK_P"]), **config, **launch,
    )
    if head_splits > 1:
        dB.copy_(db_out)
        dC.copy_(dc_out)
    return dB, dC
