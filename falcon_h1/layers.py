"""The Falcon-H1 decoder layer on Megatron Core parts.

Tensors flow in Megatron's [sequence, batch, hidden] layout. Column/row-parallel
linears shard the projections the Megatron way; everything between them (RoPE,
attention, conv, SSD scan, gating) works on the rank's local heads.

The mixer runs attention and Mamba-2 on the same normed input. With
`fused_projections` one column-parallel GEMM produces [q, k, v, z, x, B, C, dt]
and one row-parallel GEMM projects the concatenated branch outputs [y_ssm, o_attn]
(summing two out-projections equals one over the concatenation), so a mixer costs
one tensor-parallel all-reduce instead of two. Under BitNet the fused projections
quantise their attention and Mamba parts separately (bitnet.segments), so fused
and unfused are the same model. µP multipliers are applied as
per-channel scales of the projection inputs/outputs, never folded into weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from falcon_h1 import kernels, rope
from falcon_h1.compat import recompute
from falcon_h1.config import FalconH1Config
from falcon_h1.context_parallel import ContextParallelLayout, context_parallel_attention
from falcon_h1.context_parallel import mamba as cp_mamba


@dataclass(frozen=True)
class LocalDims:
    """Per-tensor-parallel-rank widths of every projection segment."""

    q: int
    kv: int
    z: int          # = x = local d_ssm
    bc: int         # local groups * d_state (each of B and C)
    dt: int         # local Mamba heads
    q_heads: int
    kv_heads: int
    ssm_heads: int
    groups: int

    @staticmethod
    def of(cfg: FalconH1Config, tp: int, attention: bool, mamba: bool) -> "LocalDims":
        d = cfg.kv_channels
        qh = cfg.num_attention_heads // tp if attention else 0
        kvh = cfg.num_key_value_heads // tp if attention else 0
        mh = cfg.mamba_n_heads // tp if mamba else 0
        g = cfg.mamba_n_groups // tp if mamba else 0
        return LocalDims(
            q=qh * d, kv=kvh * d, z=mh * cfg.ssm_head_dim, bc=g * cfg.mamba_d_state, dt=mh,
            q_heads=qh, kv_heads=kvh, ssm_heads=mh, groups=g,
        )

    @property
    def attention_in(self) -> list[int]:
        return [self.q, self.kv, self.kv] if self.q else []

    @property
    def mamba_in(self) -> list[int]:
        return [self.z, self.z, self.bc, self.bc, self.dt] if self.z else []

    @property
    def conv_channels(self) -> int:
        return self.z + 2 * self.bc


def _tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def _tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def _mark_tp(param: torch.nn.Parameter, dim: int = 0) -> None:
    """Tell Megatron (grad-norm, checkpoint) that this parameter is sharded over TP."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def _mark_sequence_parallel(param: torch.nn.Parameter, config) -> None:
    # TP-replicated params that see only a sequence shard: Megatron all-reduces their grads.
    param.sequence_parallel = bool(config.sequence_parallel)


def _split_factory(sharded_tensor, sections: list[int], names: list[str], dim: int):
    """Megatron's split-into-named-parts checkpoint factory; its merge concatenates on
    dim 0, so splits along dim 1 (row-parallel inputs) get a matching merge."""
    factory = _split_tensor_factory(sharded_tensor, sections, names, dim)
    if dim != 0:
        factory.merge_fn = lambda parts: torch.cat(parts, dim=dim)
    return factory


class RMSNorm(MegatronModule):
    """RMSNorm computed in fp32 like the reference (weight applied in the input dtype)."""

    def __init__(self, config, hidden_size: int, eps: float):
        super().__init__(config)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        _mark_sequence_parallel(self.weight, config)
        self.eps = eps

    def forward(self, x):
        if x.is_cuda and kernels.FAST_PATH.fused_rms_norm:  # fp32 inside, one pass forward, one backward
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def gated_rms_norm(y, z, weight, groups: int, eps: float, norm_before_gate: bool):
    """Group-wise RMSNorm of y gated by silu(z), as HF's FalconH1RMSNormGated."""
    dtype = y.dtype
    if not norm_before_gate:
        y = y * F.silu(z.float())
    h = y.float().unflatten(-1, (groups, -1))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = (weight.unflatten(-1, (groups, -1)) * h).flatten(-2)
    if norm_before_gate:
        h = h * F.silu(z.float())
    return h.to(dtype)


def _linear_class(bitnet_cfg, layer_type: str, parallel: str):
    if bitnet_cfg is None or not bitnet_cfg.enabled:
        return ColumnParallelLinear if parallel == "column" else RowParallelLinear
    from bitnet.layers import select_linear

    return select_linear(bitnet_cfg, layer_type, parallel)


