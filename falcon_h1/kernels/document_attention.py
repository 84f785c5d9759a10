"""Causal attention within the documents of packed rows (kernels.documents.Documents).

Four implementations of one function, so the GPU one can be chosen by measurement
(benchmarks/packed_attention_bench.py):
- "unfused": the score matrix with the document mask, as Megatron's local attention does;
  the readable reference, any device.
- "sdpa": torch SDPA with the boolean document mask (the cheapest correct one on CPU; on
  GPU a masked kernel that still does the full s x s work).
- "flex": FlexAttention with the document BlockMask (skips blocks across documents;
  compiled on CUDA; forward only on CPU, where torch has no FlexAttention backward).
- "varlen": torch's varlen flash attention over cu_seqlens (CUDA, fp16/bf16 only): the
  documents become separate sequences of one flattened batch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from falcon_h1.kernels.documents import Documents

BACKENDS = ("sdpa", "unfused", "flex", "varlen")
AUTO = "auto"  # the measured fastest where it runs (benchmarks/NOTES.md): varlen in fp16/bf16 on CUDA, else sdpa


def packed_attention_backend(option: str, q: torch.Tensor) -> str:
    """The backend `option` (one of BACKENDS or AUTO) names for attention inputs like `q`."""
    if option != AUTO:
        return option
    return "varlen" if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) else "sdpa"


def document_causal_attention(q, k, v, scale: float, backend: str, documents: Documents):
    """q [b, hq, l, d], k/v [b, hkv, l, d] (GQA) -> [b, hq, l, d]; token t attends the tokens
    u <= t of its own document only."""
    if documents.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"documents: seq_idx has shape {documents.shape} but the attention input is "
                         f"[batch={q.shape[0]}, seq={q.shape[2]}]; build Documents from this batch's position_ids.")
    rep = q.shape[1] // k.shape[1]
    if backend == "unfused":
        return _unfused(q, k, v, scale, documents.attention_mask, rep)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=documents.attention_mask, scale=scale,
                                              enable_gqa=rep > 1)
    if backend == "flex":
        # Training rows, not decode steps: below 128 queries inductor would otherwise pick its
        # flex-decoding kernel, which has no valid configuration for small heads.
        return _flex_attention(q.device.type)(q, k, v, block_mask=documents.block_mask, scale=scale,
                                              enable_gqa=rep > 1,
                                              kernel_options={"FORCE_USE_FLEX_ATTENTION": True})
    if backend == "varlen":
        return _varlen(q, k, v, scale, documents, rep)
    raise ValueError(f"attention backend = {backend!r} for packed rows: expected one of {BACKENDS}.")


def _unfused(q, k, v, scale, allowed, rep):
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


@functools.cache
def _flex_attention(device_type: str):
    """FlexAttention, compiled on CUDA (its eager form is a slow reference there)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def _varlen(q, k, v, scale, documents, rep):
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend = 'varlen' needs CUDA fp16/bf16 inputs; got {q.dtype} on "
                         f"{q.device}. Use 'sdpa' or 'unfused' (any device and dtype).")
    from torch.nn.attention.varlen import varlen_attn

    b, hq, l, d = q.shape
    flat = lambda t: t.transpose(1, 2).reshape(b * l, t.shape[1], d)  # [b*l, heads, d], rows row-major
    cu, longest = documents.cu_seqlens, documents.max_seqlen
    gqa = {}
    if rep > 1 and _varlen_takes_gqa():
        gqa = {"enable_gqa": True}
    elif rep > 1:  # torch 2.11's varlen_attn has no GQA: K/V repeated to every query head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = varlen_attn(flat(q), flat(k), flat(v), cu, cu, longest, longest, scale=scale, window_size=(-1, 0), **gqa)
    return out.reshape(b, l, hq, d).transpose(1, 2)


@functools.cache
def _varlen_takes_gqa() -> bool:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters
