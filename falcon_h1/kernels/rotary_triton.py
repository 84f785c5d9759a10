"""RoPE on the attention columns of the in-projection in Triton: q and k rotated in one pass
each (or both in one launch, every head of a row block in one program: `one_launch`), and one
gradient for the whole [q | k | v] block in the backward.

The unfused formula (Megatron's `apply_rotary_pos_emb`, and `kernels.rotary_reference`) takes q
and k one at a time as split views of the projection and runs cos, sin, two multiplies, a negation, a
concatenation for the rotated half, an add and a concatenation with the (empty) unrotated
tail: ten activation-sized passes forward, as many backward, and the split of [q | k | v]
then concatenates dq, dk and dv. Here the forward reads q and k once from the projection
(any row strides) and writes them rotated; cos and sin are computed in fp32 in the kernel
from the frequencies. The backward rotates dq and dk back and copies dv into one [s, b, q+2kv]
gradient, which can be the attention columns of the whole in-projection's gradient
(kernels.mamba_branch.InProjectionGradient): then the split of the fused in-projection copies
nothing either.

The rotation, per head of width d with halves t1 = t[:d/2], t2 = t[d/2:] and the angles f
(f1, f2 their halves; the model's are equal), scaled by mscale (yarn / longrope's attention
factor):  out1 = t1 cos f1 - t2 sin f1,  out2 = t2 cos f2 + t1 sin f2  (fp32, rounded once).

Reference: `rotary_reference` in falcon_h1.kernels (Megatron's formula, which rounds cos and
sin to the input dtype first); the tests compare both with a float64 rotation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_h1.kernels.rms_norm_triton import strides_sb

BLOCK_ROWS = 32


@triton.jit
def _angle_factors(freqs_ptr, s_idx, b_idx, stride_f_s, stride_f_b, row_mask, mscale, HEAD_DIM: tl.constexpr,
                   HALF_P2: tl.constexpr, INVERSE: tl.constexpr):
    """(c1, c2, a, b) [rows, half] of the rows' angles: out1 = t1 c1 + t2 a, out2 = t2 c2 + t1 b."""
    half = HEAD_DIM // 2
    j = tl.arange(0, HALF_P2)
    mask = row_mask[:, None] & (j < half)[None, :]
    f = freqs_ptr + (s_idx * stride_f_s + b_idx * stride_f_b)[:, None] + j[None, :]
    f1 = tl.load(f, mask=mask, other=0.0).to(tl.float32)
    f2 = tl.load(f + half, mask=mask, other=0.0).to(tl.float32)
    c1, c2 = tl.cos(f1) * mscale, tl.cos(f2) * mscale
    if INVERSE:   # the transpose of [[c1, -s1], [s2, c2]]
        a, b = tl.sin(f2) * mscale, -tl.sin(f1) * mscale
    else:
        a, b = -tl.sin(f1) * mscale, tl.sin(f2) * mscale
    return c1, c2, a, b


