"""What the model code needs around Megatron Core 0.19.2's fused-op switches and activation recomputation.

- `MEGATRON_FUSIONS_OFF`: Megatron's fused-op switches default to kernels from CUDA extensions
  (Apex, Transformer Engine) that neither the CPU machines nor the GPU image have; the
  TransformerConfig then fails to build or the fused path fails at the first call.
- `recompute`: Megatron's `tensor_parallel.checkpoint` reads and restores CUDA RNG state, which a
  host without CUDA does not have.
"""

from __future__ import annotations

import torch

MEGATRON_FUSIONS_OFF = dict(bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
                            gradient_accumulation_fusion=False)


def recompute(function, *args):
    """Activation recomputation: Megatron's tensor-parallel checkpoint (which also restores the
    CUDA RNG tracker states) on GPU; torch's non-reentrant checkpoint on CPU, where Megatron's
    reads CUDA RNG state. The model has no dropout, so both recompute the same values."""
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        return tensor_parallel.checkpoint(function, False, *args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False)
