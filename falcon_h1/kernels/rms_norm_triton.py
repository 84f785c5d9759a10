"""RMSNorm in Triton: the residual add before it in the same pass, and the Mamba branch's
group-wise norm.

The layer's `h = h + mixer(...)` followed by the MLP's norm of h is one kernel here: it reads h
and the mixer's output once, writes the sum (the residual stream) and its norm. The backward
adds the residual stream's gradient to the norm's input gradient in the same pass, so neither
the forward's add nor the backward's gradient accumulation is a pass of its own. torch's fused
kernel runs the norm's backward as two kernels (the input gradient, then the weight gradient as
a second pass over x and dy); here each program reduces its rows' weight gradient as it goes and
one small sum over programs finishes it.

The Mamba branch's RMSNorm (mamba_rms_norm, after the scan's gate) normalises each of `groups`
column groups on its own, and its output carries a constant `out_scale` (the folded
ssm_out_multiplier). Its input is the scan's [b, s, .] output seen as [s, b, .]; the output is
written in the [s, b, .] layout the out-projection reads, and the input gradient in the input's
layout the scan's backward reads, so neither direction has a transposing copy. Every tensor is
addressed as [s, b, hidden] with its own sequence and batch strides (last dim contiguous).

The sum is rounded to its dtype (torch's for x + delta) before it is normalised, so the norm sees
the residual stream exactly as the unfused `h + delta` leaves it. Arithmetic is fp32 (rounded once
on output), as torch's fused RMSNorm.

Reference: `rms_norm_reference` and `gated_rms_norm_reference` in falcon_h1.kernels (tests
compare both with float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16  # backward: rows each program reduces the weight gradient over
FWD_MAX_ROWS = 16  # forward: at most this many rows a program
TILE = 4096  # elements of a [rows, columns] tile a program loads at once


@triton.jit
def _offsets(r, batch, stride_s, stride_b):
    """Row offsets of flattened [s, b] rows r (int64) in a tensor with these strides."""
    return (r // batch) * stride_s + (r % batch) * stride_b


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, rstd_ptr, rows, batch, width, eps, out_scale,
                         sx_s, sx_b, sd_s, sd_b, ss_s, ss_b, so_s, so_b,
                         HAS_DELTA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """BLOCK_R rows of one column group (program_id(1), `width` columns wide)."""
    group = tl.program_id(1)
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = group * width + tl.arange(0, BLOCK_H)
    row_mask = r < rows
    mask = row_mask[:, None] & (tl.arange(0, BLOCK_H) < width)[None, :]
    x = tl.load(x_ptr + _offsets(r, batch, sx_s, sx_b)[:, None] + cols[None, :], mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + _offsets(r, batch, sd_s, sd_b)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + _offsets(r, batch, ss_s, ss_b)[:, None] + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / width + eps)
    w = tl.load(w_ptr + cols, mask=tl.arange(0, BLOCK_H) < width, other=0.0).to(tl.float32)
    out = x * rstd[:, None] * (w * out_scale)[None, :]
    tl.store(out_ptr + _offsets(r, batch, so_s, so_b)[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)
    tl.store(rstd_ptr + r * tl.num_programs(1) + group, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, rstd_ptr, dout_ptr, dsum_ptr, dx_ptr, dw_ptr, rows, batch, width, hidden,
                         out_scale, sx_s, sx_b, sdo_s, sdo_b, sds_s, sds_b, sdx_s, sdx_b,
                         HAS_DSUM: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    """dx = rstd (g - x^ mean(g x^)) with g = dout * w * out_scale and x^ = x rstd, plus the residual
    stream's gradient dsum; this program's rows' share of dw (the sum over rows of dout * x^ *
    out_scale) into its row of dw_ptr. BLOCK_R rows at a time, so several rows' loads are in flight."""
    pid, group = tl.program_id(0), tl.program_id(1)
    cols = group * width + tl.arange(0, BLOCK_H)
    col_mask = tl.arange(0, BLOCK_H) < width
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * out_scale
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_R):
        r = (pid * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_mask = r < rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + _offsets(r, batch, sx_s, sx_b)[:, None] + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + _offsets(r, batch, sdo_s, sdo_b)[:, None] + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r * tl.num_programs(1) + group, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        g = dout * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / width)[:, None])
        if HAS_DSUM:
            dx += tl.load(dsum_ptr + _offsets(r, batch, sds_s, sds_b)[:, None] + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(dx_ptr + _offsets(r, batch, sdx_s, sdx_b)[:, None] + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
        dw += tl.sum(dout * xhat, axis=0)
    tl.store(dw_ptr + pid * hidden + cols, dw * out_scale, mask=col_mask)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """[s, b, h] as it is; [n, h] as [n, 1, h]; more leading dims flattened (a copy only if needed);
    the last dim made contiguous."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    if t.dim() == 3:
        return t
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t.reshape(-1, 1, t.shape[-1])


def strides_sb(t: torch.Tensor) -> tuple[int, int]:
    """The (sequence, batch) strides of an [s, b, ...] tensor, for kernels that address rows by both."""
    return t.stride(0), t.stride(1)


def _block_rows(block_h: int, limit: int) -> int:
    return max(1, min(limit, TILE // block_h))


def _warps(block_h: int) -> int:
    return 4 if block_h <= 2048 else 8 if block_h <= 8192 else 16


def _forward(x, delta, weight, eps, groups, out_scale):
    """x (and delta) [s, b, h] -> (x + delta or x, the norm [s, b, h] contiguous, rstd [s * b, groups])."""
    s, b, hidden = x.shape
    rows, width = s * b, hidden // groups
    has_delta = delta is not None
    # the sum in torch's type for x + delta; the norm in its input's type
    dtype = torch.promote_types(x.dtype, delta.dtype) if has_delta else x.dtype
    out = torch.empty(s, b, hidden, dtype=dtype, device=x.device)
    rstd = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    total = torch.empty(s, b, hidden, dtype=dtype, device=x.device) if has_delta else x
    delta = delta if has_delta else x   # unread without HAS_DELTA
    block_h = triton.next_power_of_2(width)
    block_r = _block_rows(block_h, FWD_MAX_ROWS)
    _rms_norm_fwd_kernel[(triton.cdiv(rows, block_r), groups)](
        x, delta, weight, total, out, rstd, rows, b, width, eps, float(out_scale), *strides_sb(x), *strides_sb(delta),
        *strides_sb(total), *strides_sb(out), HAS_DELTA=has_delta, BLOCK_R=block_r, BLOCK_H=block_h,
        num_warps=_warps(block_h))
    return total, out, rstd


def _backward(normed_input, weight, rstd, dout, dsum, groups, out_scale):
    """normed_input [s, b, h]: what the norm normalised (the sum, with a residual). dx comes out in
    normed_input's memory layout."""
    s, b, hidden = normed_input.shape
    rows, width = s * b, hidden // groups
    has_dsum = dsum is not None
    dout = _as_3d(dout)
    dsum = _as_3d(dsum) if has_dsum else dout   # unread without HAS_DSUM
    dx = torch.empty_like(normed_input)
    programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
    dw = torch.empty(programs, hidden, dtype=torch.float32, device=normed_input.device)
    block_h = triton.next_power_of_2(width)
    _rms_norm_bwd_kernel[(programs, groups)](
        normed_input, weight, rstd, dout, dsum, dx, dw, rows, b, width, hidden, float(out_scale),
        *strides_sb(normed_input), *strides_sb(dout), *strides_sb(dsum), *strides_sb(dx), HAS_DSUM=has_dsum,
        ROWS_PER_PROGRAM=ROWS_PER_PROGRAM,
        BLOCK_R=_block_rows(block_h, ROWS_PER_PROGRAM), BLOCK_H=block_h, num_warps=_warps(block_h))
    return dx, dw.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, groups, out_scale):
        shape, x3 = x.shape, _as_3d(x)
        _, out, rstd = _forward(x3, None, weight, eps, groups, out_scale)
        ctx.save_for_backward(x3, weight, rstd)
        ctx.groups, ctx.out_scale, ctx.input_shape = groups, out_scale, shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout):
        x3, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(x3, weight, rstd, dout, None, ctx.groups, ctx.out_scale)
        return dx.view(ctx.input_shape), dw, None, None, None


