"""Kernels of the Falcon-H1 layer: one entry point per op, each running its GPU kernel or the
pure-PyTorch reference beside it. Which one is decided once per model, when it is built
(`KernelOptions.for_device`: the device, model.kernel_backend and the options), and handed to
each entry point as `fast` (never by scattered `if cuda` checks)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from falcon_h1.kernels.conv_reference import causal_conv1d_silu_reference
from falcon_h1.kernels.document_attention import AUTO as PACKED_ATTENTION_AUTO
from falcon_h1.kernels.document_attention import BACKENDS as PACKED_ATTENTION_BACKENDS
from falcon_h1.kernels.documents import check_seq_idx
from falcon_h1.kernels.ssd_reference import ssd_chunk_scan_reference


@dataclass(frozen=True)
class KernelOptions:
    """Which optimisations a model's kernels use (all on by default), fixed when the model is
    built (`falcon_h1.model.build_model(..., kernel_options=...)`) and held by its modules.
    falcon-bench builds one model per setting to measure each; training keeps the defaults but for
    the SSD scan's kernels and the conv output's keeping, which model.ssd_kernels and
    model.mamba_keep_conv_output choose (`with_model_choices`).

    The GPU-kernel switches only apply where the GPU path runs (CUDA and model.kernel_backend
    'auto' or 'triton'): `for_device` turns them off elsewhere. fold_scales and gate_in_scan
    choose where the model's arithmetic happens, on every device."""

    triton_ssd: bool = True     # mamba_ssm's Triton SSD scan; off: the chunked PyTorch reference
    triton_conv: bool = True    # Triton conv + SiLU on [b, l, c]; off: torch conv1d (reference)
    triton_swiglu: bool = True  # one-pass SwiGLU; off: eager silu(gate) * up
    fold_scales: bool = True    # µP multipliers ride on weights / conv output (no activation pass)
    gate_in_scan: bool = True   # y * silu(z) inside the SSD kernel; off: a separate eager gating
    # conv + scan as one autograd function writing its gradients in place (kernels.mamba_branch)
    fused_mamba_branch: bool = True
    # with a fused in-projection, that function writes its columns of the projection's whole gradient
    # and the attention columns are copied in beside them (kernels.mamba_branch.split_in_projection);
    # off: the two branches' gradients are concatenated
    shared_in_projection_gradient: bool = True
    # RoPE on q and k in one Triton pass each from the in-projection, its backward writing one
    # [q | k | v] gradient (kernels.rotary_triton); off: the reference formula, op by op
    triton_rotary: bool = True
    # that RoPE as one kernel a direction whose programs take every q and k head of their rows (the
    # angles' cos and sin once for all heads, the backward's dv copied in the same launch); off: a
    # program per head and a launch each for q and k
    rotary_one_launch: bool = True
    fused_rms_norm: bool = True  # torch's fused RMSNorm kernel on CUDA; off: the fp32 eager formula
    # RMSNorm in Triton, the residual add before the MLP's norm in the same pass forward and backward
    # (kernels.rms_norm_triton); off: fused_rms_norm's choice after a separate add
    triton_rms_norm: bool = True
    # the µP scales folded into weight rows (W * s forward, the weight's gradient times s backward) as
    # one vectorised Triton pass each (kernels.row_scale); off (until timed): torch's broadcasting multiply
    triton_row_scale: bool = False
    # each layer's MLP output added to the residual stream by the next layer's first norm (or the
    # final norm) in that norm's pass, forward and backward (FalconH1Layer.forward); off: a separate
    # add after the MLP, and autograd's add of the two gradients the stream then gets
    residual_across_layers: bool = True
    # the scan's backward starts from the forward's chunk states (kernels.ssd_backward); off: recomputed
    ssd_keep_forward_states: bool = True
    # the fused branch keeps its conv output for the backward ([b, s, conv channels] a layer) instead
    # of recomputing it there (one conv pass a layer)
    mamba_keep_conv_output: bool = False
    # the fused Mamba branch's scan on this project's Triton kernels instead of mamba_ssm's: the forward
    # (kernels.ssd_fwd), the backward from the kept states (kernels.ssd_bwd: needs ssd_keep_forward_states)
    own_ssd_forward: bool = False
    own_ssd_backward: bool = False
    # the Triton conv walking the rows, forward and backward: each x (and dy) row read once, the
    # backward in one pass (kernels.conv_triton's streaming kernels); off: row tiles reading shifted
    # windows, the backward in two passes through an fp32 buffer
    streaming_conv: bool = True
    # the fused out-projection's input written by one Triton copy a branch, each output read where it
    # lies (kernels.out_projection_input); off: attention's output reshaped, then torch.cat
    triton_out_projection_input: bool = True
    fused_cross_entropy: bool = True  # Triton loss + gradient in one forward; off: Megatron's fp32 copy
    # causal attention within the documents of packed rows on the GPU path (one of
    # kernels.document_attention.BACKENDS, or "auto": varlen flash attention for fp16/bf16, SDPA
    # with the document mask for fp32 (benchmarks/packed_throughput_bench.py measures them; flex
    # compiles for minutes on a fresh machine). Off the GPU path packed rows take SDPA.
    packed_attention: str = PACKED_ATTENTION_AUTO

    def __post_init__(self):
        if self.own_ssd_backward and not self.ssd_keep_forward_states:
            raise ValueError("KernelOptions.own_ssd_backward = True starts the SSD backward from the forward's "
                             "chunk states, so it needs ssd_keep_forward_states = True; got False. Turn "
                             "own_ssd_backward off, or keep the states.")
        allowed = (PACKED_ATTENTION_AUTO, *PACKED_ATTENTION_BACKENDS)
        if self.packed_attention not in allowed:
            raise ValueError(f"KernelOptions.packed_attention = {self.packed_attention!r} is not allowed: one of "
                             f"{allowed} (causal attention within the documents of packed rows).")

    def with_model_choices(self, ssd_kernels: str, keep_conv_output: bool) -> "KernelOptions":
        """These options under the model config's kernel choices: model.ssd_kernels
        (falcon_h1.config.SSD_KERNELS: 'own' asks for this project's scan forward and backward,
        'mamba_ssm' keeps what was asked here) and model.mamba_keep_conv_output (true turns it on)."""
        own = ssd_kernels == "own"
        return replace(self, own_ssd_forward=self.own_ssd_forward or own, own_ssd_backward=self.own_ssd_backward or own,
                       mamba_keep_conv_output=self.mamba_keep_conv_output or keep_conv_output)

    def for_device(self, backend: str, device: torch.device) -> "KernelOptions":
        """These options as a model on `device` with model.kernel_backend = `backend` runs them:
        the GPU kernels off on the reference path (the choice is made here, once per model).
        torch's fused RMSNorm is not a Triton kernel: it follows the device alone."""
        gpu = use_fast_path(backend, device)
        return replace(
            self,
            triton_ssd=self.triton_ssd and gpu,
            triton_conv=self.triton_conv and gpu,
            streaming_conv=self.streaming_conv and self.triton_conv and gpu,
            triton_swiglu=self.triton_swiglu and gpu,
            triton_rotary=self.triton_rotary and gpu,
            rotary_one_launch=self.rotary_one_launch and self.triton_rotary and gpu,
            triton_out_projection_input=self.triton_out_projection_input and gpu,
            # the branch is built from mamba_ssm's scan and the Triton conv
            fused_mamba_branch=self.fused_mamba_branch and self.triton_conv and self.triton_ssd and gpu,
            own_ssd_forward=self.own_ssd_forward and self.fused_mamba_branch and self.triton_conv
            and self.triton_ssd and gpu,
            own_ssd_backward=self.own_ssd_backward and self.fused_mamba_branch and self.triton_conv
            and self.triton_ssd and gpu,
            fused_rms_norm=self.fused_rms_norm and device.type == "cuda",
            triton_rms_norm=self.triton_rms_norm and gpu,
            triton_row_scale=self.triton_row_scale and gpu,
            fused_cross_entropy=self.fused_cross_entropy and gpu,
            packed_attention=self.packed_attention if gpu else "sdpa",
        )


