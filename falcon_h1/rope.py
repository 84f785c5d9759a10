"""Rotary position embeddings: the frequencies of every RoPE type Hugging Face's FalconH1 runs.

`model.rope_scaling` holds Hugging Face's `rope_parameters` without `rope_theta` (which is
`model.rope_theta`): None or {"rope_type": "default"} for plain RoPE, otherwise one of
linear, dynamic, yarn, longrope, llama3, proportional with that type's keys. The inverse
frequencies are computed the way transformers computes them (float32, same operation
order), so logits match at any position. yarn and longrope also scale cos and sin by an
attention factor; `attention_scaling` gives it (the mixer passes it to Megatron's
`apply_rotary_pos_emb` as `mscale`).

Two types depend on the positions seen: dynamic NTK scales the base once the largest
position of the batch reaches `max_position_embeddings`, and longrope switches from the
short to the long factors past `original_max_position_embeddings`. Both are chosen per
forward from the largest position id of the batch, on the device (no host sync, so a CUDA
graph can capture it). Hugging Face's dynamic RoPE also keeps a grown set cached between
calls until a call shorter than `max_position_embeddings` resets it; this implementation
has no such state (it equals a fresh Hugging Face model on every call).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from falcon_h1.config import FalconH1Config, check_rope_scaling, rope_type


def _original_max_positions(cfg: FalconH1Config) -> int:
    return (cfg.rope_scaling or {}).get("original_max_position_embeddings") or cfg.max_position_embeddings


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _dynamic_inv_freq(cfg: FalconH1Config, seq_len):
    """Dynamic NTK: the base grows with the sequence length once it passes max_position_embeddings."""
    dim, factor, max_pos = cfg.kv_channels, cfg.rope_scaling["factor"], cfg.max_position_embeddings
    base = cfg.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=getattr(seq_len, "device", None)).float() / dim
    return 1.0 / (base ** exponents)


def _yarn_attention_factor(s: dict, factor: float) -> float:
    def mscale_of(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    if s.get("mscale") and s.get("mscale_all_dim"):
        return float(mscale_of(factor, s["mscale"]) / mscale_of(factor, s["mscale_all_dim"]))
    return mscale_of(factor)


def _yarn_factor(cfg: FalconH1Config) -> float:
    factor = cfg.rope_scaling.get("factor")
    return factor if factor is not None else cfg.max_position_embeddings / _original_max_positions(cfg)


def _yarn_inv_freq(cfg: FalconH1Config) -> torch.Tensor:
    s, dim, base = cfg.rope_scaling, cfg.kv_channels, cfg.rope_theta
    factor, original = _yarn_factor(cfg), _original_max_positions(cfg)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency per channel
    return interpolation * (1 - keep) + extrapolation * keep


def _longrope_factor(cfg: FalconH1Config) -> float:
    factor = cfg.rope_scaling.get("factor")
    return factor if factor is not None else cfg.max_position_embeddings / _original_max_positions(cfg)


def _longrope_inv_freq(cfg: FalconH1Config, ext_factors) -> torch.Tensor:
    dim = cfg.kv_channels
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(ext_factors, dtype=torch.float32) * cfg.rope_theta ** shape)


def _llama3_inv_freq(cfg: FalconH1Config) -> torch.Tensor:
    s = cfg.rope_scaling
    inv_freq = _default_inv_freq(cfg.rope_theta, cfg.kv_channels)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = _original_max_positions(cfg)
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _proportional_inv_freq(cfg: FalconH1Config) -> torch.Tensor:
    s, head_dim = cfg.rope_scaling, cfg.kv_channels
    angles = int(s.get("partial_rotary_factor", 1.0) * head_dim // 2)
    rotated = 1.0 / (cfg.rope_theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
    inv_freq = torch.cat([rotated, torch.zeros(head_dim // 2 - angles)])
    return inv_freq / s.get("factor", 1.0)


def attention_scaling(cfg: FalconH1Config) -> float:
    """The factor on cos and sin (so on q and k): yarn's and longrope's attention factor, else 1."""
    kind = rope_type(cfg)
    if kind == "yarn":
        return _yarn_attention_factor(cfg.rope_scaling, _yarn_factor(cfg))
    if kind == "longrope":
        s = cfg.rope_scaling
        if s.get("attention_factor") is not None:
            return s["attention_factor"]
        factor = _longrope_factor(cfg)
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(_original_max_positions(cfg)))
    return 1.0


def static_inv_freq(cfg: FalconH1Config) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (float32, CPU) at positions below the scaling thresholds."""
    kind, dim, base = rope_type(cfg), cfg.kv_channels, cfg.rope_theta
    if kind == "default":
        return _default_inv_freq(base, dim)
    if kind == "linear":
        return _default_inv_freq(base, dim) / cfg.rope_scaling["factor"]
    if kind == "dynamic":
        return _dynamic_inv_freq(cfg, cfg.max_position_embeddings)
    if kind == "yarn":
        return _yarn_inv_freq(cfg)
    if kind == "longrope":
        return _longrope_inv_freq(cfg, cfg.rope_scaling["short_factor"])
    if kind == "llama3":
        return _llama3_inv_freq(cfg)
    return _proportional_inv_freq(cfg)


class RotaryFrequencies(torch.nn.Module):
    """Rotation angles per token in Megatron's layout: forward(seq_len, position_ids) ->
    [s, b, 1, head_dim] ([s, 1, 1, head_dim] without position_ids: positions 0..s-1)."""

    def __init__(self, cfg: FalconH1Config):
        super().__init__()
        check_rope_scaling(cfg)
        self.cfg = cfg
        self.kind = rope_type(cfg)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}  # built once per device (no copy per step)
        self._long_inv_freq_on: dict[torch.device, torch.Tensor] = {}

    def _cached(self, cache: dict, device: torch.device, make) -> torch.Tensor:
        if device not in cache:
            cache[device] = make().to(device)
        return cache[device]

    def inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        """The inverse frequencies for a batch of positions (chosen on the device)."""
        cfg, device = self.cfg, positions.device
        inv_freq = self._cached(self._inv_freq_on, device, lambda: static_inv_freq(cfg))
        if self.kind == "dynamic":
            seq_len = positions.max() + 1
            grown = _dynamic_inv_freq(cfg, seq_len.clamp(min=cfg.max_position_embeddings))
            return torch.where(seq_len > cfg.max_position_embeddings, grown, inv_freq)
        if self.kind == "longrope":
            long = self._cached(self._long_inv_freq_on, device,
                                lambda: _longrope_inv_freq(cfg, cfg.rope_scaling["long_factor"]))
            return torch.where(positions.max() + 1 > _original_max_positions(cfg), long, inv_freq)
        return inv_freq

    def forward(self, seq_len: int, position_ids: Optional[torch.Tensor] = None,
                device: Optional[torch.device] = None) -> torch.Tensor:
        if position_ids is None:
            positions = torch.arange(seq_len, device=device)[None]
        else:
            if position_ids.shape[-1] != seq_len:
                raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; allowed: [batch, {seq_len}] "
                                 "(one position per input token)")
            positions = position_ids.reshape(-1, seq_len)
        angles = positions[..., None].float() * self.inv_freq(positions)   # [b, s, head_dim / 2]
        return torch.cat([angles, angles], dim=-1).transpose(0, 1)[:, :, None, :]
