"""One entry point per BitNet operation, computed by the kernels of a backend.

`kernel_backend` (the same values as the model's `kernel_backend`; a BitNet layer takes it from
its `BitNetLinearOptions`, fixed when the layer is built):
- "auto": the Triton kernels for CUDA tensors of float32 / bfloat16 / float16, the pure-PyTorch
  reference (`bitnet.reference`) for everything else;
- "reference": the reference everywhere;
- "triton": the Triton kernels, an error for a tensor they cannot take.

Also the two straight-through estimators (`ste_reference`, the pattern of the references, and
`ste_fused`, a custom autograd function) and the int8 forward GEMM.

The signatures match `reference.py`; see its docstring for the numerics and the `layout`
(fused projections) arguments.
"""

from __future__ import annotations

from typing import Callable

import torch

from bitnet import reference

KERNEL_BACKENDS = ("auto", "reference", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def validate_kernel_backend(kernel_backend: str) -> str:
    if kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(
            f"BitNet kernel_backend={kernel_backend!r}; allowed: {list(KERNEL_BACKENDS)} (the model's "
            "kernel_backend values)"
        )
    return kernel_backend


def _uses_triton(kernel_backend: str, t: torch.Tensor, fits_triton: bool) -> bool:
    validate_kernel_backend(kernel_backend)
    if kernel_backend == "reference":
        return False
    if kernel_backend == "triton" and not fits_triton:
        raise ValueError(
            f"BitNet kernel_backend='triton' got a {t.dtype} tensor on {t.device}; allowed: CUDA "
            f"tensors of {[str(d) for d in _TRITON_DTYPES]} (int8 operands for the GEMM), or "
            "kernel_backend 'auto' / 'reference'"
        )
    return fits_triton


def _triton():
    from bitnet import triton_kernels  # imports triton: only when a Triton kernel is used

    return triton_kernels


def backend(t: torch.Tensor, kernel_backend: str = "auto"):
    """The module (`bitnet.reference` or `bitnet.triton_kernels`) that computes on `t`."""
    fits_triton = t.is_cuda and t.dtype in _TRITON_DTYPES
    return _triton() if _uses_triton(kernel_backend, t, fits_triton) else reference


def weight_stats(w: torch.Tensor, layout=None, kernel_backend: str = "auto") -> torch.Tensor:
    """float64 `[sum(|w|), numel]` ([n, 2], per segment, with a layout); all-reduce it (SUM)
    to quantise a shard with the global mean."""
    return backend(w, kernel_backend).weight_stats(w, layout)


def quantize_weights(w: torch.Tensor, stats: torch.Tensor | None = None, layout=None,
                     kernel_backend: str = "auto"):
    """-> (ternary int8 like w, float32 scale: 0-d, or [n] with a layout); dequantised =
    ternary * scale. Full-precision segments: ternary 0 and scale 0."""
    return backend(w, kernel_backend).quantize_weights(w, stats, layout)


def fake_quantize_weights(w: torch.Tensor, stats: torch.Tensor | None = None, layout=None,
                          kernel_backend: str = "auto", row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantised weight in w's dtype, its rows times `row_scale` ([rows], rounded to w's
    dtype first) where given: (q(W) * m) * s, one pass."""
    return backend(w, kernel_backend).fake_quantize_weights(w, stats, layout, row_scale)


def activation_absmax(x: torch.Tensor, layout=None, kernel_backend: str = "auto") -> torch.Tensor:
    """Per-row max|x| (float32; [..., n], per segment, with a layout); all-reduce it (MAX) when
    the row is sharded."""
    return backend(x, kernel_backend).activation_absmax(x, layout)


def quantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None, layout=None,
                         kernel_backend: str = "auto"):
    """-> (int8 like x, float32 scale shaped x.shape[:-1], or [..., n] with a layout)."""
    return backend(x, kernel_backend).quantize_activations(x, absmax, layout)


def fake_quantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None, layout=None,
                              kernel_backend: str = "auto") -> torch.Tensor:
    return backend(x, kernel_backend).fake_quantize_activations(x, absmax, layout)


def quantize_and_dequantize_activations(x: torch.Tensor, absmax: torch.Tensor | None = None, layout=None,
                                        kernel_backend: str = "auto"):
    """-> (int8, float32 scales, dequantised in x's dtype) from one pass over x: the GEMM reads
    the dequantised tensor, the backward keeps the int8 one (`dequantize_activations` rebuilds
    the other bit for bit where every segment is quantised)."""
    return backend(x, kernel_backend).quantize_and_dequantize_activations(x, absmax, layout)


def dequantize_activations(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, layout=None,
                           kernel_backend: str = "auto") -> torch.Tensor:
    """int8 * its row's (and segment's) scale, in `dtype`: the inverse of the quantisers above."""
    fits_triton = q.is_cuda and dtype in _TRITON_DTYPES
    module = _triton() if _uses_triton(kernel_backend, q, fits_triton) else reference
    return module.dequantize_activations(q, scale, dtype, layout)


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
    kernel_backend: str = "auto",
) -> torch.Tensor:
    """`(x_q @ w_q^T) * x_scale[:, None] * w_scale` for x_q [M, K] int8, w_q [N, K] int8, as
    out_dtype (rescaled in float32 first); w_scale is 0-d or [N] (one per output feature).

    On CUDA a Triton GEMM on the int8 tensor cores with the rescale fused into its epilogue
    (exact in int32: |sum| <= 128 * K); the float64 reference (also exact) for the reference
    backend or CPU tensors."""
    if _uses_triton(kernel_backend, x_q, x_q.is_cuda):
        return _triton().int8_linear(x_q, x_scale, w_q, w_scale, out_dtype)
    return reference.int8_linear(x_q, x_scale, w_q, w_scale).to(out_dtype)
