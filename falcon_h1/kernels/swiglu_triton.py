"""SwiGLU activation silu(gate) * up in Triton: one pass forward, one pass backward.

Input is the gate/up GEMM output h = [gate | up] on the last dimension (any row
stride, last dimension contiguous); the backward writes d(h) as one tensor in that
same layout, so autograd needs no concatenation of the two halves.
PyTorch's eager version runs a kernel per operation (silu, mul, and each one's
backward) over the [tokens, ffn] activation.

Reference: `swiglu_reference` in falcon_h1.kernels (the GPU tests compare the two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(h_ptr, out_ptr, ffn, stride_h, stride_out, BLOCK: tl.constexpr):
    row, pid = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < ffn
    gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + ffn + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(h_ptr, dout_ptr, dh_ptr, ffn, stride_h, stride_dout, stride_dh, BLOCK: tl.constexpr):
    row, pid = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < ffn
    gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + ffn + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dout * silu
    tl.store(dh_ptr + row * stride_dh + cols, dgate.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + row * stride_dh + ffn + cols, dup.to(dh_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] view (copy only if the leading dims cannot be flattened)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ffn = h.shape[-1] // 2
        h2 = _rows(h)
        out = torch.empty(h2.shape[0], ffn, device=h.device, dtype=h.dtype)
        grid = (h2.shape[0], triton.cdiv(ffn, BLOCK))
        _swiglu_fwd_kernel[grid](h2, out, ffn, h2.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(h2)
        ctx.shape = h.shape
        return out.view(*h.shape[:-1], ffn)

    @staticmethod
    def backward(ctx, dout):
        (h2,) = ctx.saved_tensors
        ffn = h2.shape[-1] // 2
        dout2 = _rows(dout)
        dh = torch.empty_like(h2, memory_format=torch.contiguous_format)
        grid = (h2.shape[0], triton.cdiv(ffn, BLOCK))
        _swiglu_bwd_kernel[grid](h2, dout2, dh, ffn, h2.stride(0), dout2.stride(0), dh.stride(0),
                                 BLOCK=BLOCK, num_warps=4)
        return dh.view(ctx.shape)


def swiglu_triton(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2f] = [gate | up] -> silu(gate) * up [..., f]."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu input width {h.shape[-1]} must be even ([gate | up]).")
    return SwiGLU.apply(h)