def use_fast_path(backend: str, device: torch.device) -> bool:
    """Whether the GPU kernels run on `device`; backend: auto | reference | triton
    (FalconH1Config.kernel_backend). 'triton' where they cannot run is an error."""
    if backend == "reference" or device.type != "cuda":
        if backend == "triton" and device.type != "cuda":
            raise RuntimeError(
                "model.kernel_backend = 'triton' needs a CUDA device; the model is built on "
                f"{device}. Use 'auto' or 'reference' on CPU."
            )
        return False
    from falcon_h1.kernels.ssd_triton import triton_available

    if triton_available():
        return True
    if backend == "triton":
        raise RuntimeError(
            "model.kernel_backend = 'triton' but mamba_ssm's Triton kernels are not importable; "
            "install them with `./setup.sh` or use kernel_backend=reference."
        )
    return False


def scan_step_sizes(dt_raw, dt_bias, dt_limit):
    """The SSD scan's step sizes: softplus(dt_raw + dt_bias) clamped to dt_limit, as mamba_ssm's
    kernels compute them, in fp32 (float64 for float64 inputs)."""
    compute = torch.promote_types(dt_raw.dtype, torch.float32)
    dt = F.softplus(dt_raw.to(compute) + dt_bias.to(compute))
    lo, hi = dt_limit
    if lo > 0.0 or hi != math.inf:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def ssd_scan(x, dt_raw, A, B, C, chunk_size, D, dt_bias, dt_limit, fast: bool, z=None, seq_idx=None,
             initial_states=None):
    """Mamba-2 SSD over a sequence. dt_raw is before bias/softplus/clamp. Returns [b,l,h,p].

    With z [b,l,h,p] the output is gated, y * silu(z) (inside the scan kernel on the fast path).
    With seq_idx [b,l] int32 (kernels.documents) the state restarts at each packed document.
    With initial_states [b,h,p,n] the scan starts from that state instead of zero (a
    context-parallel chunk continuing the one before it; falcon_h1.context_parallel).
    fast: mamba_ssm's Triton scan (KernelOptions.triton_ssd), else the chunked reference.
    """
    check_seq_idx(seq_idx, x.shape[:2])
    if seq_idx is not None and initial_states is not None:
        raise ValueError("ssd_scan: seq_idx (packed documents) and initial_states (a continued sequence) "
                         "cannot be combined; pass one of them")
    if fast:
        from falcon_h1.kernels.ssd_triton import ssd_chunk_scan_triton

        return ssd_chunk_scan_triton(x, dt_raw, A, B, C, chunk_size, D, dt_bias, dt_limit, z=z, seq_idx=seq_idx,
                                     initial_states=initial_states)
    dt = scan_step_sizes(dt_raw, dt_bias, dt_limit)
    y = ssd_chunk_scan_reference(x, dt, A, B, C, chunk_size, D, seq_idx=seq_idx,
                                 initial_states=initial_states).to(x.dtype)
    return y if z is None else y * F.silu(z)