def _fused_linear_class(bitnet_cfg, segments, parallel: str):
    """Like _linear_class for a fused projection; segments: (name, local size, BitNet layer type)."""
    if bitnet_cfg is None or not bitnet_cfg.enabled:
        return ColumnParallelLinear if parallel == "column" else RowParallelLinear
    from bitnet.layers import select_segmented_linear

    return select_segmented_linear(bitnet_cfg, segments, parallel)


def _column(cfg_t, in_size, out_size, cls):
    return cls(in_size, out_size, config=cfg_t, init_method=cfg_t.init_method, bias=False,
               gather_output=False, skip_bias_add=True)


def _row(cfg_t, in_size, out_size, cls):
    return cls(in_size, out_size, config=cfg_t, init_method=cfg_t.output_layer_init_method,
               bias=False, input_is_parallel=True, skip_bias_add=True)


class ParallelHybridMixer(MegatronModule):
    """Attention and/or Mamba-2 on the same input; outputs summed."""

    def __init__(self, cfg: FalconH1Config, config, attention: bool, mamba: bool, bitnet_cfg=None,
                 context_parallel: Optional[ContextParallelLayout] = None):
        super().__init__(config)
        self.cfg, self.attention, self.mamba = cfg, attention, mamba
        self.context_parallel = context_parallel  # this rank's chunks of each sequence; None: all of it
        tp = _tp_size()
        dims = self.dims = LocalDims.of(cfg, tp, attention, mamba)
        self.fused = cfg.fused_projections
        H = cfg.hidden_size
        if self.fused:
            # Under BitNet each segment is quantised as its unfused projection is (own absmean,
            # own activation scale, own bitnet.layers switch), so fusing keeps the model.
            in_segments = ([("qkv", sum(dims.attention_in), "attention_qkv")] * attention
                           + [("zxbcdt", sum(dims.mamba_in), "mamba_in")] * mamba)
            out_segments = [("y_ssm", dims.z, "mamba_out")] * mamba + [("o_attn", dims.q, "attention_out")] * attention
            self.in_proj = _column(config, H, tp * sum(dims.attention_in + dims.mamba_in),
                                   _fused_linear_class(bitnet_cfg, in_segments, "column"))
            self.out_proj = _row(config, tp * (dims.z + dims.q), H, _fused_linear_class(bitnet_cfg, out_segments, "row"))
        else:
            if attention:
                self.attn_in_proj = _column(config, H, tp * sum(dims.attention_in),
                                            _linear_class(bitnet_cfg, "attention_qkv", "column"))
                self.attn_out_proj = _row(config, tp * dims.q, H, _linear_class(bitnet_cfg, "attention_out", "row"))
            if mamba:
                self.mamba_in_proj = _column(config, H, tp * sum(dims.mamba_in),
                                             _linear_class(bitnet_cfg, "mamba_in", "column"))
                self.mamba_out_proj = _row(config, tp * dims.z, H, _linear_class(bitnet_cfg, "mamba_out", "row"))
        if mamba:
            dtype = config.params_dtype
            self.conv1d_weight = torch.nn.Parameter(torch.empty(dims.conv_channels, cfg.mamba_d_conv, dtype=dtype))
            params = [self.conv1d_weight]
            if cfg.mamba_conv_bias:
                self.conv1d_bias = torch.nn.Parameter(torch.empty(dims.conv_channels, dtype=dtype))
                params.append(self.conv1d_bias)
            else:
                self.conv1d_bias = None
            self.dt_bias = torch.nn.Parameter(torch.empty(dims.ssm_heads, dtype=torch.float32))
            self.A_log = torch.nn.Parameter(torch.empty(dims.ssm_heads, dtype=torch.float32))
            self.D = torch.nn.Parameter(torch.empty(dims.ssm_heads, dtype=torch.float32))
            params += [self.dt_bias, self.A_log, self.D]
            if cfg.mamba_rms_norm:
                self.norm_weight = torch.nn.Parameter(torch.ones(dims.z, dtype=dtype))
                params.append(self.norm_weight)
            for p in params:
                _mark_tp(p)
        self._register_scales()

    def _register_scales(self):
        """Per-channel µP scales of the in-projection output and out-projection input."""
        c, d = self.cfg, self.dims
        a, s, m = c.attention_in_multiplier, c.ssm_in_multiplier, c.ssm_multipliers
        attn = [a] * d.q + [a * c.key_multiplier] * d.kv + [a] * d.kv if self.attention else []
        ssm = ([s * m[0]] * d.z + [s * m[1]] * d.z + [s * m[2]] * d.bc + [s * m[3]] * d.bc
               + [s * m[4]] * d.dt) if self.mamba else []
        self.register_buffer("attn_in_scale", torch.tensor(attn, dtype=torch.float32), persistent=False)
        self.register_buffer("ssm_in_scale", torch.tensor(ssm, dtype=torch.float32), persistent=False)
        # Folded form (see `_scales_in_weights`): v rows also carry attention_out_multiplier
        # (o is linear in v); the conv output of the x channels carries ssm_out_multiplier
        # (y and D*x are linear in x), so no activation-sized scaling pass remains.
        attn_w = ([a] * d.q + [a * c.key_multiplier] * d.kv + [a * c.attention_out_multiplier] * d.kv
                  if self.attention else [])
        conv_out = [c.ssm_out_multiplier] * d.z + [1.0] * (2 * d.bc) if self.mamba else []
        self.register_buffer("attn_in_weight_scale", torch.tensor(attn_w, dtype=torch.float32), persistent=False)
        self.register_buffer("conv_out_scale", torch.tensor(conv_out, dtype=torch.float32), persistent=False)

    def _scales_in_weights(self) -> bool:
        """Apply the µP multipliers to weights (rows of the in-projection) and fused kernels
        instead of the activations: exact in real arithmetic, only rounding differs. Only for
        Megatron's plain linears (BitNet quantises the weight it is given, so scaling it
        first would change the quantisation) and without the gated RMSNorm (which would
        normalise a scale folded into x away)."""
        linears = [self.in_proj] if self.fused else (
            [self.attn_in_proj] * self.attention + [self.mamba_in_proj] * self.mamba)
        return (kernels.FAST_PATH.fold_scales and not self.cfg.mamba_rms_norm
                and all(type(m) is ColumnParallelLinear and not m.gradient_accumulation_fusion for m in linears))

    def _project_scaled(self, linear, u, *row_scales):
        """(u @ W^T) * s as u @ (W * s)^T: one weight-sized multiply instead of activation-sized
        ones forward and backward; autograd carries the scale into W's gradient. The [rows, 1]
        scale in W's dtype is built once (a kernel launch saved per layer and step)."""
        weight = linear.weight
        cache = self.__dict__.setdefault("_row_scale_cache", {})
        key = (id(linear), weight.device, weight.dtype)
        if key not in cache:
            cache[key] = torch.cat(row_scales).to(weight.device, weight.dtype)[:, None]
        return linear(u, weight=weight * cache[key])[0]

    # ---- branches on local heads; inputs [s, b, channels] ----
    def _attention(self, qkv, rotary_freqs):
        d, c = self.dims, self.cfg
        q, k, v = qkv.split([d.q, d.kv, d.kv], dim=-1)
        s, b = q.shape[:2]
        hd = c.kv_channels
        q, k, v = q.reshape(s, b, -1, hd), k.reshape(s, b, -1, hd), v.reshape(s, b, -1, hd)
        q = apply_rotary_pos_emb(q, rotary_freqs, config=self.config, mscale=rope.attention_scaling(c))
        k = apply_rotary_pos_emb(k, rotary_freqs, config=self.config, mscale=rope.attention_scaling(c))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        backend = "sdpa" if c.attention_backend == "auto" else c.attention_backend
        if self.context_parallel is not None:
            o = context_parallel_attention(q, k, v, hd ** -0.5, backend, self.context_parallel)
        else:
            o = kernels.causal_attention(q, k, v, scale=hd ** -0.5, backend=backend)
        return o.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _mamba(self, zxbcdt, folded: bool = False):
        """zxbcdt [s, b, .] (already µP-scaled) -> y [s, b, d_ssm] (as a transposed view).

        folded: ssm_out_multiplier is applied by the conv kernel to x (see _register_scales),
        so y comes out already scaled.
        """
        d, c, cp = self.dims, self.cfg, self.context_parallel
        fast = kernels.use_fast_path(c.kernel_backend, zxbcdt.device)
        gate_in_scan = not c.mamba_rms_norm and kernels.FAST_PATH.gate_in_scan  # kernel gates y * silu(z)
        if cp is None and kernels.fused_mamba_branch_applies(fast, self.conv1d_weight.shape[-1], gate_in_scan):
            from falcon_h1.kernels.mamba_branch import mamba_conv_scan

            y = mamba_conv_scan(zxbcdt.transpose(0, 1), self.conv1d_weight, self.conv1d_bias,
                                self.conv_out_scale if folded else None, -torch.exp(self.A_log.float()), self.D,
                                self.dt_bias, d.z, d.bc, d.ssm_heads, d.groups, c.mamba_chunk_size,
                                tuple(c.time_step_limit))
            return y.transpose(0, 1)
        # [b, s, .] views; under context parallelism this rank's chunks as a batch [chunks * b, c, .]
        zx = zxbcdt.transpose(0, 1) if cp is None else cp_mamba.as_chunk_batch(zxbcdt, cp)
        z, xBC, dt = zx.split([d.z, d.conv_channels, d.dt], dim=-1)
        conv_scale = self.conv_out_scale if folded else None
        if cp is None:
            xBC = kernels.causal_conv1d_silu(xBC, self.conv1d_weight, self.conv1d_bias, fast, out_scale=conv_scale)
        else:
            xBC = cp_mamba.causal_conv1d_silu(xBC, self.conv1d_weight, self.conv1d_bias, fast, conv_scale, cp)
        x, B, C = xBC.split([d.z, d.bc, d.bc], dim=-1)
        heads = lambda t, n: t.unflatten(-1, (n, -1))  # splitting the contiguous last dim: a view
        A, limit = -torch.exp(self.A_log.float()), tuple(c.time_step_limit)
        start = None if cp is None else cp_mamba.carried_in_states(
            heads(x, d.ssm_heads), dt, A, heads(B, d.groups), self.dt_bias, limit, cp)
        y = kernels.ssd_scan(
            heads(x, d.ssm_heads), dt, A, heads(B, d.groups), heads(C, d.groups),
            c.mamba_chunk_size, self.D, self.dt_bias, limit, fast,
            z=heads(z, d.ssm_heads) if gate_in_scan else None, initial_states=start,
        ).flatten(-2)
        if c.mamba_rms_norm:
            y = gated_rms_norm(y, z, self.norm_weight, d.groups, c.rms_norm_eps, c.mamba_norm_before_gate)
        elif not gate_in_scan:
            y = y * F.silu(z)
        return y.transpose(0, 1) if cp is None else cp_mamba.from_chunk_batch(y, cp)

    def forward(self, u, rotary_freqs):
        if self._scales_in_weights():
            return self._forward_folded(u, rotary_freqs)
        c = self.cfg
        if self.fused:
            proj, _ = self.in_proj(u)
            qkv, zxbcdt = proj.split([sum(self.dims.attention_in), sum(self.dims.mamba_in)], dim=-1)
        else:
            qkv = self.attn_in_proj(u)[0] if self.attention else None
            zxbcdt = self.mamba_in_proj(u)[0] if self.mamba else None
        parts = []
        if self.mamba:
            y = self._mamba(zxbcdt * self.ssm_in_scale.to(zxbcdt.dtype))
            parts.append(y * c.ssm_out_multiplier)
        if self.attention:
            o = self._attention(qkv * self.attn_in_scale.to(qkv.dtype), rotary_freqs)
            parts.append(o * c.attention_out_multiplier)
        return self._project_out(parts)

    def _forward_folded(self, u, rotary_freqs):
        """forward() with every µP multiplier folded (see _register_scales): same function."""
        attn_scale, ssm_scale = self.attn_in_weight_scale, self.ssm_in_scale
        if self.fused:
            proj = self._project_scaled(self.in_proj, u, attn_scale, ssm_scale)
            qkv, zxbcdt = proj.split([sum(self.dims.attention_in), sum(self.dims.mamba_in)], dim=-1)
        else:
            qkv = self._project_scaled(self.attn_in_proj, u, attn_scale) if self.attention else None
            zxbcdt = self._project_scaled(self.mamba_in_proj, u, ssm_scale) if self.mamba else None
        parts = []
        if self.mamba:
            parts.append(self._mamba(zxbcdt, folded=True))
        if self.attention:
            parts.append(self._attention(qkv, rotary_freqs))
        return self._project_out(parts)

    def _project_out(self, parts):
        """Out-projection of the branch outputs [s, b, .] (summed, or one GEMM over their concat)."""
        if self.fused:
            return self.out_proj(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0].contiguous())[0]
        out = None
        if self.mamba:
            out = self.mamba_out_proj(parts[0].contiguous())[0]
        if self.attention:
            attn = self.attn_out_proj(parts[-1])[0]
            out = attn if out is None else out + attn
        return out

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoint keys per logical tensor (q, k, ..., dt) so any TP size can load them."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        dp_cp = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(with_context_parallel=True)
        sd.update(make_sharded_tensors_for_checkpoint(
            own, prefix, {name: 0 for name in own}, sharded_offsets, tp_group=tp_group, dp_cp_group=dp_cp))
        d = self.dims
        attn_names = ["q", "k", "v"] if self.attention else []
        ssm_names = ["z", "x", "B", "C", "dt"] if self.mamba else []
        splits = {
            "in_proj.weight": (d.attention_in + d.mamba_in, attn_names + ssm_names, 0),
            "out_proj.weight": ([d.z] * self.mamba + [d.q] * self.attention,
                                ["ssm"] * self.mamba + ["attn"] * self.attention, 1),
            "attn_in_proj.weight": (d.attention_in, attn_names, 0),
            "mamba_in_proj.weight": (d.mamba_in, ssm_names, 0),
        }
        splits["conv1d_weight"] = ([d.z, d.bc, d.bc], ["x", "B", "C"], 0)
        splits["conv1d_bias"] = splits["conv1d_weight"]
        for name, (sections, names, dim) in splits.items():
            key = prefix + name
            if key in sd and len(sections) > 1:
                sd[key] = _split_factory(sd[key], sections, names, dim)
        return sd


