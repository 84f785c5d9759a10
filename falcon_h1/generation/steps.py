"""One-token updates of the three cached operations: the causal conv window, the Mamba-2
SSM state and attention over the KV cache. The SSM update has a pure-PyTorch reference
and a GPU path (mamba_ssm's Triton selective_state_update); both take the same arguments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def conv_step(conv_state: torch.Tensor, xbc: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Causal depthwise conv + SiLU of one new input per row.

    conv_state [b, c, k-1] (the previous k-1 inputs, oldest first) is shifted in place to end
    with xbc [b, c]; returns silu(conv) [b, c], the value the full-sequence conv gives there.
    """
    window = torch.cat([conv_state, xbc[:, :, None]], dim=-1)          # [b, c, k]
    conv_state.copy_(window[:, :, 1:])
    out = (window * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out)


def discretized_dt(dt_raw: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """softplus(dt_raw + dt_bias) clamped to dt_limit, in fp32 (the scan's time step)."""
    dt = F.softplus(dt_raw.float() + dt_bias.float())
    lo, hi = dt_limit
    if lo > 0.0 or hi != math.inf:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def ssm_step_reference(state, x, dt, A, B, C, D) -> torch.Tensor:
    """S <- exp(dt A) S + dt x B^T (in place); returns y = S C + D x.

    state [b, h, p, n] fp32; x [b, h, p]; dt [b, h] (discretized); A [h]; B, C [b, g, n]; D [h].
    """
    h, g = x.shape[1], B.shape[1]
    B = B.float().repeat_interleave(h // g, dim=1)                     # [b, h, n]
    C = C.float().repeat_interleave(h // g, dim=1)
    xf = x.float()
    decay = torch.exp(dt * A.float())                                   # [b, h]
    state.mul_(decay[:, :, None, None]).add_((dt[:, :, None] * xf)[..., None] * B[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, C) + D.float()[:, None] * xf
    return y.to(x.dtype)


def ssm_step_triton(state, x, dt, A, B, C, D) -> torch.Tensor:
    """ssm_step_reference through mamba_ssm's selective_state_update (one Triton kernel).
    Per-head scalars are passed as stride-0 expansions over head_dim, the layout the kernel
    reads once per head; dt is already discretized, so its bias is a zero (mamba_ssm 2.3.2
    reads dt_bias's strides unconditionally)."""
    from falcon_h1.kernels.ssd_triton import make_mamba_ssm_importable

    make_mamba_ssm_importable()
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    h, p, n = x.shape[1], x.shape[-1], B.shape[-1]
    zero_bias = dt.new_zeros(1).expand(h, p)
    return selective_state_update(
        state, x, dt[:, :, None].expand(-1, -1, p), A.float()[:, None, None].expand(-1, p, n), B, C,
        D=D[:, None].expand(-1, p), dt_bias=zero_bias, dt_softplus=False)


def ssm_step(state, x, dt, A, B, C, D, fast: bool) -> torch.Tensor:
    return (ssm_step_triton if fast else ssm_step_reference)(state, x, dt, A, B, C, D)


def attention_step(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """One query per row over the cache: q [b, q_heads, d], k/v_cache [b, kv_heads, n, d],
    valid [b, n] (True where the cache holds this row's tokens) -> [b, q_heads, d].

    Grouped-query attention as one SDPA call: the q heads sharing a kv head (consecutive, as
    in the training path's repeat_interleave) become that head's query rows.
    """
    b, qh, d = q.shape
    kvh = k_cache.shape[1]
    o = F.scaled_dot_product_attention(q.view(b, kvh, qh // kvh, d), k_cache, v_cache,
                                       attn_mask=valid[:, None, None, :], scale=scale)
    return o.reshape(b, qh, d)
