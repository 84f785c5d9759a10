"""One entry point per BitNet operation, dispatched by device: Triton on CUDA, reference on CPU.

Also the two straight-through estimators (`ste_reference`, the pattern of the references, and
`ste_fused`, a custom autograd function) and the int8 forward GEMM.

The signatures match `reference.py`; see its docstring for the numerics.
"""

from __future__ import annotations

from typing import Callable

import torch

from bitnet import reference

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_force_reference = False
_triton_module = None


def use_reference_kernels(enabled: bool) -> None:
    """Run the pure-PyTorch reference even on CUDA (recipe field `train.force_reference_kernels`)."""
    global _force_reference
    _force_reference = bool(enabled)


def _triton():
    global _triton_module
    if _triton_module is None:
        from bitnet import triton_kernels

        _triton_module = triton_kernels
    return _triton_module


def _backend(t: torch.Tensor):
    if t.is_cuda and t.dtype in _TRITON_DTYPES and not _force_reference:
        return _triton()
    return reference


def weight_stats(w: torch.Tensor) -> torch.Tensor:
    """float64 `[sum(|w|), numel]`; all-reduce it (SUM) to quantise a shard with the global mean."""
    return _backend(w).weight_stats(w)


def quantize_weights(w: torch.Tensor, stats: torch.Tensor | None = None):
    """-> (ternary int8 like w, 0-d float32 scale); dequantised = ternary * scale."""
    return _backend(w).quantize_weights(w, stats)


def fake_quantize_weights(w: torch.Tensor, stats: torch.Tensor | None = None) -> torch.Tensor:
    return _backend(w).fake_quantize_weights(w, stats)


def activation_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-row max|x| (float32); all-reduce it (MAX) when the row is sharded."""
    return _backend(x).activation_absmax(x)


def quantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None):
    """-> (int8 like x, float32 scale shaped x.shape[:-1]); dequantised = int8 * scale."""
    return _backend(x).quantize_activations(x, absmax)


def fake_quantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None) -> torch.Tensor:
    return _backend(x).fake_quantize_activations(x, absmax)


# ------------------------------------------------ segmented (fused) linears, see bitnet.segments
def segment_weight_stats(w: torch.Tensor, layout) -> torch.Tensor:
    """float64 [n_segments, 2] of `[sum(|w|), numel]`; all-reduce it (SUM) over the TP group."""
    return _backend(w).segment_weight_stats(w, layout)


def quantize_weights_segmented(w: torch.Tensor, layout, stats: torch.Tensor | None = None):
    """-> (ternary int8 like w, float32 scales [n_segments]); 0 in full-precision segments."""
    return _backend(w).quantize_weights_segmented(w, layout, stats)


def fake_quantize_weights_segmented(w: torch.Tensor, layout, stats: torch.Tensor | None = None) -> torch.Tensor:
    return _backend(w).fake_quantize_weights_segmented(w, layout, stats)


def segment_activation_absmax(x: torch.Tensor, layout) -> torch.Tensor:
    """[..., n_segments] per-row max|x| of each segment; all-reduce it (MAX) when sharded."""
    return _backend(x).segment_activation_absmax(x, layout)


def quantize_activations_segmented(x: torch.Tensor, layout, absmax: torch.Tensor | None = None):
    """-> (int8 like x, float32 scales [..., n_segments])."""
    return _backend(x).quantize_activations_segmented(x, layout, absmax)


def fake_quantize_activations_segmented(x: torch.Tensor, layout, absmax: torch.Tensor | None = None) -> torch.Tensor:
    return _backend(x).fake_quantize_activations_segmented(x, layout, absmax)


# ---------------------------------------------------------------- straight-through estimators
def ste_reference(x: torch.Tensor, fake_quant: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """`x + (q(x) - x).detach()`: the references' pattern (two extra elementwise kernels and a
    temporary); kept to compare against and to benchmark."""
    return x + (fake_quant(x, *args) - x).detach()


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: the dequantised tensor. Backward: the gradient unchanged. Saves nothing."""

    @staticmethod
    def forward(ctx, x, fake_quant, *args):
        ctx.n_extra = len(args)
        return fake_quant(x, *args)

    @staticmethod
    def backward(ctx, grad):
        return (grad, None) + (None,) * ctx.n_extra


def ste_fused(x: torch.Tensor, fake_quant: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """`fake_quant(x, *args)` in the forward, identity in the backward: one quantise kernel and
    no saved tensors (the reference pattern adds a subtract, an add and a temporary)."""
    return _FakeQuantSTE.apply(x, fake_quant, *args)


# -------------------------------------------------------------------------- int8 forward GEMM
def int8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`(x_q @ w_q^T) * x_scale[:, None] * w_scale` for x_q [M, K] int8, w_q [N, K] int8, as
    out_dtype (rescaled in float32 first); w_scale is 0-d or [N] (one per output feature).

    On CUDA a Triton GEMM on the int8 tensor cores with the rescale fused into its epilogue
    (exact in int32: |sum| <= 128 * K); elsewhere the float64 reference (also exact)."""
    if x_q.is_cuda and not _force_reference:
        return _triton().int8_linear(x_q, x_scale, w_q, w_scale, out_dtype)
    return reference.int8_linear(x_q, x_scale, w_q, w_scale).to(out_dtype)
