"""Context parallelism (`parallel.cp`): every sequence split over cp ranks, computed exactly.

Layout (layout.py): the sequence is cut into 2 * cp chunks and rank r holds chunks r and
2cp-1-r (Megatron's load-balanced convention), for tokens, labels, loss mask and positions
alike (`shard_batch`). RoPE uses the tokens' global positions. Everything per token
(embedding, norms, projections, MLP, loss) needs nothing more; the loss is the mean over all
tokens of all shards because the training loop sums per-token losses and token counts over
the data x context-parallel group, and Megatron's DDP all-reduces gradients over that group.

The two mixers exchange what crosses chunk boundaries (per layer, per rank, forward; the
backward sends the same amount back as a reduce-scatter; b batch, L the whole sequence,
tp the tensor-parallel size):

- attention (attention.py): K and V all-gathered, then exact causal attention of the local
  queries against them: 2 * b * L * kv_heads/tp * head_dim elements received. Falcon-H1 has
  2-4 KV heads, so this is small next to the activations (7B at L = 256K: 134M elements,
  268 MB in bf16).
- Mamba-2 (mamba.py): (a) the conv halo, the last d_conv - 1 conv inputs of every chunk:
  2cp * b * (d_conv - 1) * conv_channels/tp elements (7B, cp = 8: 172K); (b) each chunk's
  zero-start end state and log decay: 2cp * b * heads/tp * (head_dim * d_state + 1) fp32
  (7B, cp = 8: 12.6M, 50 MB); every rank folds them in sequence order into the state its
  chunks start from and runs one scan per chunk from it. The chunk scans from their entering
  states are the whole sequence's scan, so outputs and gradients are exact.

`ContextParallelLayout.emulated(cp)` runs all ranks in one process with the same code
(all-gather = identity): the single-process tests and the GPU fast-vs-reference check use it.
"""

from __future__ import annotations

from falcon_h1.config import check_context_parallel as check_model
from falcon_h1.context_parallel.attention import context_parallel_attention
from falcon_h1.context_parallel.layout import ContextParallelLayout, rank_chunks



def shard_batch(batch: dict, layout: ContextParallelLayout) -> dict:
    """This rank's shard of a training batch: every entry is a [b, s] tensor (tokens, labels,
    loss mask, positions), cut along the sequence."""
    shapes = {key: tuple(value.shape) for key, value in batch.items()}
    if len({shape for shape in shapes.values()}) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"a context-parallel batch must hold [batch, seq] tensors only; got shapes {shapes}")
    return {key: layout.shard(value, dim=1) for key, value in batch.items()}


__all__ = ["ContextParallelLayout", "check_model", "context_parallel_attention", "rank_chunks", "shard_batch"]
