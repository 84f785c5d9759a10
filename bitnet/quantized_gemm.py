"""The GEMM of a BitNet linear as one autograd function: the forward multiplies the quantised
operands (fake-quantised in the input's float dtype, or int8 x ternary on the int8 tensor
cores), the backward is straight-through: the gradients of the fake-quantised GEMM handed to the
float input and to the trainable weight unchanged.

What it keeps for the backward, instead of a float copy of the input:
- the int8 activations and their per-token scales (1 byte an element instead of 2 in bf16);
  `kernels.dequantize_activations` rebuilds the fake-quantised input of the forward bit for bit
  for the weight gradient. An input with full-precision segments keeps its float form (int8
  would lose those segments);
- the quantised weight it was handed: the layer's cached tensor, not a copy.

Sequence parallelism (`sequence_group`): the input holds this rank's tokens. The function
all-gathers what the forward GEMM reads (the dequantised input, or the int8 values and scales),
keeps only the local int8 input, gathers it again in the backward and reduce-scatters the input
gradient, as Megatron's linear function does with its bf16 input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bitnet import kernels
from bitnet.segments import SegmentLayout, single_segment


class QuantizedInput(NamedTuple):
    """The layer input as the GEMM sees it. q / scale: int8 values [..., K] and float32 scales
    [..., n_segments] (None when some segment stays full precision); fq: the dequantised input
    (None for the int8 GEMM, which reads q); layout: the segments of K."""

    q: torch.Tensor | None
    scale: torch.Tensor | None
    fq: torch.Tensor | None
    layout: SegmentLayout

    def segment(self, index: int) -> "QuantizedInput":
        """Segment `index` of K alone (a one-segment input)."""
        start, end = self.layout.ranges()[index]
        cut = lambda t: None if t is None else t.narrow(-1, start, end - start)
        scale = None if self.scale is None else self.scale[..., index : index + 1]
        return QuantizedInput(cut(self.q), scale, cut(self.fq), single_segment(end - start, 1))


class QuantizedWeight(NamedTuple):
    """The weight as the GEMM sees it: fq, the dequantised weight (the float GEMM); or q, the
    ternary int8, with scale: 0-d, or one per output row [N] (the int8 GEMM). grad_row_scale:
    constant multipliers [N] of the output rows already folded into fq / scale, which the weight
    gradient carries too (None: none)."""

    fq: torch.Tensor | None = None
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    grad_row_scale: torch.Tensor | None = None

    def rows(self, start: int, end: int) -> "QuantizedWeight":
        cut = lambda t: None if t is None else t.narrow(0, start, end - start)
        scale = self.scale if self.scale is None or self.scale.dim() == 0 else cut(self.scale)
        return QuantizedWeight(cut(self.fq), cut(self.q), scale, cut(self.grad_row_scale))

    def columns(self, start: int, end: int, scale: torch.Tensor | None = None) -> "QuantizedWeight":
        """Columns start:end; `scale` replaces the int8 scale (a row linear's segment has one)."""
        cut = lambda t: None if t is None else t.narrow(1, start, end - start)
        return QuantizedWeight(cut(self.fq), cut(self.q), self.scale if scale is None else scale, self.grad_row_scale)

    def with_row_scale(self, row_scale: torch.Tensor | None) -> "QuantizedWeight":
        """Output rows times constant multipliers `row_scale` [N]: (x @ W^T) * s as x @ (s W)^T."""
        if row_scale is None:
            return self
        s = row_scale.reshape(-1)
        fq = None if self.fq is None else self.fq * s.to(self.fq.dtype).unsqueeze(-1)
        scale = None if self.scale is None else self.scale * s.to(self.scale.dtype)
        return QuantizedWeight(fq, self.q, scale, s)


@dataclass(frozen=True)
class _GemmPlan:
    int8: bool
    input_layout: SegmentLayout
    kernel_backend: str
    x_dtype: torch.dtype
    w_dtype: torch.dtype
    sequence_group: object = None  # torch.distributed group: tokens sharded over it (dim 0)


def _gather_tokens(t: torch.Tensor | None, group) -> torch.Tensor | None:
    """t [s, ...] of every rank of `group`, concatenated along dim 0 (None: no gather)."""
    if t is None or group is None:
        return t
    out = t.new_empty((t.shape[0] * dist.get_world_size(group), *t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


def _reduce_scatter_tokens(t: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return t
    out = t.new_empty((t.shape[0] // dist.get_world_size(group), *t.shape[1:]))
    dist.reduce_scatter_tensor(out, t.contiguous(), group=group)
    return out


def _dequantize_ternary(w_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """reference.dequantize_weights in one pass and without float32 temporaries: -1, 0 and 1
    times a scale is exact in any float format, so rounding the scale to `dtype` first gives the
    same bits as rounding the float32 product."""
    scale = scale.unsqueeze(-1) if scale.dim() else scale  # one per output row, or one
    return w_q * scale.to(dtype)


class _QuantizedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, x_q, x_scale, x_fq, w_fq, w_q, w_scale, w_grad_row_scale, plan: _GemmPlan):
        group = plan.sequence_group
        if plan.int8:
            q, scale = _gather_tokens(x_q, group), _gather_tokens(x_scale, group)
            k = q.shape[-1]
            y = kernels.int8_linear(q.reshape(-1, k), scale.reshape(-1), w_q, w_scale, out_dtype=plan.x_dtype,
                                    kernel_backend=plan.kernel_backend)
            y = y.reshape(*q.shape[:-1], y.shape[-1])
        else:
            y = F.linear(_gather_tokens(x_fq, group), w_fq)
        ctx.plan = plan
        ctx.keeps_int8_input = x_q is not None
        ctx.keeps_float_weight = w_fq is not None
        ctx.has_row_scale = w_grad_row_scale is not None
        ctx.save_for_backward(*((x_q, x_scale) if x_q is not None else (x_fq,)),
                              *((w_fq,) if w_fq is not None else (w_q, w_scale)),
                              *((w_grad_row_scale,) if w_grad_row_scale is not None else ()))
        return y

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        saved = list(ctx.saved_tensors)
        x_saved = [saved.pop(0) for _ in range(2 if ctx.keeps_int8_input else 1)]
        row_scale = saved.pop() if ctx.has_row_scale else None
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            w_fq = saved[0] if ctx.keeps_float_weight else _dequantize_ternary(*saved, plan.x_dtype)
            grad_x = _reduce_scatter_tokens(grad.matmul(w_fq), plan.sequence_group)
        if ctx.needs_input_grad[1]:
            x_saved = [_gather_tokens(t, plan.sequence_group) for t in x_saved]
            if ctx.keeps_int8_input:
                x_fq = kernels.dequantize_activations(*x_saved, plan.x_dtype, plan.input_layout, plan.kernel_backend)
            else:
                x_fq = x_saved[0]
            grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(x_fq.reshape(-1, x_fq.shape[-1])).to(plan.w_dtype)
            if row_scale is not None:
                grad_w = grad_w * row_scale.to(grad_w.dtype).unsqueeze(-1)
        return grad_x, grad_w, None, None, None, None, None, None, None, None


def quantized_gemm(x: torch.Tensor, weight: torch.Tensor, x_quantized: QuantizedInput, w_quantized: QuantizedWeight,
                   int8: bool, kernel_backend: str, sequence_group=None) -> torch.Tensor:
    """y [..., N] = the quantised x [..., K] times the quantised weight [N, K]^T; gradients reach
    `x` (the float input the quantised one was made from) and `weight` (the trainable tensor,
    or the part of it the quantised weight stands for) straight through.

    int8: x_quantized needs q and scale with one segment, w_quantized q and scale; else
    x_quantized needs fq (and q, scale to keep int8 for the backward), w_quantized fq.
    sequence_group: x [s, ...] (and x_quantized) hold this rank's tokens of the group; y holds
    all of them."""
    plan = _GemmPlan(int8, x_quantized.layout, kernel_backend, x.dtype, weight.dtype, sequence_group)
    q, scale = x_quantized.q, x_quantized.scale
    if int8 and (q is None or len(x_quantized.layout) != 1):
        raise ValueError(f"quantized_gemm: the int8 GEMM needs int8 activations of one segment; got layout "
                         f"{x_quantized.layout}, int8 {'given' if q is not None else 'missing'}")
    fq = None if int8 else x_quantized.fq
    return _QuantizedGemm.apply(x, weight, q, scale, fq, w_quantized.fq if not int8 else None,
                                w_quantized.q if int8 else None, w_quantized.scale if int8 else None,
                                w_quantized.grad_row_scale, plan)
