"""The gated SSD scan's backward on the project's own Triton kernels (GPU path), from the
forward's saved chunk states: a drop-in for `kernels.ssd_backward.ssd_backward_from_forward_states`
(mamba_ssm 2.3.2's backward kernels), same arguments, same results.

Six Triton kernels where mamba_ssm's backward has about a dozen (each side adds small torch reductions
of per-program partial sums):
    ssd_fwd.chunk_cb                                         C·Bᵀ per group and chunk (10 us at 0.5B)
    ssd_bwd_states.gated_output_backward_and_local_dstates   dy = dout silu(z), dz, dS_local
    ssd_bwd_states.state_passing_backward                    dS_out, ddA_last (reverse over chunks)
    ssd_bwd_bc.bc_gradients                                  dB, dC summed over each group's heads
    ssd_bwd_tokens.token_and_step_size_gradients             dx, dA, dD; then (second kernel) the
                                                             in-chunk reverse cumsum and the step-size
                                                             chain to dt_raw and dt_bias
The math, term by term, is kernels.ssd_backward_reference (its docstring names every piece).
"""

from __future__ import annotations

from dataclasses import replace

from falcon_h1.kernels.ssd_bwd_bc import bc_gradients
from falcon_h1.kernels.ssd_bwd_states import gated_output_backward_and_local_dstates, state_passing_backward
from falcon_h1.kernels.ssd_bwd_tokens import token_and_step_size_gradients, token_blocks
from falcon_h1.kernels.ssd_fwd import chunk_cb


def ssd_backward_own(dout, x, dt_raw, A, B, C, out_x, dt, dA_cumsum, states, chunk_size, D, z, dt_bias, dt_limit,
                     dx, ddt_raw, dB, dC, dz, seq_idx=None, blocks: dict | None = None):
    """Gradients of the gated SSD scan (dt softplus, no initial state), written into the given
    dx / ddt_raw / dB / dC / dz; returns (dA, dD, ddt_bias). Arguments as
    kernels.ssd_backward.ssd_backward_from_forward_states. blocks: tile overrides for the tile
    sweeps (benchmarks/ssd_bench.py --backward-sweep), a dict of override dicts under "dstates",
    "passing", "bc" and "tokens" (keys as each module's `*_blocks` function returns them)."""
    blocks = blocks or {}
    dy, dS_local = gated_output_backward_and_local_dstates(dout, z, out_x, C, dA_cumsum, chunk_size,
                                                           seq_idx=seq_idx, dz=dz, blocks=blocks.get("dstates"))
    dS_out, ddA_last = state_passing_backward(dS_local, states, dA_cumsum, x.shape[1], chunk_size, seq_idx=seq_idx,
                                              blocks=blocks.get("passing"))
    del dS_local
    bc_gradients(x, dy, dt, dA_cumsum, B, C, states, dS_out, chunk_size, seq_idx=seq_idx, dB=dB, dC=dC,
                 blocks=blocks.get("bc"))
    tiles = None
    if "tokens" in blocks:
        tiles = replace(token_blocks(chunk_size, x.shape[-1], B.shape[-1], x.shape[2]), **blocks["tokens"])
    return token_and_step_size_gradients(x, dy, dt, dA_cumsum, B, C, states, dS_out, ddA_last, A, chunk_size,
                                         dt_raw, dt_bias, dt_limit, D=D, seq_idx=seq_idx, cb=chunk_cb(B, C, chunk_size),
                                         dx=dx, ddt_raw=ddt_raw, blocks=tiles)