class _ResidualRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, eps):
        shape = x.shape
        total, out, rstd = _forward(_as_3d(x), _as_3d(delta), weight, eps, 1, 1.0)
        ctx.save_for_backward(total, weight, rstd)
        return total.view(shape), out.view(shape)

    @staticmethod
    def backward(ctx, dtotal, dout):
        total, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(total, weight, rstd, dout, dtotal, 1, 1.0)
        dx = dx.view(dout.shape)
        return dx, dx, dw, None   # x + delta: both take the same gradient


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1,
                    out_scale: float = 1.0) -> torch.Tensor:
    """RMSNorm of x [..., hidden] over each of `groups` equal column groups of the last dim, times
    weight [hidden] and out_scale. A 3-d x [s, b, hidden] may have any sequence and batch strides
    (the output is contiguous, the input gradient in x's layout)."""
    if x.shape[-1] % groups:
        raise ValueError(f"rms_norm_triton: width {x.shape[-1]} is not a multiple of groups = {groups}")
    return _RMSNorm.apply(x, weight, eps, groups, out_scale)


def residual_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, RMSNorm(x + delta) * weight), the sum rounded to its dtype (torch's for x + delta)
    before the norm."""
    if delta.shape != x.shape:
        raise ValueError(f"residual_rms_norm: x {tuple(x.shape)} and delta {tuple(delta.shape)} must have one shape")
    return _ResidualRMSNorm.apply(x, delta, weight, eps)