class SwiGLUMLP(MegatronModule):
    """down(silu(gate(u) * m_gate) * up(u)) * m_down, gate/up in one column-parallel GEMM."""

    def __init__(self, cfg: FalconH1Config, config, bitnet_cfg=None):
        super().__init__(config)
        self.cfg = cfg
        tp = _tp_size()
        self.ffn_local = cfg.intermediate_size // tp
        self.linear_fc1 = _column(config, cfg.hidden_size, 2 * cfg.intermediate_size,
                                  _linear_class(bitnet_cfg, "mlp", "column"))
        self.linear_fc2 = _row(config, cfg.intermediate_size, cfg.hidden_size,
                               _linear_class(bitnet_cfg, "mlp", "row"))

    def forward(self, u):
        m_gate, m_down = self.cfg.mlp_multipliers
        fc1 = self.linear_fc1
        if not (kernels.FAST_PATH.fold_scales and type(fc1) is ColumnParallelLinear
                and not fc1.gradient_accumulation_fusion):
            gate, up = fc1(u)[0].chunk(2, dim=-1)
            return self.linear_fc2(F.silu(gate * m_gate) * up * m_down)[0]
        # silu(g * m_gate) * (up * m_down): both multipliers ride on fc1's weight rows (BitNet
        # layers above keep activation scaling: they quantise the weight they are given).
        h = fc1(u, weight=fc1.weight * self._fc1_row_scale(fc1.weight))[0]
        return self.linear_fc2(kernels.swiglu(h, kernels.use_fast_path(self.cfg.kernel_backend, h.device)))[0]

    def _fc1_row_scale(self, weight):
        cached = getattr(self, "_fc1_scale_cache", None)
        if cached is None or cached.device != weight.device or cached.dtype != weight.dtype:
            m_gate, m_down = self.cfg.mlp_multipliers
            cached = torch.tensor([m_gate] * self.ffn_local + [m_down] * self.ffn_local,
                                  dtype=torch.float32).to(weight.device, weight.dtype)[:, None]
            self._fc1_scale_cache = cached
        return cached

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = prefix + "linear_fc1.weight"
        sd[key] = _split_factory(sd[key], [self.ffn_local, self.ffn_local], ["gate", "up"], 0)
        return sd


