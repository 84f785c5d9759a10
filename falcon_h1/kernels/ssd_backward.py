"""The SSD scan's backward from the forward's own chunk states (GPU path, mamba_ssm's kernels).

mamba_ssm 2.3.2's `_mamba_chunk_scan_combined_bwd` starts by recomputing what its forward
already had: the dt cumsum, the chunk states (`_chunk_state_fwd`) and the state passing over
the chunks (`_state_passing_fwd`), plus C·Bᵀ, before the backward proper. Its forward
returns those results (processed dt, dA cumsum, the states entering each chunk), so the branch
keeps them (50 MiB a layer at the 0.5B shape, batch 4 x 4096) and this backward starts from
them; the kernels after that are mamba_ssm's, in its order. Only C·Bᵀ per chunk (fp32,
8 MiB a layer, not returned by the forward) is recomputed.

Numerics: the saved states are in the input dtype (mamba_ssm's forward stores them so), where
the recomputation had fp32; they only enter the backward after mamba_ssm converts them to the
input dtype anyway, except in the chunk-boundary term of ddA (the state·dstate sum), which is
accumulated in fp32 from bf16 inputs: a bf16-rounding difference in dA and ddt.
"""

from __future__ import annotations

import torch


def _kernels():
    from falcon_h1.kernels.ssd_triton import make_mamba_ssm_importable

    make_mamba_ssm_importable()
    from mamba_ssm.ops.triton import ssd_combined

    return ssd_combined


def ssd_backward_from_forward_states(dout, x, dt_raw, A, B, C, out_x, dt, dA_cumsum, states, chunk_size, D, z,
                                     dt_bias, dt_limit, dx, ddt_raw, dB, dC, dz, seq_idx=None):
    """Gradients of the gated SSD scan (dt softplus, no initial state), written into the given
    dx / ddt_raw / dB / dC / dz; returns (dA, dD, ddt_bias).

    out_x, dt, dA_cumsum, states: the forward's pre-gate output, processed dt [b, h, c, l],
    dA cumsum [b, h, c, l] and states entering each chunk [b, c, h, p, n]. seq_idx [b, l]:
    the packed documents the forward was given (each kernel takes it where mamba_ssm's
    backward passes it).
    """
    k = _kernels()
    dstate = B.shape[-1]
    groups = B.shape[2]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    CB = k._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
    dz, dout, dD, *_ = k._chunk_scan_bwd_dz(x, z, out_x, dout, chunk_size=chunk_size, has_ddAcs=False, D=D, dz=dz)
    dstates = k._chunk_scan_bwd_dstates(C, dA_cumsum, dout, seq_idx=seq_idx, dtype=torch.float32)
    flat = lambda t: t.flatten(-2)                       # [..., p, n] -> [..., p * n]
    unflat = lambda t: t.unflatten(-1, (-1, dstate))
    dstates, ddA_chunk_cumsum, _, states = k._state_passing_bwd(
        flat(states), dA_cumsum[:, :, :, -1], flat(dstates), seq_idx=seq_idx, dstates_dtype=x.dtype,
        states_dtype=x.dtype, chunk_size=chunk_size)
    states, dstates = unflat(states), unflat(dstates)
    dx, ddt, _ = k._chunk_scan_chunk_state_bwd_dx(x, dt, dA_cumsum, B, CB, dout, dstates, D=D, seq_idx=seq_idx,
                                                  dx=dx)
    dB_part, ddA_next = k._chunk_state_bwd_db(x, dt, dA_cumsum, dstates, seq_idx=seq_idx, B=B, ngroups=groups)
    dC_part, ddA_cumsum_prev = k._chunk_scan_bwd_dC(states, dA_cumsum, dout, seq_idx=seq_idx, C=C, ngroups=groups)
    dCB = k._chunk_scan_bwd_dcb(x, dt, dA_cumsum, dout, seq_idx=seq_idx, ngroups=groups).to(CB.dtype)
    k._bmm_chunk_bwd(C, dCB, residual=dB_part, out=dB)
    k._bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_part, out=dC)
    ddA_cumsum_prev[..., -1] += ddA_chunk_cumsum
    ddA = k._chunk_scan_bwd_ddAcs_stable(x, dt, dA_cumsum, dout, CB)
    ddA += ddA_next + ddA_cumsum_prev.flip([-1]).cumsum(dim=-1).flip([-1])
    # the clone (a contiguous copy of a [b, l, h] slice) is mamba_ssm's own workaround for a Triton
    # "invalid device context" error with the strided view; kept for parity
    _, dA, ddt_bias = k._chunk_cumsum_bwd(ddA, ddt, dt_raw.clone(), A, dt_bias=dt_bias, dt_softplus=True,
                                          dt_limit=dt_limit, ddt=ddt_raw)
    return dA, dD, ddt_bias