@triton.jit
def _rotate_kernel(src_ptr, dst_ptr, freqs_ptr, rows, batch, mscale,
                   stride_src_s, stride_src_b, stride_dst_s, stride_dst_b, stride_f_s, stride_f_b,
                   HEAD_DIM: tl.constexpr, HALF_P2: tl.constexpr, INVERSE: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr):
    """One head (program_id(1)) of BLOCK_ROWS tokens (flattened s * b): dst = rotation of src,
    or with INVERSE its transpose (the backward). Heads are HEAD_DIM apart in both rows."""
    pid_r, head = tl.program_id(0), tl.program_id(1)
    half = HEAD_DIM // 2
    r = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    j = tl.arange(0, HALF_P2)
    mask = (r < rows)[:, None] & (j < half)[None, :]
    s_idx, b_idx = (r // batch).to(tl.int64), (r % batch).to(tl.int64)
    src = src_ptr + (s_idx * stride_src_s + b_idx * stride_src_b)[:, None] + head * HEAD_DIM + j[None, :]
    dst = dst_ptr + (s_idx * stride_dst_s + b_idx * stride_dst_b)[:, None] + head * HEAD_DIM + j[None, :]
    c1, c2, a, b = _angle_factors(freqs_ptr, s_idx, b_idx, stride_f_s, stride_f_b, r < rows, mscale, HEAD_DIM,
                                  HALF_P2, INVERSE)
    t1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    t2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (t1 * c1 + t2 * a).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (t2 * c2 + t1 * b).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, s_idx, b_idx, stride_src_s, stride_src_b, stride_dst_s, stride_dst_b,
                  c1, c2, a, b, row_mask, HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HALF_P2: tl.constexpr):
    """Every head of BLOCK_ROWS rows as one [rows, heads, half] tile, with the angles' factors
    c1, c2, a, b [rows, half] shared by the heads."""
    half = HEAD_DIM // 2
    h = tl.arange(0, HEADS_P2)[None, :, None]
    j = tl.arange(0, HALF_P2)[None, None, :]
    mask = row_mask[:, None, None] & (h < HEADS) & (j < half)
    col = h * HEAD_DIM + j
    src = src_ptr + (s_idx * stride_src_s + b_idx * stride_src_b)[:, None, None] + col
    dst = dst_ptr + (s_idx * stride_dst_s + b_idx * stride_dst_b)[:, None, None] + col
    t1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    t2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (t1 * c1[:, None, :] + t2 * a[:, None, :]).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (t2 * c2[:, None, :] + t1 * b[:, None, :]).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_rows_kernel(q_src, q_dst, k_src, k_dst, v_src, v_dst, freqs_ptr, rows, batch, mscale,
                        sqs_s, sqs_b, sqd_s, sqd_b, sks_s, sks_b, skd_s, skd_b, svs_s, svs_b, svd_s, svd_b,
                        stride_f_s, stride_f_b,
                        Q_HEADS: tl.constexpr, Q_HEADS_P2: tl.constexpr, KV_HEADS: tl.constexpr,
                        KV_HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_P2: tl.constexpr,
                        KV_WIDTH_P2: tl.constexpr, INVERSE: tl.constexpr, COPY_V: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr):
    """BLOCK_ROWS tokens (flattened s * b), all of q's and k's heads: the angles' cos and sin once
    for every head, q and k rotated (or with INVERSE rotated back, the backward), and with COPY_V
    v's rows copied beside them (the backward's dv)."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = r < rows
    s_idx, b_idx = (r // batch).to(tl.int64), (r % batch).to(tl.int64)
    c1, c2, a, b = _angle_factors(freqs_ptr, s_idx, b_idx, stride_f_s, stride_f_b, row_mask, mscale, HEAD_DIM,
                                  HALF_P2, INVERSE)
    _rotate_heads(q_src, q_dst, s_idx, b_idx, sqs_s, sqs_b, sqd_s, sqd_b, c1, c2, a, b, row_mask,
                  Q_HEADS, Q_HEADS_P2, HEAD_DIM, HALF_P2)
    _rotate_heads(k_src, k_dst, s_idx, b_idx, sks_s, sks_b, skd_s, skd_b, c1, c2, a, b, row_mask,
                  KV_HEADS, KV_HEADS_P2, HEAD_DIM, HALF_P2)
    if COPY_V:
        c = tl.arange(0, KV_WIDTH_P2)[None, :]
        mask = row_mask[:, None] & (c < KV_HEADS * HEAD_DIM)
        v = tl.load(v_src + (s_idx * svs_s + b_idx * svs_b)[:, None] + c, mask=mask, other=0.0)
        tl.store(v_dst + (s_idx * svd_s + b_idx * svd_b)[:, None] + c, v.to(v_dst.dtype.element_ty), mask=mask)


def _freq_strides(freqs: torch.Tensor, batch: int) -> tuple[int, int]:
    """freqs [s, 1 or b, 1, d]: its (sequence, batch) strides, the batch one 0 when shared."""
    return freqs.stride(0), (freqs.stride(1) if freqs.shape[1] > 1 else 0)


def _rotate(src: torch.Tensor, dst: torch.Tensor, freqs: torch.Tensor, head_dim: int, mscale: float,
            inverse: bool):
    """src, dst [s, b, heads * head_dim] (last dim contiguous, any s / b strides)."""
    s, b, width = src.shape
    rows = s * b
    grid = (triton.cdiv(rows, BLOCK_ROWS), width // head_dim)
    _rotate_kernel[grid](src, dst, freqs, rows, b, float(mscale), *strides_sb(src), *strides_sb(dst),
                         *_freq_strides(freqs, b), HEAD_DIM=head_dim,
                         HALF_P2=triton.next_power_of_2(head_dim // 2), INVERSE=inverse, BLOCK_ROWS=BLOCK_ROWS,
                         num_warps=4)


ROWS_TILE = 2048  # elements of q's [rows, heads, half] tile a program of the one-launch kernel rotates


def _rotate_rows(q_src, q_dst, k_src, k_dst, freqs, head_dim: int, mscale: float, inverse: bool, v=None):
    """q and k (and v -> v's destination, a pair, with inverse) [s, b, heads * head_dim], last dim
    contiguous, any s / b strides: one launch for all of them."""
    s, b, q_width = q_src.shape
    rows, half_p2 = s * b, triton.next_power_of_2(head_dim // 2)
    q_heads, kv_heads = q_width // head_dim, k_src.shape[-1] // head_dim
    q_heads_p2 = triton.next_power_of_2(q_heads)
    block_rows = max(1, min(64, ROWS_TILE // (q_heads_p2 * half_p2)))
    v_src, v_dst = v if v is not None else (k_src, k_dst)   # unread without COPY_V
    grid = (triton.cdiv(rows, block_rows),)
    _rotate_rows_kernel[grid](
        q_src, q_dst, k_src, k_dst, v_src, v_dst, freqs, rows, b, float(mscale),
        *(stride for t in (q_src, q_dst, k_src, k_dst, v_src, v_dst) for stride in strides_sb(t)),
        *_freq_strides(freqs, b),
        Q_HEADS=q_heads, Q_HEADS_P2=q_heads_p2, KV_HEADS=kv_heads, KV_HEADS_P2=triton.next_power_of_2(kv_heads),
        HEAD_DIM=head_dim, HALF_P2=half_p2, KV_WIDTH_P2=triton.next_power_of_2(kv_heads * head_dim),
        INVERSE=inverse, COPY_V=v is not None, BLOCK_ROWS=block_rows, num_warps=4)


class RotaryQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, freqs, q_width, kv_width, head_dim, mscale, gradient, one_launch):
        s, b = qkv.shape[:2]
        q_rot = torch.empty(s, b, q_width, dtype=qkv.dtype, device=qkv.device)
        k_rot = torch.empty(s, b, kv_width, dtype=qkv.dtype, device=qkv.device)
        q, k = qkv[..., :q_width], qkv[..., q_width:q_width + kv_width]
        if one_launch:
            _rotate_rows(q, q_rot, k, k_rot, freqs, head_dim, mscale, inverse=False)
        else:
            _rotate(q, q_rot, freqs, head_dim, mscale, inverse=False)
            _rotate(k, k_rot, freqs, head_dim, mscale, inverse=False)
        ctx.save_for_backward(freqs)
        ctx.shape, ctx.dtype, ctx.widths = qkv.shape, qkv.dtype, (q_width, kv_width)
        ctx.head_dim, ctx.mscale, ctx.gradient, ctx.one_launch = head_dim, mscale, gradient, one_launch
        v = qkv[..., q_width + kv_width:]
        return q_rot, k_rot, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (freqs,) = ctx.saved_tensors
        q_width, kv_width = ctx.widths
        if ctx.gradient is not None:
            d_qkv = ctx.gradient.attention_columns()
        else:
            d_qkv = torch.empty(ctx.shape, dtype=ctx.dtype, device=dq.device)
        dq, dk = _last_dim_contiguous(dq), _last_dim_contiguous(dk)
        d_q, d_k, d_v = d_qkv[..., :q_width], d_qkv[..., q_width:q_width + kv_width], d_qkv[..., q_width + kv_width:]
        if ctx.one_launch:
            _rotate_rows(dq, d_q, dk, d_k, freqs, ctx.head_dim, ctx.mscale, inverse=True,
                         v=(_last_dim_contiguous(dv), d_v))
        else:
            _rotate(dq, d_q, freqs, ctx.head_dim, ctx.mscale, inverse=True)
            _rotate(dk, d_k, freqs, ctx.head_dim, ctx.mscale, inverse=True)
            d_v.copy_(dv)
        return d_qkv, None, None, None, None, None, None, None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_qkv_triton(qkv: torch.Tensor, freqs: torch.Tensor, q_width: int, kv_width: int, head_dim: int,
                      mscale: float = 1.0, gradient=None, one_launch: bool = False):
    """qkv [s, b, q_width + 2 kv_width] (last dim contiguous), freqs [s, 1 or b, 1, head_dim] ->
    (q, k rotated, v) as [s, b, q_width], [s, b, kv_width], [s, b, kv_width] (v: a view of qkv).
    gradient: an InProjectionGradient whose attention columns take qkv's gradient. one_launch:
    q and k (and the backward's dv) in one kernel whose programs take every head of their rows,
    the angles' cos and sin computed once for all of them; off: a program per head and row
    block, a launch each for q and k, and dv copied by torch."""
    if qkv.stride(-1) != 1:
        raise ValueError("rotary_qkv_triton: qkv's last dimension must be contiguous")
    return RotaryQKV.apply(qkv, freqs, q_width, kv_width, head_dim, mscale, gradient, one_launch)