def causal_conv1d_silu(x, weight, bias, fast: bool, out_scale=None, seq_idx=None, streaming=False):
    """x [b, l, c] -> silu(causal depthwise conv) [b, l, c], times out_scale [c] (a constant) if given.

    fast (KernelOptions.triton_conv): the Triton kernel, for width-4 convolutions. It reads x in
    place (channel stride 1, any batch/sequence strides) and returns a contiguous [b, l, c]; the
    reference goes through torch's [b, c, l] conv1d.
    With seq_idx [b, l] int32 (kernels.documents) no tap reads another packed document.
    streaming (KernelOptions.streaming_conv): the Triton kernels walk the rows in one pass.
    """
    check_seq_idx(seq_idx, x.shape[:2])
    if fast and weight.shape[-1] == 4:
        from falcon_h1.kernels.conv_triton import causal_conv1d_silu_triton

        return causal_conv1d_silu_triton(x, weight, bias, out_scale, seq_idx=seq_idx,
                                         streaming=streaming)
    out = causal_conv1d_silu_reference(x, weight, bias, seq_idx=seq_idx)
    return out if out_scale is None else out * out_scale.to(out.dtype)


def swiglu_reference(h):
    """h [..., 2f] = [gate | up] -> silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(h, fast: bool):
    """SwiGLU activation of the gate/up GEMM output [..., 2f] -> [..., f]; fast: the one-pass
    Triton kernel (KernelOptions.triton_swiglu)."""
    if fast:
        from falcon_h1.kernels.swiglu_triton import swiglu_triton

        return swiglu_triton(h)
    return swiglu_reference(h)


def rotary_reference(t, freqs, mscale: float = 1.0):
    """RoPE on t [s, b, heads, d] with the angles freqs [s, 1 or b, 1, d] (halves rotated as
    pairs: t1 cos - t2 sin, t2 cos + t1 sin), cos and sin scaled by mscale and rounded to t's dtype
    first, as Megatron's and Hugging Face's unfused formulas do."""
    cos, sin = (torch.cos(freqs) * mscale).to(t.dtype), (torch.sin(freqs) * mscale).to(t.dtype)
    t1, t2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-t2, t1), dim=-1) * sin


def rotary_qkv(qkv, freqs, q_width: int, kv_width: int, head_dim: int, mscale: float, fast: bool,
               gradient=None, one_launch: bool = False):
    """The attention columns qkv [s, b, q_width + 2 kv_width] -> q [s, b, q_heads, d] and k, v
    [s, b, kv_heads, d], q and k rotated by the angles freqs [s, 1 or b, 1, d] (rotary_reference).
    fast (KernelOptions.triton_rotary): kernels.rotary_triton, whose backward writes qkv's
    gradient as one tensor, into `gradient` (an InProjectionGradient) when given; one_launch
    (KernelOptions.rotary_one_launch): its one-kernel form."""
    if fast:
        from falcon_h1.kernels.rotary_triton import rotary_qkv_triton

        q, k, v = rotary_qkv_triton(qkv, freqs, q_width, kv_width, head_dim, mscale, gradient, one_launch)
    else:
        q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))
    if fast:
        return q, k, v
    return rotary_reference(q, freqs, mscale), rotary_reference(k, freqs, mscale), v


def rms_norm_reference(x, weight, eps: float):
    """RMSNorm computed in fp32 (weight applied in the input dtype), as Hugging Face's FalconH1."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm(x, weight, eps: float, fast: bool, triton: bool = False):
    """RMSNorm over the last dim. triton (KernelOptions.triton_rms_norm): kernels.rms_norm_triton;
    fast (KernelOptions.fused_rms_norm): torch's fused kernel (fp32 inside, one pass forward, two
    backward); else the reference formula."""
    if triton:
        from falcon_h1.kernels.rms_norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    if fast:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_reference(x, weight, eps)