class FalconH1Layer(MegatronModule):
    """norm -> mixer (attention ∥ Mamba-2) -> residual -> norm -> SwiGLU MLP -> residual."""

    def __init__(self, cfg: FalconH1Config, config, kind: str, bitnet_cfg=None,
                 context_parallel: Optional[ContextParallelLayout] = None):
        super().__init__(config)
        self.kind = kind
        attention, mamba = kind in ("hybrid", "attention"), kind in ("hybrid", "mamba")
        if attention or mamba:
            self.input_layernorm = RMSNorm(config, cfg.hidden_size, cfg.rms_norm_eps)
            self.mixer = ParallelHybridMixer(cfg, config, attention, mamba, bitnet_cfg, context_parallel)
        self.pre_ff_layernorm = RMSNorm(config, cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLUMLP(cfg, config, bitnet_cfg)

    def forward(self, h, rotary_freqs):
        if self.kind != "mlp":
            if self.config.recompute_granularity == "selective" and self.training:
                # the mixer (attention + SSM scan) holds most activations; recompute only it
                h = h + recompute(self._mix, h, rotary_freqs)
            else:
                h = h + self._mix(h, rotary_freqs)
        return h + self.mlp(self.pre_ff_layernorm(h))

    def _mix(self, h, rotary_freqs):
        return self.mixer(self.input_layernorm(h), rotary_freqs)
