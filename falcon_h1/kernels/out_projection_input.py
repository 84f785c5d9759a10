"""The fused out-projection's input [s, b, d_ssm + d_attn]: the branches' outputs side by side, each
read where it lies and written once into its columns by one Triton copy.

The branches leave their outputs in other layouts than the [s, b, .] rows the out-projection reads:
the Mamba branch's y is the scan's [b, s, .] memory seen as [s, b, .], attention's output is
[b, s, heads, head_dim] memory seen as [s, b, heads, head_dim]. torch.cat of such views runs its
generic batched copy, which addresses every element by division and modulo (128.6 us a layer at
the 0.5B shape on an H100, 4.6 ms a step: benchmarks/results/2026-12-07/train_05b_kernels_rank0.txt),
and attention's reshape to [s, b, q] copies once before it. Here a program copies a tile of rows:
each row of a part is a few contiguous runs (one, or one a head), so the loads coalesce, and the
addressing is per row and per column, not per element.

The gradient of each part is its columns of the output's gradient (a view), as torch.cat's is.
Reference: `out_projection_input_reference` (torch.cat of the parts flattened past [s, b]).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

BLOCK_R, BLOCK_C = 16, 256  # rows x columns a program copies (4096 elements, 4 warps)


@triton.jit
def _copy_columns_kernel(src_ptr, dst_ptr, rows, batch, width, head_dim, s_s, s_b, s_h, dst_row_stride, dst_offset,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows r = s * batch + b of src [s, b, heads, head_dim] (last dim contiguous) into columns
    dst_offset.. of the contiguous dst rows."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < width)[None, :]
    row_start = (r // batch) * s_s + (r % batch) * s_b
    column = (c // head_dim).to(tl.int64) * s_h + c % head_dim
    values = tl.load(src_ptr + row_start[:, None] + column[None, :], mask=mask)
    tl.store(dst_ptr + (r * dst_row_stride + dst_offset)[:, None] + c[None, :], values, mask=mask)


def _as_heads(part: torch.Tensor) -> torch.Tensor:
    """[s, b, w] as [s, b, 1, w]; [s, b, h, d] as it is; the last dim made contiguous."""
    part = part if part.stride(-1) == 1 else part.contiguous()
    return part.unsqueeze(2) if part.dim() == 3 else part


def _copy_columns(part: torch.Tensor, out: torch.Tensor, offset: int) -> None:
    src = _as_heads(part)
    s, b, heads, head_dim = src.shape
    rows, width = s * b, heads * head_dim
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(width, BLOCK_C))
    _copy_columns_kernel[grid](src, out, rows, b, width, head_dim, src.stride(0), src.stride(1), src.stride(2),
                               out.stride(1), offset, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4)


class _OutProjectionInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *parts):
        s, b = parts[0].shape[:2]
        widths = [math.prod(p.shape[2:]) for p in parts]
        out = torch.empty(s, b, sum(widths), dtype=parts[0].dtype, device=parts[0].device)
        offset = 0
        for part, width in zip(parts, widths):
            _copy_columns(part, out, offset)
            offset += width
        ctx.shapes, ctx.widths = [p.shape for p in parts], widths
        return out

    @staticmethod
    def backward(ctx, grad):
        grads, offset = [], 0
        for shape, width in zip(ctx.shapes, ctx.widths):
            grads.append(grad[..., offset:offset + width].reshape(shape))
            offset += width
        return tuple(grads)


def out_projection_input_reference(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat of the parts [s, b, ...] flattened past [s, b]: a contiguous [s, b, sum of widths]."""
    return torch.cat([p.flatten(2) for p in parts], dim=-1) if len(parts) > 1 else parts[0].flatten(2).contiguous()


def out_projection_input(parts: Sequence[torch.Tensor], triton_copy: bool) -> torch.Tensor:
    """The parts [s, b, ...] (any strides; one dtype) side by side as one contiguous [s, b, sum of
    widths]. triton_copy (KernelOptions.triton_out_projection_input): one Triton copy a part;
    else the reference."""
    if not triton_copy:
        return out_projection_input_reference(parts)  # torch.cat refuses mismatched parts itself
    if len({p.shape[:2] for p in parts}) != 1 or len({p.dtype for p in parts}) != 1:
        raise ValueError("out_projection_input: the parts must share [s, b] and dtype; got "
                         f"{[(tuple(p.shape), p.dtype) for p in parts]}")
    return _OutProjectionInput.apply(*parts)
