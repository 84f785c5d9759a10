"""BitNet b1.58 ternary training for Megatron Core.

Quantisers (`quantize_weights`, `quantize_activations`) run on the Triton kernels for CUDA
tensors and on the pure-PyTorch reference (`bitnet.reference`) elsewhere, or as their
`kernel_backend` argument says (see `bitnet.kernels`).
"""

from bitnet.kernels import (
    fake_quantize_activations,
    fake_quantize_weights,
    int8_linear,
    quantize_activations,
    quantize_weights,
    ste_fused,
    ste_reference,
)
from bitnet.reference import dequantize_activations, dequantize_weights

__all__ = [
    "quantize_weights",
    "quantize_activations",
    "fake_quantize_weights",
    "fake_quantize_activations",
    "dequantize_weights",
    "dequantize_activations",
    "int8_linear",
    "ste_reference",
    "ste_fused",
]
