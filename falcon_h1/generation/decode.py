"""A decode step: the model's forward on one new token per row at that row's position, each
mixer stood in for by a CachedMixer that attends over the KV cache and advances the conv
window and SSM state."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from falcon_h1.generation import model_access as access
from falcon_h1.generation.cache import LayerCache
from falcon_h1.generation.steps import attention_step, conv_step, discretized_dt, ssm_step


@dataclass
class StepPositions:
    """Where each row's new token goes, shared by all layers of one step."""

    positions: torch.Tensor          # [b] long: the new token's position (= tokens already cached)
    valid: torch.Tensor              # [b, n]: cache slots holding this row's tokens, the new one included

    @staticmethod
    def at(positions: torch.Tensor, n: int) -> "StepPositions":
        """n: slots attended over, at least positions.max() + 1 (passed in: no device sync)."""
        return StepPositions(positions, torch.arange(n, device=positions.device)[None, :] <= positions[:, None])


class CachedMixer(torch.nn.Module):
    """Called as the mixer is, u [1, b, H] -> [1, b, H], for one new token per row."""

    def __init__(self, mixer, cache: LayerCache, step: "StepHolder"):
        super().__init__()
        self.__dict__["source"] = mixer  # not a submodule: the model keeps owning it
        self.cache, self.step, self.fast = cache, step, access.uses_gpu_kernels(mixer)
        self.ssm = access.ssm_params(mixer) if access.has_mamba(mixer) else None

    def forward(self, u, rotary_freqs=None, documents=None):
        if documents is not None:  # the layer's call signature; a decode step has one token per row
            raise ValueError("a decode step takes one new token per row: no packed documents (position_ids "
                             "restarting inside a row) can reach it.")
        mixer = self.source
        qkv, zxbcdt = mixer.branch_inputs(u)
        y = self._mamba(zxbcdt[0]) if zxbcdt is not None else None
        o = self._attention(qkv, rotary_freqs) if qkv is not None else None
        return mixer.branch_outputs_combined(y, o)

    def _attention(self, qkv, freqs):
        mixer, cache, at = self.source, self.cache, self.step.now
        q, k, v = access.rotated_qkv(mixer, qkv, freqs)             # [1, b, heads, d]
        rows = torch.arange(q.shape[1], device=q.device)
        cache.k[rows, :, at.positions] = k[0].to(cache.k.dtype)
        cache.v[rows, :, at.positions] = v[0].to(cache.v.dtype)
        n = at.valid.shape[1]
        o = attention_step(q[0], cache.k[:, :, :n], cache.v[:, :, :n], at.valid, access.attention_scale(mixer))
        return o.flatten(-2)[None]                                   # [1, b, q]

    def _mamba(self, zxbcdt):
        p, cache = self.ssm, self.cache
        z, xbc, dt_raw = access.split_zxbcdt(self.source, zxbcdt)   # [b, .]
        xbc = conv_step(cache.conv, xbc, p.conv_weight, p.conv_bias)
        if p.conv_out_scale is not None:  # the folded ssm_out_multiplier on x, as the mixer's conv applies it
            xbc = xbc * p.conv_out_scale.to(xbc.dtype)
        x, B, C = xbc.split([p.d_ssm, p.bc, p.bc], dim=-1)
        b = x.shape[0]
        y = ssm_step(cache.ssm, x.reshape(b, p.heads, p.head_dim), discretized_dt(dt_raw, p.dt_bias, p.dt_limit),
                     p.A, B.reshape(b, p.groups, p.d_state), C.reshape(b, p.groups, p.d_state), p.D, self.fast)
        return access.gate(self.source, y.reshape(b, -1), z)[None]  # [1, b, d_ssm]


class StepHolder:
    """The current step's positions, read by every CachedMixer of the model."""

    now: StepPositions


def decode_step(model, tokens: torch.Tensor, step: StepHolder, positions: StepPositions) -> torch.Tensor:
    """tokens [b] at `positions` -> logits [b, vocab] (the mixers must be CachedMixers)."""
    step.now = positions
    return model(tokens[:, None], position_ids=positions.positions[:, None])[:, -1]
