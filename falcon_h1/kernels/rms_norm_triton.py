"""RMSNorm in Triton, optionally with the residual add before it in the same pass.

The layer's `h = h + mixer(...)` followed by the MLP's norm of h is one kernel here: it reads h
and the mixer's output once, writes the sum (the residual stream) and its norm. The backward
adds the residual stream's gradient to the norm's input gradient in the same pass, so neither
the forward's add nor the backward's gradient accumulation is a pass of its own. torch's fused
kernel runs the norm's backward as two kernels (the input gradient, then the weight gradient as
a second pass over x and dy); here each program reduces its rows' weight gradient as it goes and
one small sum over programs finishes it.

The sum is rounded to the input dtype before it is normalised, so the norm sees the residual
stream exactly as the unfused `h + delta` leaves it. Arithmetic is fp32 (rounded once on output),
as torch's fused RMSNorm.

Reference: `rms_norm_reference` in falcon_h1.kernels (tests compare both with float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16  # backward: rows each program reduces the weight gradient over
TILE = 4096  # backward: elements of a [rows, hidden] tile a program loads at once


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, rstd_ptr, hidden, eps,
                         stride_x, stride_delta, stride_sum, stride_out,
                         HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, rstd_ptr, dout_ptr, dsum_ptr, dx_ptr, dw_ptr, rows, hidden,
                         stride_x, stride_dout, stride_dsum, stride_dx,
                         HAS_DSUM: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    """dx = rstd (g - x^ mean(g x^)) with g = dout * w and x^ = x rstd, plus the residual stream's
    gradient dsum; this program's rows' share of dw (the sum over rows of dout * x^) into its row
    of dw_ptr. BLOCK_R rows at a time, so several rows' loads are in flight together."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_R):
        r = pid * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_R)
        row_mask = r < rows
        r = r.to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + r[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + r[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        g = dout * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / hidden)[:, None])
        if HAS_DSUM:
            dx += tl.load(dsum_ptr + r[:, None] * stride_dsum + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + r[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dout * xhat, axis=0)
    tl.store(dw_ptr + pid * hidden + cols, dw, mask=col_mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] (a copy only where the leading dims cannot be flattened)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _forward(x, delta, weight, eps):
    shape, hidden = x.shape, x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    out = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if delta is not None:
        delta2, total = _rows(delta), torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    else:
        delta2, total = x2, x2  # unused
    _rms_norm_fwd_kernel[(rows,)](x2, delta2, weight, total, out, rstd, hidden, eps, x2.stride(0), delta2.stride(0),
                                  total.stride(0), out.stride(0), HAS_DELTA=delta is not None,
                                  BLOCK_H=triton.next_power_of_2(hidden), num_warps=_warps(hidden))
    return total, out, rstd, shape


def _backward(normed_input, weight, rstd, dout, dsum):
    """normed_input [rows, hidden]: what the norm normalised (the sum, with a residual)."""
    rows, hidden = normed_input.shape
    dout2 = _rows(dout)
    dsum2 = _rows(dsum) if dsum is not None else dout2
    dx = torch.empty(rows, hidden, dtype=normed_input.dtype, device=normed_input.device)
    programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
    dw = torch.empty(programs, hidden, dtype=torch.float32, device=normed_input.device)
    block_h = triton.next_power_of_2(hidden)
    _rms_norm_bwd_kernel[(programs,)](normed_input, weight, rstd, dout2, dsum2, dx, dw, rows, hidden,
                                      normed_input.stride(0), dout2.stride(0), dsum2.stride(0), dx.stride(0),
                                      HAS_DSUM=dsum is not None, ROWS_PER_PROGRAM=ROWS_PER_PROGRAM,
                                      BLOCK_R=max(1, min(ROWS_PER_PROGRAM, TILE // block_h)), BLOCK_H=block_h,
                                      num_warps=_warps(hidden))
    return dx, dw.sum(0).to(weight.dtype)


def _warps(hidden: int) -> int:
    return 4 if hidden <= 2048 else 8 if hidden <= 8192 else 16


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2, out, rstd, shape = _forward(x, None, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(x2, weight, rstd, dout, None)
        return dx.view(dout.shape), dw, None


class _ResidualRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, eps):
        total, out, rstd, shape = _forward(x, delta, weight, eps)
        ctx.save_for_backward(total, weight, rstd)
        return total.view(shape), out.view(shape)

    @staticmethod
    def backward(ctx, dtotal, dout):
        total, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(total, weight, rstd, dout, dtotal)
        dx = dx.view(dout.shape)
        return dx, dx, dw, None   # x + delta: both take the same gradient


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., hidden] over the last dim, times weight [hidden]."""
    return _RMSNorm.apply(x, weight, eps)


def residual_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, RMSNorm(x + delta) * weight), the sum rounded to x's dtype before the norm."""
    if delta.shape != x.shape:
        raise ValueError(f"residual_rms_norm: x {tuple(x.shape)} and delta {tuple(delta.shape)} must have one shape")
    return _ResidualRMSNorm.apply(x, delta, weight, eps)
