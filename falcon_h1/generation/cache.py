"""Per-layer decode caches and how a prompt fills them.

Each mixer keeps, per batch row:
- attention: K (after RoPE) and V of every token so far, [b, kv_heads, capacity, d];
- Mamba-2: the conv window, the last d_conv - 1 conv inputs [b, conv_channels, d_conv - 1],
  and the SSM state [b, heads, head_dim, d_state] in fp32.

A prompt is prefilled unpadded (no pad token reaches a conv window or SSM state); its
states come from the branch inputs as the training forward hands them over. The SSM state at
the end of a prompt of length L has the closed form

    S_L = sum_t exp(sum_{s>t} A dt_s) dt_t x_t B_t^T

(the recurrence S_t = exp(A dt_t) S_{t-1} + dt_t x_t B_t^T unrolled from S_0 = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from falcon_h1.generation import model_access as access
from falcon_h1.generation.steps import discretized_dt
from falcon_h1.kernels import causal_conv1d_silu


@dataclass
class LayerCache:
    k: Optional[torch.Tensor] = None     # [b, kv_heads, capacity, d]
    v: Optional[torch.Tensor] = None
    conv: Optional[torch.Tensor] = None  # [b, conv_channels, d_conv - 1]
    ssm: Optional[torch.Tensor] = None   # [b, heads, head_dim, d_state], fp32


def allocate(mixer, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> LayerCache:
    cache = LayerCache()
    if access.has_attention(mixer):
        d = mixer.dims
        shape = (batch, d.kv_heads, capacity, mixer.cfg.kv_channels)
        cache.k = torch.zeros(shape, dtype=dtype, device=device)
        cache.v = torch.zeros(shape, dtype=dtype, device=device)
    if access.has_mamba(mixer):
        p = access.ssm_params(mixer)
        cache.conv = torch.zeros(batch, p.conv_weight.shape[0], p.conv_weight.shape[1] - 1, dtype=dtype,
                                 device=device)
        cache.ssm = torch.zeros(batch, p.heads, p.head_dim, p.d_state, dtype=torch.float32, device=device)
    return cache


RowIndex = Union[slice, torch.Tensor]


def row_index(rows: list[int], device: torch.device) -> RowIndex:
    """Cache rows `rows` as an index made once per prefill group: a slice where they are
    consecutive, else a tensor on `device`. A list would be copied to the device at every layer,
    each copy waiting for the GPU to drain, so the host could never run ahead of it."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


def fill_attention(cache: LayerCache, rows: RowIndex, mixer, qkv: torch.Tensor, freqs) -> None:
    """Write the K/V of prompts of one length into cache rows `rows` (row_index): qkv [L, r, .] as
    the mixer's attention got it; freqs: the rotary frequencies it was given (positions 0..L-1)."""
    _, k, v = access.rotated_qkv(mixer, qkv, freqs)                  # [L, r, kv_heads, d]
    length = qkv.shape[0]
    cache.k[rows, :, :length] = k.permute(1, 2, 0, 3).to(cache.k.dtype)
    cache.v[rows, :, :length] = v.permute(1, 2, 0, 3).to(cache.v.dtype)


def fill_mamba(cache: LayerCache, rows: RowIndex, mixer, zxbcdt: torch.Tensor) -> None:
    """Write the conv windows and SSM states at the end of prompts of one length into cache rows
    `rows` (row_index): zxbcdt [L, r, .] as the mixer's Mamba-2 branch got it."""
    conv, ssm = mamba_states(mixer, zxbcdt.transpose(0, 1))
    cache.conv[rows] = conv.to(cache.conv.dtype)
    cache.ssm[rows] = ssm


def mamba_states(mixer, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """zxbcdt [r, L, .] of whole prompts -> (conv window [r, c, k-1], SSM state [r, h, p, n])."""
    p = access.ssm_params(mixer)
    _, xbc, dt_raw = access.split_zxbcdt(mixer, zxbcdt)
    k = p.conv_weight.shape[1]
    window = xbc[:, -(k - 1):].transpose(1, 2)                        # [r, c, <= k-1]
    conv = torch.nn.functional.pad(window, (k - 1 - window.shape[-1], 0))  # short prompts: causal zeros
    x, B, _ = causal_conv1d_silu(xbc, p.conv_weight, p.conv_bias, False, out_scale=p.conv_out_scale).split(
        [p.d_ssm, p.bc, p.bc], dim=-1)
    dt = discretized_dt(dt_raw, p.dt_bias, p.dt_limit)                # [r, L, h]
    return conv, final_ssm_state(x.unflatten(-1, (p.heads, -1)), dt, p.A, B.unflatten(-1, (p.groups, -1)))


def final_ssm_state(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """x [r, L, h, p], dt [r, L, h], A [h], B [r, L, g, n] -> S_L [r, h, p, n] in fp32 (closed form).

    The decay exponents are summed in float64: sum_{s>t} as total minus prefix keeps its
    precision over long prompts."""
    a = dt.double() * A.double()                                      # [r, L, h]
    to_end = torch.exp(a.sum(1, keepdim=True) - a.cumsum(1))          # exp(sum_{s>t} a_s)
    weight = (to_end * dt.double()).float()
    B = B.float().repeat_interleave(x.shape[2] // B.shape[2], dim=2)  # [r, L, h, n]
    return torch.einsum("rlhp,rlhn->rhpn", x.float() * weight[..., None], B)
