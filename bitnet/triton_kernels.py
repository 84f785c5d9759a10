"""Triton kernels for the BitNet quantisers (CUDA only); `reference.py` is their definition.

Bit-exactness with the reference needs three things every kernel here does:
- launched with `enable_fp_fusion=False`: `x * s + 0.5` must round twice, like PyTorch's
  separate multiply and add, not once in a fused multiply-add;
- divisions through libdevice's `div_rn` (IEEE round-to-nearest); Triton's `/` on float32 is
  an approximate division;
- the weight |W| sum accumulated in float64, so its blocking does not change the scale.

No kernel reads a value back to the host: the weight mean goes from the reduction kernel to
the quantise kernel through a device tensor, so a forward pass has no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from bitnet.segments import feature_layout, weight_layout

_SUM_BLOCK = 4096
_SUM_MAX_PROGRAMS = 1024
_QUANT_BLOCK = 2048
_NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def _weight_scales(stats_ptr):
    """(m, s) = (mean|W|, 1 / mean|W|) in float32 from float64 [sum|W|, numel] at stats_ptr; every
    program finishes the mean itself from the two stats: cheaper than another launch."""
    mean = libdevice.div_rn(tl.load(stats_ptr), tl.load(stats_ptr + 1))
    mean = tl.maximum(mean, tl.full([], 1e-5, tl.float64))
    return mean.to(tl.float32), libdevice.div_rn(tl.full([], 1.0, tl.float64), mean).to(tl.float32)


@triton.jit
def _range_absmax(base, lo, hi, BLOCK_D: tl.constexpr):
    """max |x| (float32) over base[lo:hi]."""
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        x = tl.load(base + offs, mask=offs < hi, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
    return tl.max(acc, axis=0)


@triton.jit
def _activation_scales(absmax):
    """(s, scale) = (127 / a, a / 127) with a = max(absmax, 1e-5)."""
    a = tl.maximum(absmax, 1e-5)
    return libdevice.div_rn(tl.full([], 127.0, tl.float32), a), libdevice.div_rn(a, tl.full([], 127.0, tl.float32))


@triton.jit
def _round_clamp(v, lo, hi):
    """round-half-up(v) clamped to [lo, hi]."""
    return tl.minimum(tl.maximum(tl.floor(v + 0.5), lo), hi)


# `layout` is a bitnet.segments.SegmentLayout (None: the tensor is one segment); its
# `tables(device)` hold the segment bounds and quantised flags on the device, so the kernels
# read them without a host round trip.
@triton.jit
def _abs_sum_partial_kernel(
    w_ptr, bounds_ptr, partial_ptr, rows, cols, programs,
    N_SEG: tl.constexpr, SEG_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
):
    """Program (p, i) sums |w| (float64) over its share of segment i: rows (SEG_DIM 0) or
    columns (SEG_DIM 1) bounds[i] .. bounds[i + 1] of the row-major w [rows, cols]."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    lo = tl.load(bounds_ptr + seg).to(tl.int64)
    hi = tl.load(bounds_ptr + seg + 1).to(tl.int64)
    # lo, hi are int64, so every offset below is int64 (rows, cols may be specialised ints).
    if SEG_DIM == 0:
        base = w_ptr + lo * cols
        n = (hi - lo) * cols
    else:
        base = w_ptr + lo
        n = rows * (hi - lo)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    start = pid.to(tl.int64) * BLOCK * BLOCKS_PER_PROGRAM
    for i in range(BLOCKS_PER_PROGRAM):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if SEG_DIM == 0 or N_SEG == 1:  # contiguous: whole rows, or a lone segment of every column
            addr = base + offs
        else:
            addr = base + (offs // (hi - lo)) * cols + offs % (hi - lo)
        w = tl.load(addr, mask=offs < n, other=0.0)
        acc += tl.abs(w.to(tl.float64))
    tl.store(partial_ptr + seg * programs + pid, tl.sum(acc, axis=0))


@triton.jit
def _finish_stats_kernel(partial_ptr, bounds_ptr, stats_ptr, programs, other, BLOCK_P: tl.constexpr):
    """Program i: stats[i] = [sum of segment i's partial |w| sums, its numel] (float64)."""
    seg = tl.program_id(0)
    p = tl.arange(0, BLOCK_P)
    total = tl.sum(tl.load(partial_ptr + seg * programs + p, mask=p < programs, other=0.0), axis=0)
    size = tl.load(bounds_ptr + seg + 1).to(tl.float64) - tl.load(bounds_ptr + seg).to(tl.float64)
    tl.store(stats_ptr + 2 * seg, total)
    tl.store(stats_ptr + 2 * seg + 1, size * other)


@triton.jit
def _weight_quant_kernel(
    w_ptr, stats_ptr, bounds_ptr, flags_ptr, out_ptr, scale_ptr, row_scale_ptr, n, cols, row_len,
    N_SEG: tl.constexpr, SEG_DIM: tl.constexpr, BLOCK: tl.constexpr, TERNARY_OUT: tl.constexpr,
    ROW_SCALE: tl.constexpr,
):
    """Quantises each element with the (m, s) of its segment (row of w for SEG_DIM 0, column
    for 1); elements of full-precision segments are copied (0 in the ternary output, and their
    scale is 0). ROW_SCALE (float output): each row of w (row_len elements) times
    row_scale[row] rounded to the output dtype, as the separate multiply of the two rounded tensors."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # Every program finishes each segment's mean from its float64 stats: cheaper than launches.
    # Segment 0 starts at 0; a later segment takes over from its start (segments come in
    # order). With one segment the position is never needed, and the compiler drops it.
    m, s = _weight_scales(stats_ptr)
    quantized = tl.load(flags_ptr) != 0
    if pid == 0:
        tl.store(scale_ptr, tl.where(quantized, m, 0.0))
    if SEG_DIM == 0:
        pos = offs // cols
    else:
        pos = offs % cols
    for i in tl.static_range(1, N_SEG):
        m_i, s_i = _weight_scales(stats_ptr + 2 * i)
        flag_i = tl.load(flags_ptr + i) != 0
        inside = pos >= tl.load(bounds_ptr + i).to(tl.int64)
        m = tl.where(inside, m_i, m)
        s = tl.where(inside, s_i, s)
        quantized = tl.where(inside, flag_i, quantized)
        if pid == 0:
            tl.store(scale_ptr + i, tl.where(flag_i, m_i, 0.0))
    w_raw = tl.load(w_ptr + offs, mask=mask, other=0.0)
    q = _round_clamp(w_raw.to(tl.float32) * s, -1.0, 1.0)
    if TERNARY_OUT:
        tl.store(out_ptr + offs, tl.where(quantized, q, 0.0).to(tl.int8), mask=mask)
    else:
        w_fq = tl.where(quantized, (q * m).to(out_ptr.dtype.element_ty), w_raw.to(out_ptr.dtype.element_ty))
        if ROW_SCALE:
            r = tl.load(row_scale_ptr + offs // row_len, mask=mask, other=0.0).to(out_ptr.dtype.element_ty)
            w_fq = (w_fq.to(tl.float32) * r.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, w_fq, mask=mask)


@triton.jit
def _row_absmax_kernel(x_ptr, bounds_ptr, absmax_ptr, D, N_SEG: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row, i): max|x| over segment i of the row."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    lo = tl.load(bounds_ptr + seg)
    hi = tl.load(bounds_ptr + seg + 1)
    tl.store(absmax_ptr + row * N_SEG + seg, _range_absmax(x_ptr + row * D, lo, hi, BLOCK_D))


@triton.jit
def _store_quantized(x_raw, offs, mask, s, scale, quantized, q_row, fq_row, WRITE_INT8: tl.constexpr,
                     WRITE_FAKE: tl.constexpr):
    q = _round_clamp(x_raw.to(tl.float32) * s, -128.0, 127.0)
    if WRITE_INT8:
        tl.store(q_row + offs, tl.where(quantized, q, 0.0).to(tl.int8), mask=mask)
    if WRITE_FAKE:
        x_fq = (q * scale).to(fq_row.dtype.element_ty)
        tl.store(fq_row + offs, tl.where(quantized, x_fq, x_raw.to(fq_row.dtype.element_ty)), mask=mask)


@triton.jit
def _act_quant_kernel(
    x_ptr, bounds_ptr, flags_ptr, absmax_ptr, q_ptr, fq_ptr, scale_ptr, D,
    N_SEG: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ABSMAX: tl.constexpr, WRITE_INT8: tl.constexpr,
    WRITE_FAKE: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """Program (row, i): absmax of segment i of the row (unless given), then quantise it into the
    int8 output (WRITE_INT8; 0 for a full-precision segment) and / or the dequantised one
    (WRITE_FAKE; a full-precision segment copied). ONE_BLOCK (every segment fits BLOCK_D): the
    segment is read once and kept in registers between its absmax and its quantisation; else it
    is walked in BLOCK_D steps twice."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    lo = tl.load(bounds_ptr + seg)
    hi = tl.load(bounds_ptr + seg + 1)
    quantized = tl.load(flags_ptr + seg) != 0
    base = x_ptr + row * D
    q_row, fq_row = q_ptr + row * D, fq_ptr + row * D
    if ONE_BLOCK:
        offs = lo + tl.arange(0, BLOCK_D)
        mask = offs < hi
        x_raw = tl.load(base + offs, mask=mask, other=0.0)
    if HAS_ABSMAX:
        a = tl.load(absmax_ptr + row * N_SEG + seg).to(tl.float32)
    elif ONE_BLOCK:
        a = tl.max(tl.abs(x_raw.to(tl.float32)), axis=0)
    else:
        a = _range_absmax(base, lo, hi, BLOCK_D)
    s, scale = _activation_scales(a)
    if ONE_BLOCK:
        _store_quantized(x_raw, offs, mask, s, scale, quantized, q_row, fq_row, WRITE_INT8, WRITE_FAKE)
    else:
        for start in range(lo, hi, BLOCK_D):
            offs = start + tl.arange(0, BLOCK_D)
            mask = offs < hi
            x_raw = tl.load(base + offs, mask=mask, other=0.0)
            _store_quantized(x_raw, offs, mask, s, scale, quantized, q_row, fq_row, WRITE_INT8, WRITE_FAKE)
    tl.store(scale_ptr + row * N_SEG + seg, scale)


@triton.jit
def _act_dequant_kernel(q_ptr, scale_ptr, bounds_ptr, out_ptr, D, N_SEG: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row, i): segment i of the int8 row times its scale, in out's dtype."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    lo = tl.load(bounds_ptr + seg)
    hi = tl.load(bounds_ptr + seg + 1)
    scale = tl.load(scale_ptr + row * N_SEG + seg)
    for start in range(lo, hi, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        mask = offs < hi
        q = tl.load(q_ptr + row * D + offs, mask=mask, other=0).to(tl.float32)
        tl.store(out_ptr + row * D + offs, (q * scale).to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ wrappers
def weight_stats(w: torch.Tensor, layout=None) -> torch.Tensor:
    """float64 `[sum(|w|), numel]` on w's device ([n, 2] per segment with a layout); no host
    synchronisation."""
    w2, lay = weight_layout(w.detach().contiguous(), layout)
    rows, cols = w2.shape
    tables = lay.tables(w2.device)
    other = cols if lay.dim == 0 else rows
    blocks = triton.cdiv(max(s.size for s in lay.segments) * other, _SUM_BLOCK)
    per_program = triton.next_power_of_2(triton.cdiv(blocks, _SUM_MAX_PROGRAMS))
    programs = max(1, triton.cdiv(blocks, per_program))
    partial = torch.empty(len(lay), programs, dtype=torch.float64, device=w2.device)
    _abs_sum_partial_kernel[(programs, len(lay))](
        w2, tables.bounds, partial, rows, cols, programs,
        N_SEG=len(lay), SEG_DIM=lay.dim, BLOCK=_SUM_BLOCK, BLOCKS_PER_PROGRAM=per_program, **_NO_FMA,
    )
    stats = torch.empty(len(lay), 2, dtype=torch.float64, device=w2.device)
    _finish_stats_kernel[(len(lay),)](partial, tables.bounds, stats, programs, other,
                                      BLOCK_P=triton.next_power_of_2(programs), **_NO_FMA)
    return stats if layout is not None else stats[0]


def _weight_quant(w: torch.Tensor, stats: torch.Tensor | None, layout, ternary_out: bool,
                  row_scale: torch.Tensor | None = None):
    w2, lay = weight_layout(w.detach().contiguous(), layout)
    row_len = w.shape[-1] if w.dim() else 1  # rows of w itself, whatever the layout's 2-D view
    if row_scale is not None and row_scale.numel() * row_len != w.numel():
        raise ValueError(f"fake_quantize_weights: row_scale of {row_scale.numel()} values for a weight shaped "
                         f"{tuple(w.shape)}; allowed: one per row ({w.numel() // max(row_len, 1)})")
    stats = weight_stats(w2, lay) if stats is None else stats.reshape(len(lay), 2)
    tables = lay.tables(w2.device)
    out = torch.empty_like(w2, dtype=torch.int8 if ternary_out else w2.dtype)
    scales = torch.empty(len(lay), dtype=torch.float32, device=w2.device)
    n = w2.numel()
    grid = (max(1, triton.cdiv(n, _QUANT_BLOCK)),)
    _weight_quant_kernel[grid](
        w2, stats.to(torch.float64).contiguous(), tables.bounds, tables.flags, out, scales,
        scales if row_scale is None else row_scale.reshape(-1).contiguous(), n, w2.shape[1], row_len,
        N_SEG=len(lay), SEG_DIM=lay.dim, BLOCK=_QUANT_BLOCK, TERNARY_OUT=ternary_out, ROW_SCALE=row_scale is not None,
        **_NO_FMA,
    )
    return (out, scales) if layout is not None else (out.reshape(w.shape), scales[0])


def quantize_weights(w: torch.Tensor, stats: torch.Tensor | None = None, layout=None):
    return _weight_quant(w, stats, layout, ternary_out=True)


def fake_quantize_weights(w: torch.Tensor, stats: torch.Tensor | None = None, layout=None,
                          row_scale: torch.Tensor | None = None) -> torch.Tensor:
    return _weight_quant(w, stats, layout, ternary_out=False, row_scale=row_scale)[0]


def _rows(x: torch.Tensor):
    x = x.detach().contiguous()
    d = x.shape[-1]
    rows = x.numel() // d if d else 0
    return x, rows, d


def _block_d(layout) -> int:
    return min(triton.next_power_of_2(max(max(s.size for s in layout.segments), 16)), 4096)


def activation_absmax(x: torch.Tensor, layout=None) -> torch.Tensor:
    lay = feature_layout(x, layout)
    x, rows, d = _rows(x)
    absmax = torch.empty(*x.shape[:-1], len(lay), dtype=torch.float32, device=x.device)
    if rows:
        _row_absmax_kernel[(rows, len(lay))](
            x, lay.tables(x.device).bounds, absmax, d, N_SEG=len(lay), BLOCK_D=_block_d(lay), **_NO_FMA,
        )
    return absmax if layout is not None else absmax[..., 0]


# The activation quantiser reads each segment once where it fits a block (else it walks the row
# twice). Off until timed against the two-pass form: `bash benchmarks/call_bitnet_quant.sh`.
READ_ROW_ONCE = False


def _act_quant(x: torch.Tensor, absmax: torch.Tensor | None, layout, write_int8: bool, write_fake: bool,
               read_once: bool | None = None):
    """(int8 or None, scales, dequantised or None), as asked. read_once (default READ_ROW_ONCE):
    a segment that fits one block is read once; False walks every row in block steps twice (the
    form of segments wider than a block)."""
    read_once = READ_ROW_ONCE if read_once is None else read_once
    lay = feature_layout(x, layout)
    x, rows, d = _rows(x)
    q = torch.empty_like(x, dtype=torch.int8) if write_int8 else None
    fake = torch.empty_like(x) if write_fake else None
    scale = torch.empty(*x.shape[:-1], len(lay), dtype=torch.float32, device=x.device)
    if rows:
        tables, block_d = lay.tables(x.device), _block_d(lay)
        if absmax is None:
            absmax_arg = scale  # not read
        else:
            absmax_arg = (absmax if layout is not None else absmax.unsqueeze(-1)).to(torch.float32).contiguous()
        _act_quant_kernel[(rows, len(lay))](
            x, tables.bounds, tables.flags, absmax_arg, q if write_int8 else fake, fake if write_fake else q,
            scale, d, N_SEG=len(lay), BLOCK_D=block_d, HAS_ABSMAX=absmax is not None,
            WRITE_INT8=write_int8, WRITE_FAKE=write_fake,
            ONE_BLOCK=read_once and max(s.size for s in lay.segments) <= block_d, **_NO_FMA,
        )
    return q, (scale if layout is not None else scale[..., 0]), fake


def quantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None, layout=None):
    q, scale, _ = _act_quant(x, absmax, layout, write_int8=True, write_fake=False)
    return q, scale


def fake_quantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None, layout=None) -> torch.Tensor:
    return _act_quant(x, absmax, layout, write_int8=False, write_fake=True)[2]


def quantize_and_dequantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None, layout=None):
    """One pass over x writing both outputs (see reference.quantize_and_dequantize_activations)."""
    return _act_quant(x, absmax, layout, write_int8=True, write_fake=True)


