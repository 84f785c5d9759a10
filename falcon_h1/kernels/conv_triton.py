"""Causal depthwise conv1d + SiLU in Triton, forward and backward, on [batch, seq, channels].

The Mamba-2 in-projection writes xBC with channels contiguous, so both kernels read
that layout directly (any batch / sequence strides, channel stride 1) instead of
transposing to PyTorch's [batch, channels, seq] conv layout and back. Each program owns
a [BLOCK_L rows x BLOCK_C channels] tile; the k shifted row windows it needs are
separate loads that hit L1/L2, so device memory sees each input about once. The backward
takes two passes: g = d(out)/d(pre-activation) into an fp32 buffer with the weight gradient's
partials, then dx from g.

The streaming kernels (`streaming=True`, KernelOptions.streaming_conv) walk the rows of a strip
instead, one row at a time, with the last three rows in registers: the backward is then one pass
(x and dy read once, dx written once, no g buffer, dw summed inside each thread).
Arithmetic is fp32 whatever the input dtype.

Optional `out_scale` [channels] multiplies the activation (a per-channel constant such
as a µP multiplier of the consumer), so it costs no separate pass.

Optional `seq_idx` [batch, seq] (document number per token, kernels.documents) makes the
documents of a packed row independent: a tap reading a row of another document than its
output row's reads zero, forward and backward (HAS_SEQ_IDX: without it the kernels are the
unpacked ones, unchanged).

Reference: conv_reference.causal_conv1d_silu_reference (the tests compare the two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KERNEL_WIDTH = 4  # mamba_d_conv of every released Falcon-H1 model


@triton.jit
def _load_taps(w_ptr, cols, col_mask):
    """The four conv taps [c, 4] of these channels, in fp32."""
    w0 = tl.load(w_ptr + cols * 4 + 0, mask=col_mask, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + cols * 4 + 1, mask=col_mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + cols * 4 + 2, mask=col_mask, other=0.0).to(tl.float32)
    w3 = tl.load(w_ptr + cols * 4 + 3, mask=col_mask, other=0.0).to(tl.float32)
    return w0, w1, w2, w3


@triton.jit
def _in_range(rows, seq_len):
    """Rows inside [0, seq_len): the others read as 0 (causal zero padding)."""
    return (rows >= 0) & (rows < seq_len)


@triton.jit
def _documents(seq_base, rows, seq_len, stride_sl, HAS_SEQ_IDX: tl.constexpr):
    """Document number of each row (rows past the end: -2, matching no row)."""
    if HAS_SEQ_IDX:
        return tl.load(seq_base + rows.to(tl.int64) * stride_sl, mask=_in_range(rows, seq_len), other=-2)
    return rows


@triton.jit
def _readable(seq_base, src, seq_len, stride_sl, doc, HAS_SEQ_IDX: tl.constexpr):
    """Which source rows a tap may read for output rows of documents `doc`: in range and,
    with seq_idx, in the same document (another document's rows read as 0)."""
    ok = _in_range(src, seq_len)
    if HAS_SEQ_IDX:
        ok = ok & (tl.load(seq_base + src.to(tl.int64) * stride_sl, mask=ok, other=-1) == doc)
    return ok


@triton.jit
def _load_rows(base, rows, row_ok, stride_l, cols, col_mask):
    """[rows, cols] tile as fp32; rows where row_ok is False read as 0."""
    mask = row_ok[:, None] & col_mask[None, :]
    ptrs = base + rows[:, None].to(tl.int64) * stride_l + cols[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _bias_and_scale(bias_ptr, scale_ptr, cols, col_mask, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """These channels' conv bias (0 without one) and output scale (1 without one), in fp32."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        scale = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    return bias, scale


@triton.jit
def _store_weight_partials(dw_partial_ptr, program, channels, cols, col_mask, dw0, dw1, dw2, dw3, db):
    """One program's (dw, dbias) partial into row `program` of the [programs, 5, channels] buffer
    (taps 0..3 then bias), which torch sums over programs."""
    part = dw_partial_ptr + program.to(tl.int64) * 5 * channels + cols
    tl.store(part + 0 * channels, dw0, mask=col_mask)
    tl.store(part + 1 * channels, dw1, mask=col_mask)
    tl.store(part + 2 * channels, dw2, mask=col_mask)
    tl.store(part + 3 * channels, dw3, mask=col_mask)
    tl.store(part + 4 * channels, db, mask=col_mask)


@triton.jit
def _conv_silu_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, seq_idx_ptr, out_ptr,
    seq_len, channels, stride_xb, stride_xl, stride_sb, stride_sl, stride_ob, stride_ol,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_l, pid_c, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < channels
    x_base = x_ptr + batch.to(tl.int64) * stride_xb
    s_base = seq_idx_ptr + batch.to(tl.int64) * stride_sb
    doc = _documents(s_base, rows, seq_len, stride_sl, HAS_SEQ_IDX)
    # weight is [channels, 4] contiguous: tap j multiplies x[t - 3 + j]
    w0, w1, w2, w3 = _load_taps(w_ptr, cols, col_mask)
    acc = _load_rows(x_base, rows - 3, _readable(s_base, rows - 3, seq_len, stride_sl, doc, HAS_SEQ_IDX),
                     stride_xl, cols, col_mask) * w0[None, :]
    acc += _load_rows(x_base, rows - 2, _readable(s_base, rows - 2, seq_len, stride_sl, doc, HAS_SEQ_IDX),
                      stride_xl, cols, col_mask) * w1[None, :]
    acc += _load_rows(x_base, rows - 1, _readable(s_base, rows - 1, seq_len, stride_sl, doc, HAS_SEQ_IDX),
                      stride_xl, cols, col_mask) * w2[None, :]
    acc += _load_rows(x_base, rows, _in_range(rows, seq_len), stride_xl, cols, col_mask) * w3[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = acc * tl.sigmoid(acc)
    if HAS_SCALE:
        out *= tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    mask = (rows < seq_len)[:, None] & col_mask[None, :]
    out_ptrs = out_ptr + batch.to(tl.int64) * stride_ob + rows[:, None].to(tl.int64) * stride_ol + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dpre(a, dy, scale):
    """Gradient at the pre-activation a = w.x + bias: dy * scale * silu'(a) (scale shaped to broadcast
    against dy: [1, c] for a tile of rows, [c] for one row)."""
    sig = tl.sigmoid(a)
    return dy * scale * sig * (1.0 + a * (1.0 - sig))


@triton.jit
def _conv_silu_bwd_pre_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, seq_idx_ptr, dy_ptr, g_ptr, dw_partial_ptr,
    seq_len, channels, stride_xb, stride_xl, stride_sb, stride_sl, stride_dyb, stride_dyl,
    ROWS_PER_PROGRAM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, RELOAD_WINDOWS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pass 1 of the backward: g = d(out)/d(pre-activation) for every row, written as fp32
    [b, l, c], and a [5, channels] partial of (dw, dbias) per program: dw_j = sum_t g[t] x[t-3+j].

    At most the four x windows of the forward are live (a one-pass backward needs seven shifted
    x windows and g at four shifts, and spills). RELOAD_WINDOWS: one window at a time, each
    read again (from L1/L2, after g's store, so the compiler cannot merge the two reads) for its
    dw_j, which keeps g and one window live instead of four.
    """
    pid_l, pid_c, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < channels
    x_base = x_ptr + batch.to(tl.int64) * stride_xb
    s_base = seq_idx_ptr + batch.to(tl.int64) * stride_sb
    dy_base = dy_ptr + batch.to(tl.int64) * stride_dyb
    w0, w1, w2, w3 = _load_taps(w_ptr, cols, col_mask)
    bias, scale = _bias_and_scale(bias_ptr, scale_ptr, cols, col_mask, HAS_BIAS, HAS_SCALE, BLOCK_C)
    dw0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    g_base = g_ptr + batch.to(tl.int64) * seq_len * channels
    first_row = pid_l * ROWS_PER_PROGRAM
    for offset in range(0, ROWS_PER_PROGRAM, BLOCK_L):
        rows = first_row + offset + tl.arange(0, BLOCK_L)
        doc = _documents(s_base, rows, seq_len, stride_sl, HAS_SEQ_IDX)
        # the forward's windows, masked alike: dw_j then sums only the inputs tap j really read
        ok3 = _readable(s_base, rows - 3, seq_len, stride_sl, doc, HAS_SEQ_IDX)
        ok2 = _readable(s_base, rows - 2, seq_len, stride_sl, doc, HAS_SEQ_IDX)
        ok1 = _readable(s_base, rows - 1, seq_len, stride_sl, doc, HAS_SEQ_IDX)
        in_range = _in_range(rows, seq_len)
        # dy rows past the end read 0, so g there is 0: no contribution from padding
        dy = _load_rows(dy_base, rows, in_range, stride_dyl, cols, col_mask)
        g_ptrs = g_base + rows[:, None].to(tl.int64) * channels + cols[None, :]
        g_mask = (rows < seq_len)[:, None] & col_mask[None, :]
        if RELOAD_WINDOWS:
            a = _load_rows(x_base, rows - 3, ok3, stride_xl, cols, col_mask) * w0[None, :] + bias[None, :]
            a += _load_rows(x_base, rows - 2, ok2, stride_xl, cols, col_mask) * w1[None, :]
            a += _load_rows(x_base, rows - 1, ok1, stride_xl, cols, col_mask) * w2[None, :]
            a += _load_rows(x_base, rows, in_range, stride_xl, cols, col_mask) * w3[None, :]
            g = _dpre(a, dy, scale[None, :])
            tl.store(g_ptrs, g, mask=g_mask)
            dw0 += tl.sum(g * _load_rows(x_base, rows - 3, ok3, stride_xl, cols, col_mask), axis=0)
            dw1 += tl.sum(g * _load_rows(x_base, rows - 2, ok2, stride_xl, cols, col_mask), axis=0)
            dw2 += tl.sum(g * _load_rows(x_base, rows - 1, ok1, stride_xl, cols, col_mask), axis=0)
            dw3 += tl.sum(g * _load_rows(x_base, rows, in_range, stride_xl, cols, col_mask), axis=0)
        else:
            xm3 = _load_rows(x_base, rows - 3, ok3, stride_xl, cols, col_mask)
            xm2 = _load_rows(x_base, rows - 2, ok2, stride_xl, cols, col_mask)
            xm1 = _load_rows(x_base, rows - 1, ok1, stride_xl, cols, col_mask)
            x0 = _load_rows(x_base, rows, in_range, stride_xl, cols, col_mask)
            a = xm3 * w0[None, :] + xm2 * w1[None, :] + xm1 * w2[None, :] + x0 * w3[None, :] + bias[None, :]
            g = _dpre(a, dy, scale[None, :])
            dw0 += tl.sum(g * xm3, axis=0)
            dw1 += tl.sum(g * xm2, axis=0)
            dw2 += tl.sum(g * xm1, axis=0)
            dw3 += tl.sum(g * x0, axis=0)
            tl.store(g_ptrs, g, mask=g_mask)
        db += tl.sum(g, axis=0)
    # partial layout [program, 5, channels]: taps 0..3 then bias; summed over programs by torch
    _store_weight_partials(dw_partial_ptr, batch * tl.num_programs(0) + pid_l, channels, cols, col_mask,
                           dw0, dw1, dw2, dw3, db)


@triton.jit
def _conv_bwd_dx_kernel(
    g_ptr, w_ptr, seq_idx_ptr, dx_ptr, seq_len, channels, stride_sb, stride_sl, stride_dxb, stride_dxl,
    HAS_SEQ_IDX: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pass 2: dx[t] = sum_j w_j g[t + 3 - j] (the transposed conv; g rows past the end are 0,
    and with seq_idx so are rows of another document, whose outputs did not read x[t])."""
    pid_l, pid_c, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < channels
    g_base = g_ptr + batch.to(tl.int64) * seq_len * channels
    s_base = seq_idx_ptr + batch.to(tl.int64) * stride_sb
    doc = _documents(s_base, rows, seq_len, stride_sl, HAS_SEQ_IDX)
    w0, w1, w2, w3 = _load_taps(w_ptr, cols, col_mask)
    dx = _load_rows(g_base, rows, _in_range(rows, seq_len), channels, cols, col_mask) * w3[None, :]
    dx += _load_rows(g_base, rows + 1, _readable(s_base, rows + 1, seq_len, stride_sl, doc, HAS_SEQ_IDX),
                     channels, cols, col_mask) * w2[None, :]
    dx += _load_rows(g_base, rows + 2, _readable(s_base, rows + 2, seq_len, stride_sl, doc, HAS_SEQ_IDX),
                     channels, cols, col_mask) * w1[None, :]
    dx += _load_rows(g_base, rows + 3, _readable(s_base, rows + 3, seq_len, stride_sl, doc, HAS_SEQ_IDX),
                     channels, cols, col_mask) * w0[None, :]
    mask = (rows < seq_len)[:, None] & col_mask[None, :]
    dx_ptrs = dx_ptr + batch.to(tl.int64) * stride_dxb + rows[:, None].to(tl.int64) * stride_dxl + cols[None, :]
    tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_row(base, row, seq_len, stride_l, cols, col_mask):
    """Row `row` of a [l, c] tile as fp32; rows outside [0, seq_len) read as 0."""
    ok = (row >= 0) & (row < seq_len)
    return tl.load(base + row.to(tl.int64) * stride_l + cols, mask=col_mask & ok, other=0.0).to(tl.float32)


@triton.jit
def _row_document(seq_base, row, seq_len, stride_sl, HAS_SEQ_IDX: tl.constexpr):
    """Document number of one row (0 for every row without seq_idx; -1 outside the sequence,
    where x and g read as 0 anyway). A tensor either way: the walk carries it from row to row."""
    if HAS_SEQ_IDX:
        ok = (row >= 0) & (row < seq_len)
        return tl.load(seq_base + row.to(tl.int64) * stride_sl, mask=ok, other=-1)
    return row * 0


@triton.jit
def _rows_before(x_base, s_base, first, seq_len, stride_xl, stride_sl, cols, col_mask, HAS_SEQ_IDX: tl.constexpr):
    """The three rows of x before a strip's first row, and their documents: what the walk holds
    when it reaches `first`."""
    xm3 = _load_row(x_base, first - 3, seq_len, stride_xl, cols, col_mask)
    xm2 = _load_row(x_base, first - 2, seq_len, stride_xl, cols, col_mask)
    xm1 = _load_row(x_base, first - 1, seq_len, stride_xl, cols, col_mask)
    dm3 = _row_document(s_base, first - 3, seq_len, stride_sl, HAS_SEQ_IDX)
    dm2 = _row_document(s_base, first - 2, seq_len, stride_sl, HAS_SEQ_IDX)
    dm1 = _row_document(s_base, first - 1, seq_len, stride_sl, HAS_SEQ_IDX)
    return xm3, xm2, xm1, dm3, dm2, dm1


@triton.jit
def _document_taps(xm3, xm2, xm1, dm3, dm2, dm1, d0, HAS_SEQ_IDX: tl.constexpr):
    """The three earlier rows as row t's output reads them: with seq_idx, a row of another
    document than t's (d0) reads as 0."""
    if HAS_SEQ_IDX:
        return tl.where(dm3 == d0, xm3, 0.0), tl.where(dm2 == d0, xm2, 0.0), tl.where(dm1 == d0, xm1, 0.0)
    return xm3, xm2, xm1


@triton.jit
def _conv_silu_fwd_streaming_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, seq_idx_ptr, out_ptr,
    seq_len, channels, stride_xb, stride_xl, stride_sb, stride_sl, stride_ob, stride_ol,
    ROWS_PER_PROGRAM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The forward in one pass over the rows of a [ROWS_PER_PROGRAM x BLOCK_C] strip, the last three
    rows of x kept in registers (each x row read once, plus three rows of halo a strip), the next
    row's load issued before the current row's arithmetic."""
    pid_l, pid_c, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < channels
    x_base = x_ptr + batch.to(tl.int64) * stride_xb
    s_base = seq_idx_ptr + batch.to(tl.int64) * stride_sb
    out_base = out_ptr + batch.to(tl.int64) * stride_ob
    w0, w1, w2, w3 = _load_taps(w_ptr, cols, col_mask)
    bias, scale = _bias_and_scale(bias_ptr, scale_ptr, cols, col_mask, HAS_BIAS, HAS_SCALE, BLOCK_C)
    first = pid_l * ROWS_PER_PROGRAM
    xm3, xm2, xm1, dm3, dm2, dm1 = _rows_before(x_base, s_base, first, seq_len, stride_xl, stride_sl, cols,
                                                col_mask, HAS_SEQ_IDX)
    x_next = _load_row(x_base, first, seq_len, stride_xl, cols, col_mask)
    for i in range(0, ROWS_PER_PROGRAM):
        t = first + i
        x0 = x_next
        x_next = _load_row(x_base, t + 1, seq_len, stride_xl, cols, col_mask)
        d0 = _row_document(s_base, t, seq_len, stride_sl, HAS_SEQ_IDX)
        tap0, tap1, tap2 = _document_taps(xm3, xm2, xm1, dm3, dm2, dm1, d0, HAS_SEQ_IDX)
        a = tap0 * w0 + tap1 * w1 + tap2 * w2 + x0 * w3 + bias
        y = a * tl.sigmoid(a)
        if HAS_SCALE:
            y *= scale
        tl.store(out_base + t.to(tl.int64) * stride_ol + cols, y.to(out_ptr.dtype.element_ty),
                 mask=col_mask & (t < seq_len))
        xm3, xm2, xm1 = xm2, xm1, x0
        dm3, dm2, dm1 = dm2, dm1, d0


@triton.jit
def _conv_silu_bwd_streaming_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, seq_idx_ptr, dy_ptr, dx_ptr, dw_partial_ptr,
    seq_len, channels, stride_xb, stride_xl, stride_sb, stride_sl, stride_dyb, stride_dyl, stride_dxb, stride_dxl,
    ROWS_PER_PROGRAM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The whole backward in one pass over the rows of a [ROWS_PER_PROGRAM x BLOCK_C] strip:
    dx, and a [5, channels] partial of (dw, dbias) per program.

    The program walks its rows in order, one row of x and dy at a time, and keeps the last three
    rows of x and of g = d(out)/d(pre-activation) in registers: g[t] needs x[t-3..t], and
    dx[t-3] = sum_j w_j g[t-j] is complete once g[t] is. So the strip reads x and dy once (plus
    three rows of halo at each end) and writes dx once: no g buffer, and dw and dbias sum over
    rows inside each thread, with no reduction across threads until the end. The next row's
    loads are issued before the current row's arithmetic, so each warp keeps two rows in flight.
    With seq_idx a tap pairs only rows of one document, as in the forward.
    """
    pid_l, pid_c, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < channels
    x_base = x_ptr + batch.to(tl.int64) * stride_xb
    s_base = seq_idx_ptr + batch.to(tl.int64) * stride_sb
    dy_base = dy_ptr + batch.to(tl.int64) * stride_dyb
    dx_base = dx_ptr + batch.to(tl.int64) * stride_dxb
    w0, w1, w2, w3 = _load_taps(w_ptr, cols, col_mask)
    bias, scale = _bias_and_scale(bias_ptr, scale_ptr, cols, col_mask, HAS_BIAS, HAS_SCALE, BLOCK_C)
    first = pid_l * ROWS_PER_PROGRAM
    last = tl.minimum(first + ROWS_PER_PROGRAM, seq_len)  # rows whose dx and dw this program owns
    # rows t-3, t-2, t-1 of x (and their documents) before the first row's step
    xm3, xm2, xm1, dm3, dm2, dm1 = _rows_before(x_base, s_base, first, seq_len, stride_xl, stride_sl, cols,
                                                col_mask, HAS_SEQ_IDX)
    gm3 = tl.zeros([BLOCK_C], dtype=tl.float32)
    gm2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    gm1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    x_next = _load_row(x_base, first, seq_len, stride_xl, cols, col_mask)
    dy_next = _load_row(dy_base, first, seq_len, stride_dyl, cols, col_mask)
    # g is needed three rows past `last` (for dx[last - 1]); rows past the sequence read dy = 0
    for i in range(0, ROWS_PER_PROGRAM + 3):
        t = first + i
        x0, dy0 = x_next, dy_next
        x_next = _load_row(x_base, t + 1, seq_len, stride_xl, cols, col_mask)
        dy_next = _load_row(dy_base, t + 1, seq_len, stride_dyl, cols, col_mask)
        d0 = _row_document(s_base, t, seq_len, stride_sl, HAS_SEQ_IDX)
        tap0, tap1, tap2 = _document_taps(xm3, xm2, xm1, dm3, dm2, dm1, d0, HAS_SEQ_IDX)
        a = tap0 * w0 + tap1 * w1 + tap2 * w2 + x0 * w3 + bias
        g0 = _dpre(a, dy0, scale)
        g_own = tl.where(t < last, g0, 0.0)
        dw0 += g_own * tap0
        dw1 += g_own * tap1
        dw2 += g_own * tap2
        dw3 += g_own * x0
        db += g_own
        # dx of row u = t - 3: the outputs u..u+3 of u's document read x[u]
        if HAS_SEQ_IDX:
            dx_u = (gm3 * w3 + tl.where(dm2 == dm3, gm2, 0.0) * w2 + tl.where(dm1 == dm3, gm1, 0.0) * w1
                    + tl.where(d0 == dm3, g0, 0.0) * w0)
        else:
            dx_u = gm3 * w3 + gm2 * w2 + gm1 * w1 + g0 * w0
        u = t - 3
        tl.store(dx_base + u.to(tl.int64) * stride_dxl + cols, dx_u.to(dx_ptr.dtype.element_ty),
                 mask=col_mask & (u >= first) & (u < last))
        xm3, xm2, xm1 = xm2, xm1, x0
        gm3, gm2, gm1 = gm2, gm1, g0
        dm3, dm2, dm1 = dm2, dm1, d0
    _store_weight_partials(dw_partial_ptr, batch * tl.num_programs(0) + pid_l, channels, cols, col_mask,
                           dw0, dw1, dw2, dw3, db)


# Tile shapes for Hopper (H100/H200) at the Falcon-H1 widths: 128 channels x 2 bytes = 256-byte
# rows. Measured with `falcon-bench --kernels conv` (benchmarks/NOTES.md, H200, 0.5B shape): the
# forward at 32x128, 4 warps, 0.092 ms. The backward's two passes use the forward's tile shape
# (pass 1 holds the forward's four x windows plus dy; pass 2 is the forward's shape over g).
FWD_BLOCK_L, FWD_BLOCK_C, FWD_WARPS = 32, 128, 4
BWD_BLOCK_L, BWD_BLOCK_C, BWD_WARPS, BWD_ROWS_PER_PROGRAM = 32, 128, 4, 64
BWD_RELOAD_WINDOWS, BWD_STAGES = False, 3
# The one-pass backward (_conv_silu_bwd_streaming_kernel): one warp walks 64 rows of 128 channels
# (4 a thread); 3 halo rows at each end of a strip are read twice.
STREAM_BLOCK_C, STREAM_WARPS, STREAM_ROWS_PER_PROGRAM = 128, 1, 64


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _seq_idx_args(seq_idx, fallback):
    """(pointer, batch stride, sequence stride) of seq_idx, or of a dummy when there is none."""
    if seq_idx is None:
        return fallback, 0, 0
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def conv_silu_forward(x, weight, bias, out_scale=None, seq_idx=None, streaming=False):
    """x [b, l, c] (channel stride 1), weight [c, 4], bias [c] or None, seq_idx [b, l] int32 or
    None -> [b, l, c] contiguous. streaming: one pass over the rows (_conv_silu_fwd_streaming_kernel);
    False: row tiles, each reading its four shifted windows."""
    batch, seq_len, channels = x.shape
    out = torch.empty(batch, seq_len, channels, device=x.device, dtype=x.dtype)
    if streaming:
        grid = (triton.cdiv(seq_len, STREAM_ROWS_PER_PROGRAM), triton.cdiv(channels, STREAM_BLOCK_C), batch)
        seq_ptr, stride_sb, stride_sl = _seq_idx_args(seq_idx, weight)
        _conv_silu_fwd_streaming_kernel[grid](
            x, weight, bias if bias is not None else weight, out_scale if out_scale is not None else weight,
            seq_ptr, out, seq_len, channels, x.stride(0), x.stride(1), stride_sb, stride_sl, out.stride(0),
            out.stride(1), ROWS_PER_PROGRAM=STREAM_ROWS_PER_PROGRAM, HAS_BIAS=bias is not None,
            HAS_SCALE=out_scale is not None, HAS_SEQ_IDX=seq_idx is not None, BLOCK_C=STREAM_BLOCK_C,
            num_warps=STREAM_WARPS)
        return out
    grid = (triton.cdiv(seq_len, FWD_BLOCK_L), triton.cdiv(channels, FWD_BLOCK_C), batch)
    seq_ptr, stride_sb, stride_sl = _seq_idx_args(seq_idx, weight)
    _conv_silu_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, out_scale if out_scale is not None else weight, seq_ptr,
        out, seq_len, channels, x.stride(0), x.stride(1), stride_sb, stride_sl, out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, HAS_SCALE=out_scale is not None, HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_L=FWD_BLOCK_L, BLOCK_C=FWD_BLOCK_C, num_warps=FWD_WARPS,
    )
    return out


def conv_silu_backward(dy, x, weight, bias, out_scale=None, dx=None, seq_idx=None, streaming=False):
    """-> dx [b, l, c] in x's dtype, dweight [c, 4] and dbias [c] (None without bias) in weight's dtype.

    dx: optional output buffer [b, l, c] with channel stride 1 (e.g. a slice of a larger
    gradient), written in place.
    streaming: one pass over the rows (_conv_silu_bwd_streaming_kernel); False: two passes
    through an fp32 buffer of g (pass 1 with the weight gradient's partials, pass 2 dx).
    """
    batch, seq_len, channels = x.shape
    dy = _channels_last(dy)
    if dx is None:
        dx = torch.empty(batch, seq_len, channels, device=x.device, dtype=x.dtype)
    if streaming:
        return _streaming_backward(dy, x, weight, bias, out_scale, dx, seq_idx)
    g = torch.empty(batch, seq_len, channels, device=x.device, dtype=torch.float32)
    n_l = triton.cdiv(seq_len, BWD_ROWS_PER_PROGRAM)
    partial = torch.empty(batch * n_l, 5, channels, device=x.device, dtype=torch.float32)
    grid = (n_l, triton.cdiv(channels, BWD_BLOCK_C), batch)
    seq_ptr, stride_sb, stride_sl = _seq_idx_args(seq_idx, weight)
    _conv_silu_bwd_pre_kernel[grid](
        x, weight, bias if bias is not None else weight, out_scale if out_scale is not None else weight, seq_ptr,
        dy, g, partial, seq_len, channels, x.stride(0), x.stride(1), stride_sb, stride_sl, dy.stride(0),
        dy.stride(1), ROWS_PER_PROGRAM=BWD_ROWS_PER_PROGRAM, HAS_BIAS=bias is not None,
        HAS_SCALE=out_scale is not None, HAS_SEQ_IDX=seq_idx is not None, RELOAD_WINDOWS=BWD_RELOAD_WINDOWS,
        BLOCK_C=BWD_BLOCK_C, BLOCK_L=BWD_BLOCK_L, num_warps=BWD_WARPS, num_stages=BWD_STAGES)
    grid = (triton.cdiv(seq_len, FWD_BLOCK_L), triton.cdiv(channels, FWD_BLOCK_C), batch)
    _conv_bwd_dx_kernel[grid](g, weight, seq_ptr, dx, seq_len, channels, stride_sb, stride_sl, dx.stride(0),
                              dx.stride(1), HAS_SEQ_IDX=seq_idx is not None,
                              BLOCK_L=FWD_BLOCK_L, BLOCK_C=FWD_BLOCK_C, num_warps=FWD_WARPS)
    return (dx, *_weight_gradients(partial, weight, bias))


def _weight_gradients(partial, weight, bias):
    """(dweight [c, 4], dbias [c] or None) from the programs' [n, 5, c] fp32 partials, summed in a
    fixed order (no atomics: deterministic)."""
    sums = partial.sum(0)
    return sums[:4].t().to(weight.dtype), (sums[4].to(bias.dtype) if bias is not None else None)


def _streaming_backward(dy, x, weight, bias, out_scale, dx, seq_idx):
    batch, seq_len, channels = x.shape
    n_l = triton.cdiv(seq_len, STREAM_ROWS_PER_PROGRAM)
    partial = torch.empty(batch * n_l, 5, channels, device=x.device, dtype=torch.float32)
    seq_ptr, stride_sb, stride_sl = _seq_idx_args(seq_idx, weight)
    grid = (n_l, triton.cdiv(channels, STREAM_BLOCK_C), batch)
    _conv_silu_bwd_streaming_kernel[grid](
        x, weight, bias if bias is not None else weight, out_scale if out_scale is not None else weight, seq_ptr,
        dy, dx, partial, seq_len, channels, x.stride(0), x.stride(1), stride_sb, stride_sl, dy.stride(0),
        dy.stride(1), dx.stride(0), dx.stride(1), ROWS_PER_PROGRAM=STREAM_ROWS_PER_PROGRAM,
        HAS_BIAS=bias is not None, HAS_SCALE=out_scale is not None, HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_C=STREAM_BLOCK_C, num_warps=STREAM_WARPS)
    return (dx, *_weight_gradients(partial, weight, bias))


class CausalConv1dSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_scale, seq_idx, streaming):
        x = _channels_last(x)
        weight = weight.contiguous()
        ctx.save_for_backward(x, weight, bias, out_scale, seq_idx)
        ctx.streaming = streaming
        return conv_silu_forward(x, weight, bias, out_scale, seq_idx, streaming=streaming)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, out_scale, seq_idx = ctx.saved_tensors
        dx, dweight, dbias = conv_silu_backward(dy, x, weight, bias, out_scale, seq_idx=seq_idx,
                                                streaming=ctx.streaming)
        return dx, dweight, dbias, None, None, None


def causal_conv1d_silu_triton(x, weight, bias, out_scale=None, seq_idx=None, streaming=False):
    """silu(causal depthwise conv(x)) * out_scale on [b, l, c]; out_scale is a constant (no grad);
    seq_idx [b, l] int32 (kernels.documents) keeps each packed document's window to itself;
    streaming: both passes one row at a time (conv_silu_forward's and conv_silu_backward's `streaming`)."""
    if weight.shape[-1] != KERNEL_WIDTH:
        raise ValueError(f"mamba_d_conv = {weight.shape[-1]}: the Triton conv kernel supports only "
                         f"{KERNEL_WIDTH}; use model.kernel_backend = 'reference'.")
    if out_scale is not None:
        out_scale = out_scale.detach().float().contiguous()
    return CausalConv1dSiLU.apply(x, weight, bias, out_scale, seq_idx, streaming)
