"""Rows times per-row scales in Triton, one vectorised pass: dst[r, :] = src[r, :] * scale[r]
(fp32 product, rounded once to dst's dtype: torch's bf16 multiply gives the same bits).

Two users: the fused cross entropy's backward (the logits' gradient times each token's loss
gradient, in place) and the µP multipliers folded into a weight's rows (`row_scaled_weight`: W * s
forward, the gradient times s backward). torch's broadcasting multiply with a [rows, 1] operand runs
its generic, unvectorised elementwise kernel, about twice a copy's time.

Reference: the broadcasting multiply itself (tests compare bit for bit in Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # columns a program covers


@triton.jit
def _scale_rows_kernel(src_ptr, scale_ptr, dst_ptr, n_cols, stride_src, stride_dst, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(src_ptr + row * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + row * stride_dst + cols, (x * tl.load(scale_ptr + row).to(tl.float32)).to(
        dst_ptr.dtype.element_ty), mask=mask)


def scale_rows(src: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """src [n, m] (last dim contiguous) times scale [n] into out (new, src's dtype and shape, when None;
    src itself scales in place)."""
    if src.dim() != 2 or src.stride(-1) != 1:
        raise ValueError(f"scale_rows: src must be 2-d with a contiguous last dim; got shape {tuple(src.shape)}, "
                         f"strides {src.stride()}")
    if scale.numel() != src.shape[0]:
        raise ValueError(f"scale_rows: {scale.numel()} scales for {src.shape[0]} rows")
    out = torch.empty_like(src, memory_format=torch.contiguous_format) if out is None else out
    _scale_rows_kernel[(src.shape[0], triton.cdiv(src.shape[1], BLOCK))](
        src, scale.contiguous(), out, src.shape[1], src.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4)
    return out


class _RowScaledWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scale):
        ctx.save_for_backward(scale)
        return scale_rows(weight, scale)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return scale_rows(grad if grad.stride(-1) == 1 else grad.contiguous(), scale), None


def row_scaled_weight(weight: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """weight [rows, cols] * row_scale [rows, 1] (constant: no gradient), forward and backward in
    one Triton pass each."""
    return _RowScaledWeight.apply(weight, row_scale.reshape(-1))