def dequantize_activations(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, layout=None) -> torch.Tensor:
    lay = feature_layout(q, layout)
    q, rows, d = _rows(q)
    out = torch.empty_like(q, dtype=dtype)
    if rows:
        scale = (scale if layout is not None else scale.unsqueeze(-1)).to(torch.float32).contiguous()
        _act_dequant_kernel[(rows, len(lay))](
            q, scale, lay.tables(q.device).bounds, out, d, N_SEG=len(lay), BLOCK_D=_block_d(lay), **_NO_FMA,
        )
    return out


# --------------------------------------------------------------------------- int8 GEMM
def _int8_matmul_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_stages=stages, num_warps=warps)
        for bm, bn, bk, stages, warps in [
            (128, 256, 128, 3, 8),
            (256, 128, 128, 3, 8),
            (128, 128, 128, 4, 8),
            (128, 128, 64, 4, 4),
            (64, 128, 128, 4, 4),
        ]
    ]


# Tuned per weight shape only: the token count M changes from batch to batch.
@triton.autotune(configs=_int8_matmul_configs(), key=["N", "K"])
@triton.jit
def _int8_matmul_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PER_N_SCALE: tl.constexpr,
):
    """C[M, N] = (A[M, K] @ B[N, K]^T in int32) * a_scale[M, None] * b_scale, stored in C's
    dtype; b_scale is one value, or one per output column N (PER_N_SCALE: a segment-scaled
    fused weight). Both operands are K-contiguous, as Hopper's int8 tensor-core instructions want."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + (offs_n % N).to(tl.int64)[None, :] * K + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    if PER_N_SCALE:
        b_scale = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    else:
        b_scale = tl.load(b_scale_ptr)
    c = (acc.to(tl.float32) * a_scale[:, None]) * b_scale
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def int8_linear(x_q, x_scale, w_q, w_scale, out_dtype=torch.float32) -> torch.Tensor:
    """(x_q [M, K] int8 @ w_q [N, K]^T int8) * x_scale[:, None] * w_scale, as out_dtype;
    w_scale is 0-d or [N] (one per output column)."""
    x_q, w_q = x_q.contiguous(), w_q.contiguous()
    m, k = x_q.shape
    n = w_q.shape[0]
    per_n = w_scale.dim() > 0 and w_scale.numel() > 1
    if per_n and w_scale.numel() != n:
        raise ValueError(f"int8_linear: w_scale has {w_scale.numel()} values; allowed: 1 or N = {n}")
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _int8_matmul_kernel[grid](
        x_q, w_q, out, x_scale.to(torch.float32).contiguous(),
        w_scale.to(torch.float32).reshape(-1).contiguous(), m, n, k, PER_N_SCALE=per_n, **_NO_FMA,
    )
    return out