def gated_rms_norm_reference(y, z, weight, groups: int, eps: float, norm_before_gate: bool = False,
                             out_scale: float = 1.0):
    """Group-wise RMSNorm of y [..., d] gated by silu(z) (before the norm, or after it with
    norm_before_gate), as Hugging Face's FalconH1RMSNormGated, in fp32; z None: y is already gated.
    out_scale: a constant on the output (the folded ssm_out_multiplier)."""
    dtype = y.dtype
    if z is not None and not norm_before_gate:
        y = y * F.silu(z.float())
    h = y.float().unflatten(-1, (groups, -1))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = (weight.unflatten(-1, (groups, -1)) * h).flatten(-2)
    if z is not None and norm_before_gate:
        h = h * F.silu(z.float())
    if out_scale != 1.0:
        h = h * out_scale
    return h.to(dtype)


def group_rms_norm(x, weight, groups: int, eps: float, out_scale: float, triton: bool):
    """RMSNorm of each of `groups` column groups of x [..., d] (the Mamba branch's norm of its
    already gated output), times weight and out_scale. triton (KernelOptions.triton_rms_norm):
    kernels.rms_norm_triton, which reads an [s, b, d] x in any layout and writes a contiguous one."""
    if triton:
        from falcon_h1.kernels.rms_norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps, groups, out_scale)
    return gated_rms_norm_reference(x, None, weight, groups, eps, out_scale=out_scale)


