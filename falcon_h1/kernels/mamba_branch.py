"""The Mamba-2 branch after the in-projection as one autograd function (GPU path):
zxbcdt -> causal conv + SiLU on xBC -> SSD scan gated by silu(z) -> y.

Why one function: as separate autograd ops, every split of the in-projection output
(z | xBC | dt, then x | B | C) becomes a concatenation in the backward, and the
gradient changes layout ([b, s] scan order vs Megatron's [s, b]) on the way. Here the
backward allocates the in-projection gradient once, in the [s, b] layout the GEMM wants,
and the scan and conv kernels write dz, ddt, dx/dB/dC and dxBC straight into their slices
(the same pattern as mamba_ssm's own split-conv-scan function). With a fused in-projection
(attention and Mamba columns in one GEMM), `split_in_projection` hands the branches their columns
and an InProjectionGradient: the backward here allocates the whole projection's gradient and
writes its columns of it, and the split's backward fills in the attention columns, so no
concatenation of the two branches' gradients runs. The conv output is
recomputed in the backward (one 0.1 ms pass) instead of being kept for it, unless
`keep_conv_output` (KernelOptions.mamba_keep_conv_output) trades its bytes for that pass. The scan's chunk
states are kept instead (`keep_forward_states`, KernelOptions.ssd_keep_forward_states;
kernels.ssd_backward), so its backward does not recompute them.

Uses mamba_ssm's Triton SSD forward/backward, or this project's own (kernels.ssd_fwd,
kernels.ssd_bwd; KernelOptions.own_ssd_forward / own_ssd_backward), and this package's Triton
conv; the reference path (kernels.ssd_scan + kernels.causal_conv1d_silu) computes the same function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from falcon_h1.kernels.conv_triton import conv_silu_backward, conv_silu_forward
from falcon_h1.kernels.documents import check_seq_idx
from falcon_h1.kernels.ssd_backward import ssd_backward_from_forward_states
from falcon_h1.kernels.ssd_bwd import ssd_backward_own
from falcon_h1.kernels.ssd_fwd import ssd_forward_own


def _ssd_functions():
    from falcon_h1.kernels.ssd_triton import make_mamba_ssm_importable

    make_mamba_ssm_importable()
    from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd, _mamba_chunk_scan_combined_fwd

    return _mamba_chunk_scan_combined_fwd, _mamba_chunk_scan_combined_bwd


class InProjectionGradient:
    """The gradient of a fused in-projection's output [s, b, width] as one buffer, allocated by
    whichever branch's backward runs first: the Mamba branch writes the columns from `offset` on,
    the attention branch's RoPE (kernels.rotary_triton) those before it, and
    split_in_projection's backward (which waits for both) copies in only a part neither wrote,
    and returns the buffer. One per forward call."""

    def __init__(self, projection: torch.Tensor, offset: int):
        self.shape, self.dtype, self.device, self.offset = projection.shape, projection.dtype, projection.device, offset
        self.buffer: torch.Tensor | None = None

    def _buffer(self) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.buffer

    def mamba_columns(self) -> torch.Tensor:
        """The buffer's columns from `offset` on, [s, b, width - offset]: the Mamba branch's gradient."""
        return self._buffer()[..., self.offset:]

    def attention_columns(self) -> torch.Tensor:
        """The buffer's columns before `offset`, [s, b, offset]: the attention branch's gradient."""
        return self._buffer()[..., :self.offset]

    def take_buffer(self) -> torch.Tensor | None:
        buffer, self.buffer = self.buffer, None
        return buffer


def _same_view(t: torch.Tensor, ref: torch.Tensor) -> bool:
    return t.data_ptr() == ref.data_ptr() and t.shape == ref.shape and t.stride() == ref.stride()


class _SplitInProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projection, gradient, offset):
        ctx.gradient = gradient
        return projection[..., :offset], projection[..., offset:]

    @staticmethod
    def backward(ctx, d_first, d_mamba):  # an unused output's gradient arrives as zeros (materialized)
        gradient = ctx.gradient
        if gradient.buffer is None:  # neither branch wrote into a shared buffer: concatenate
            return torch.cat([d_first, d_mamba], dim=-1), None, None
        # a part that came another way than through the buffer (not written there) is copied in
        for part, columns in ((d_first, gradient.attention_columns()), (d_mamba, gradient.mamba_columns())):
            if not _same_view(part, columns):
                columns.copy_(part)
        return gradient.take_buffer(), None, None


def split_in_projection(projection: torch.Tensor, offset: int):
    """projection [s, b, width] -> (its columns before `offset`, the Mamba branch's columns from
    `offset` on, the InProjectionGradient to hand mamba_conv_scan with the latter and the
    attention's rotary_qkv with the former): the same views as projection.split, whose backward
    would concatenate the two gradients."""
    gradient = InProjectionGradient(projection, offset)
    first, mamba = _SplitInProjection.apply(projection, gradient, offset)
    return first, mamba, gradient


class _OwnKernels(NamedTuple):
    forward: bool
    backward: bool


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.unflatten(-1, (n, -1))


class MambaConvScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zxbcdt, conv_weight, conv_bias, conv_scale, A, D, dt_bias, seq_idx, widths, heads, groups,
                chunk_size, dt_limit, keep_forward_states, keep_conv_output, own_kernels, in_projection_gradient,
                streaming_conv):
        d_z, d_bc, _ = widths
        z, xBC, dt = zxbcdt.split([d_z, d_z + 2 * d_bc, heads], dim=-1)
        conv_out = conv_silu_forward(xBC, conv_weight, conv_bias, conv_scale, seq_idx, streaming=streaming_conv)
        x, B, C = conv_out.split([d_z, d_bc, d_bc], dim=-1)
        scan_in = (_heads(x, heads), dt, A, _heads(B, groups), _heads(C, groups), chunk_size)
        if own_kernels.forward:
            out, out_x, dt_proc, dA_cumsum, states = ssd_forward_own(
                *scan_in, D=D, z=_heads(z, heads), dt_bias=dt_bias, dt_limit=dt_limit, seq_idx=seq_idx)
        else:
            out, out_x, dt_proc, dA_cumsum, states, _ = _ssd_functions()[0](
                *scan_in, D=D, z=_heads(z, heads), dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
                dt_limit=dt_limit)
        scan_state = (dt_proc, dA_cumsum, states) if keep_forward_states else ()
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, conv_scale, A, D, dt_bias, seq_idx, out_x,
                              conv_out if keep_conv_output else None, *scan_state)
        ctx.shape = (widths, heads, groups, chunk_size, dt_limit)
        ctx.own_backward = own_kernels.backward
        ctx.in_projection_gradient = in_projection_gradient
        ctx.streaming_conv = streaming_conv
        return out.flatten(-2)

    @staticmethod
    def backward(ctx, dy):
        (zxbcdt, conv_weight, conv_bias, conv_scale, A, D, dt_bias, seq_idx, out_x, conv_out,
         *scan_state) = ctx.saved_tensors
        (d_z, d_bc, _), heads, groups, chunk_size, dt_limit = ctx.shape
        _, scan_bwd = _ssd_functions()
        conv_channels = d_z + 2 * d_bc
        z, xBC, dt = zxbcdt.split([d_z, conv_channels, heads], dim=-1)
        if conv_out is None:
            conv_out = conv_silu_forward(xBC, conv_weight, conv_bias, conv_scale, seq_idx, streaming=ctx.streaming_conv)
        x, B, C = conv_out.split([d_z, d_bc, d_bc], dim=-1)
        batch, seq = zxbcdt.shape[:2]
        # gradient of zxbcdt allocated [s, b, .] (the in-projection's layout), handed out as [b, s, .];
        # with an InProjectionGradient, as its columns of the whole projection's gradient
        if ctx.in_projection_gradient is not None:
            dzxbcdt = ctx.in_projection_gradient.mamba_columns().transpose(0, 1)
        else:
            dzxbcdt = torch.empty(seq, batch, zxbcdt.shape[-1], device=dy.device, dtype=zxbcdt.dtype).transpose(0, 1)
        dz, dxBC_raw, ddt = dzxbcdt.split([d_z, conv_channels, heads], dim=-1)
        dxBC = torch.empty(batch, seq, conv_channels, device=dy.device, dtype=zxbcdt.dtype)
        dx, dB, dC = dxBC.split([d_z, d_bc, d_bc], dim=-1)
        if scan_state:
            from_states = ssd_backward_own if ctx.own_backward else ssd_backward_from_forward_states
            dA, dD, ddt_bias = from_states(
                _heads(dy, heads), _heads(x, heads), dt, A, _heads(B, groups), _heads(C, groups), out_x, *scan_state,
                chunk_size, D, _heads(z, heads), dt_bias, dt_limit, _heads(dx, heads), ddt, _heads(dB, groups),
                _heads(dC, groups), _heads(dz, heads), seq_idx=seq_idx)
        else:
            _, _, dA, _, _, dD, _, ddt_bias, _ = scan_bwd(
                _heads(dy, heads), _heads(x, heads), dt, A, _heads(B, groups), _heads(C, groups), out_x, chunk_size,
                D=D, z=_heads(z, heads), dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
                dx=_heads(dx, heads), ddt=ddt, dB=_heads(dB, groups), dC=_heads(dC, groups), dz=_heads(dz, heads))
        _, dweight, dbias = conv_silu_backward(dxBC, xBC, conv_weight, conv_bias, conv_scale, dx=dxBC_raw,
                                               seq_idx=seq_idx, streaming=ctx.streaming_conv)
        return (dzxbcdt, dweight, dbias, None, dA, dD, ddt_bias) + (None,) * 11


def mamba_conv_scan(zxbcdt, conv_weight, conv_bias, conv_scale, A, D, dt_bias, d_ssm: int, d_bc: int,
                    heads: int, groups: int, chunk_size: int, dt_limit, seq_idx=None,
                    keep_forward_states: bool = True, own_forward: bool = False,
                    own_backward: bool = False, in_projection_gradient: InProjectionGradient | None = None,
                    keep_conv_output: bool = False, streaming_conv: bool = False) -> torch.Tensor:
    """zxbcdt [b, s, d_ssm + d_ssm + 2 d_bc + heads] (channel stride 1) -> y * silu(z) [b, s, d_ssm].

    conv_scale [conv channels] or None multiplies the conv output (a constant: µP folding).
    seq_idx [b, s] int32 (kernels.documents): packed documents, each with its own conv window
    and SSM state starting from zero.
    keep_forward_states: the scan's backward starts from the forward's chunk states
    (kernels.ssd_backward); False: mamba_ssm's backward recomputes them.
    own_forward / own_backward: the scan's forward / backward on this project's kernels
    (kernels.ssd_fwd / kernels.ssd_bwd) instead of mamba_ssm's; either forward saves what either
    backward needs. The own backward starts from the kept states, so it needs keep_forward_states.
    in_projection_gradient: split_in_projection's, when zxbcdt is (the [b, s] view of) its Mamba
    columns: the backward writes zxbcdt's gradient into the whole projection's gradient buffer.
    keep_conv_output: the backward reads the forward's conv output ([b, s, conv channels] kept)
    instead of recomputing it.
    streaming_conv: the conv's kernels walk the rows, the backward in one pass (kernels.conv_triton).
    """
    check_seq_idx(seq_idx, zxbcdt.shape[:2])
    if own_backward and not keep_forward_states:
        raise ValueError("mamba_conv_scan: own_backward=True (KernelOptions.own_ssd_backward) starts from the "
                         "forward's chunk states, so it needs keep_forward_states=True "
                         "(KernelOptions.ssd_keep_forward_states); got False")
    if in_projection_gradient is not None:
        s, b, width = in_projection_gradient.shape
        if (b, s, width - in_projection_gradient.offset) != tuple(zxbcdt.shape):
            raise ValueError(f"mamba_conv_scan: in_projection_gradient is for an in-projection of shape {(s, b, width)} "
                             f"with the Mamba columns from {in_projection_gradient.offset} on, which does not match "
                             f"zxbcdt {tuple(zxbcdt.shape)} (its [b, s, .] view of those columns)")
    if conv_scale is not None:
        conv_scale = conv_scale.detach().float().contiguous()
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return MambaConvScan.apply(zxbcdt, conv_weight.contiguous(), conv_bias, conv_scale, A, D, dt_bias, seq_idx,
                               (d_ssm, d_bc, heads), heads, groups, chunk_size, (lo, hi), keep_forward_states,
                               keep_conv_output, _OwnKernels(own_forward, own_backward), in_projection_gradient,
                               streaming_conv)