def residual_rms_norm(x, delta, weight, eps: float, fast: bool, triton: bool = False):
    """(x + delta, rms_norm(x + delta)): a residual add and the norm after it, in one Triton pass
    forward and backward with `triton` (kernels.rms_norm_triton)."""
    if triton:
        from falcon_h1.kernels.rms_norm_triton import residual_rms_norm_triton

        return residual_rms_norm_triton(x, delta, weight, eps)
    total = x + delta
    return total, rms_norm(total, weight, eps, fast)


def mask_vocab_padding(logits, vocab_size: int):
    """Vocab-parallel logits [..., V/tp] with the padding columns (global id >= vocab_size) at
    the dtype's minimum, so softmax gives them nothing; unchanged when there is no padding."""
    from megatron.core import parallel_state

    local = logits.shape[-1]
    if local * parallel_state.get_tensor_model_parallel_world_size() == vocab_size:
        return logits
    start = parallel_state.get_tensor_model_parallel_rank() * local
    ids = torch.arange(start, start + local, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, torch.finfo(logits.dtype).min)


def vocab_parallel_cross_entropy(logits, labels, vocab_size: int, fast: bool):
    """Per-token loss [s, b] (fp32) of vocab-parallel logits [s, b, V/tp] (Megatron's layout,
    padding columns >= vocab_size unmasked) against labels [s, b].

    The fast path (kernels.cross_entropy, KernelOptions.fused_cross_entropy) overwrites the logits
    with their gradient: the caller must not use them afterwards. The reference is Megatron's, on
    a masked fp32 copy.
    """
    from megatron.core import parallel_state, tensor_parallel

    if fast:
        from falcon_h1.kernels.cross_entropy import fused_vocab_parallel_cross_entropy

        return fused_vocab_parallel_cross_entropy(logits, labels, vocab_size,
                                                  parallel_state.get_tensor_model_parallel_group())
    return tensor_parallel.vocab_parallel_cross_entropy(mask_vocab_padding(logits, vocab_size).float(), labels)


def rows_aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when its address and every stride but the last are whole 16-byte units,
    else a contiguous copy. v reaches attention as a view of the fused in-projection, whose row
    width need not be a multiple of 8 bf16 values (the micro preset's is 292, or a preset's heads
    split over TP ranks); on the GPU torch's cuDNN kernel (its default pick there) then returns
    wrong values without an error, flash fails with a misaligned address and the memory-efficient
    kernel refuses them (benchmarks/NOTES.md, session 8)."""
    unit = 16 // t.element_size()
    strides = (stride for stride, size in zip(t.stride()[:-1], t.shape[:-1]) if size > 1)
    if t.data_ptr() % 16 == 0 and all(stride % unit == 0 for stride in strides):
        return t
    return t.contiguous()


def causal_attention(q, k, v, scale: float, backend: str, documents=None):
    """q [b, hq, lq, d], k/v [b, hkv, lk, d] (GQA), lq <= lk -> [b, hq, lq, d].

    The queries are the last lq positions of the keys' span: query i sees keys
    j <= lk - lq + i (with lq < lk: a context-parallel chunk attending to every key up to it).
    backend "unfused" materialises the score matrix (as Megatron's local
    DotProductAttention does); otherwise torch SDPA (flash / cuDNN on GPU).
    documents (kernels.documents.Documents of packed rows): causal within each document
    only, by kernels.document_attention (which also offers backends "flex" and "varlen").
    """
    lq, lk = q.shape[2], k.shape[2]
    q, k, v = (rows_aligned(t) for t in (q, k, v))
    if lq > lk:
        raise ValueError(f"causal_attention: {lq} queries but {lk} keys; the queries must be the last "
                         "positions of the keys' span")
    if documents is not None:
        from falcon_h1.kernels.document_attention import document_causal_attention

        if lq != lk:
            raise ValueError("causal_attention: packed documents need as many keys as queries")
        return document_causal_attention(q, k, v, scale, backend, documents)
    rep = q.shape[1] // k.shape[1]
    if backend == "unfused":
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(lk - lq + 1)
        probs = torch.softmax(scores.float().masked_fill(mask, float("-inf")), dim=-1).to(q.dtype)
        return torch.matmul(probs, v)
    if lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=rep > 1)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(lq, lk), scale=scale,
                                          enable_gqa=rep > 1)
