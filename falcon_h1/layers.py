"""The Falcon-H1 decoder layer on Megatron Core parts.

Tensors flow in Megatron's [sequence, batch, hidden] layout. Column/row-parallel
linears shard the projections the Megatron way; everything between them (RoPE,
attention, conv, SSD scan, gating) works on the rank's local heads.

The mixer runs attention and Mamba-2 on the same normed input. With
`fused_projections` one column-parallel GEMM produces [q, k, v, z, x, B, C, dt]
and one row-parallel GEMM projects the concatenated branch outputs [y_ssm, o_attn]
(summing two out-projections equals one over the concatenation), so a mixer costs
one tensor-parallel all-reduce instead of two.

The linear classes come from the model's LinearSpec (falcon_h1.linears), the kernels' choices
from its KernelOptions (falcon_h1.kernels), both fixed when the model is built. µP multipliers
are config, never baked into stored weights: they scale the projection inputs/outputs, or, where
the in-projection supports it, ride on its output rows (the weight it is handed, or BitNet's
`output_row_scale` after quantising) and the conv output at each step (`scales_in_weights`),
which is the same function with less activation traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from falcon_h1 import kernels, rope
from falcon_h1.config import FalconH1Config, fits_fused_mamba_branch
from falcon_h1.context_parallel import ContextParallelLayout, context_parallel_attention
from falcon_h1.context_parallel import mamba as cp_mamba
from falcon_h1.kernels import KernelOptions
from falcon_h1.kernels.document_attention import packed_attention_backend
from falcon_h1.linears import LinearSpec, project_row_scaled, supports_row_scaling
from falcon_h1.megatron_compat.transformer import recompute


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

    def __init__(self, config, hidden_size: int, eps: float, kernel_options: KernelOptions):
        super().__init__(config)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        _mark_sequence_parallel(self.weight, config)
        self.eps = eps
        self.fused, self.triton = kernel_options.fused_rms_norm, kernel_options.triton_rms_norm

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps, self.fused, self.triton)

    def add_and_norm(self, x, delta):
        """(x + delta, its norm): the residual add before this norm, fused with it on the Triton path."""
        return kernels.residual_rms_norm(x, delta, self.weight, self.eps, self.fused, self.triton)


def _column(cfg_t, in_size, out_size, cls):
    return cls(in_size, out_size, config=cfg_t, init_method=cfg_t.init_method, bias=False,
               gather_output=False, skip_bias_add=True)


def _row(cfg_t, in_size, out_size, cls):
    return cls(in_size, out_size, config=cfg_t, init_method=cfg_t.output_layer_init_method,
               bias=False, input_is_parallel=True, skip_bias_add=True)


def _register_row_scale(module: torch.nn.Module, name: str, values: list[float], dtype: torch.dtype) -> None:
    """A constant per-row weight scale [rows, 1] (fp32 values rounded once to the weight's dtype),
    kept as a buffer so it follows the module's .to() and is never cast or copied per step (a
    kernel launch saved per layer and step, and nothing for a CUDA graph to capture)."""
    scale = torch.tensor(values, dtype=torch.float32).to(dtype)[:, None]
    module.register_buffer(name, scale, persistent=False)


class ParallelHybridMixer(MegatronModule):
    """Attention and/or Mamba-2 on the same input; outputs summed."""

    def __init__(self, cfg: FalconH1Config, config, attention: bool, mamba: bool, linears: LinearSpec,
                 kernel_options: KernelOptions, context_parallel: Optional[ContextParallelLayout] = None):
        super().__init__(config)
        self.cfg, self.attention, self.mamba = cfg, attention, mamba
        self.kernel_options = kernel_options
        self.context_parallel = context_parallel  # this rank's chunks of each sequence; None: all of it
        tp = _tp_size()
        dims = self.dims = LocalDims.of(cfg, tp, attention, mamba)
        self.fused = cfg.fused_projections
        H = cfg.hidden_size
        if self.fused:
            # Each segment stands for its unfused projection (under BitNet: quantised as that one
            # alone would be, with its own switch), so fusing keeps the model.
            in_segments = ([("qkv", sum(dims.attention_in), "attention_qkv")] * attention
                           + [("zxbcdt", sum(dims.mamba_in), "mamba_in")] * mamba)
            out_segments = [("y_ssm", dims.z, "mamba_out")] * mamba + [("o_attn", dims.q, "attention_out")] * attention
            self.in_proj = _column(config, H, tp * sum(dims.attention_in + dims.mamba_in),
                                   linears.fused_linear(in_segments, "column"))
            self.out_proj = _row(config, tp * (dims.z + dims.q), H, linears.fused_linear(out_segments, "row"))
        else:
            if attention:
                self.attn_in_proj = _column(config, H, tp * sum(dims.attention_in),
                                            linears.linear("attention_qkv", "column"))
                self.attn_out_proj = _row(config, tp * dims.q, H, linears.linear("attention_out", "row"))
            if mamba:
                self.mamba_in_proj = _column(config, H, tp * sum(dims.mamba_in), linears.linear("mamba_in", "column"))
                self.mamba_out_proj = _row(config, tp * dims.z, H, linears.linear("mamba_out", "row"))
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
        # the scan kernel gates y * silu(z) itself unless the gated RMSNorm normalises y before the
        # gate (mamba_norm_before_gate); with the gate first, the norm of the gated output follows
        self.gate_in_scan = kernel_options.gate_in_scan and not (cfg.mamba_rms_norm and cfg.mamba_norm_before_gate)
        # the fused branch scans each sequence from a zero state: not a context-parallel shard
        self.fused_mamba_branch = (mamba and kernel_options.fused_mamba_branch and kernel_options.gate_in_scan
                                   and fits_fused_mamba_branch(cfg) and context_parallel is None)
        own_scan = kernel_options.own_ssd_forward or kernel_options.own_ssd_backward
        if mamba and own_scan and not self.fused_mamba_branch:
            raise ValueError(
                "the own SSD kernels (model.ssd_kernels = 'own', KernelOptions.own_ssd_*) run inside the fused "
                "Mamba branch, which this layer does not take: it needs KernelOptions.fused_mamba_branch and "
                f"gate_in_scan, mamba_d_conv = 4 (got {cfg.mamba_d_conv}), the gate before any gated RMSNorm "
                f"(mamba_rms_norm = false or mamba_norm_before_gate = false; got {cfg.mamba_rms_norm} and "
                f"{cfg.mamba_norm_before_gate}) and no context parallelism; use model.ssd_kernels = 'mamba_ssm'")
        self.scales_in_weights = self._scales_fold_into_weights()
        # fused projections: the fused branch writes its gradient into the whole in-projection's
        # gradient and the split copies the attention columns in beside it instead of concatenating
        # (kernels.mamba_branch.split_in_projection); the branch must take the projection's own
        # columns (scales folded into the weights: no scaling pass between)
        self.shares_in_projection_gradient = (self.fused and self.attention and self.fused_mamba_branch
                                              and self.scales_in_weights
                                              and kernel_options.shared_in_projection_gradient)
        self._register_scales()

    def _in_projections(self) -> list[str]:
        return ["in_proj"] if self.fused else ["attn_in_proj"] * self.attention + ["mamba_in_proj"] * self.mamba

    def _scales_fold_into_weights(self) -> bool:
        """Whether the µP multipliers ride on the in-projection's weight rows and the conv output
        instead of the activations: exact in real arithmetic, only rounding differs. Needs
        in-projections that take per-row output scales (falcon_h1.linears.supports_row_scaling). The
        out-projection is not asked: it sees the same input either way (y and o come out of the
        branches already scaled), so a quantising out-projection quantises the same values."""
        return (self.kernel_options.fold_scales
                and all(supports_row_scaling(getattr(self, name)) for name in self._in_projections()))

    def _register_scales(self):
        """Per-channel µP scales: of the in-projection output and out-projection input, or, folded
        (`scales_in_weights`), of the in-projection's weight rows and the conv output."""
        c, d = self.cfg, self.dims
        a, s, m = c.attention_in_multiplier, c.ssm_in_multiplier, c.ssm_multipliers
        attn = [a] * d.q + [a * c.key_multiplier] * d.kv + [a] * d.kv if self.attention else []
        ssm = ([s * m[0]] * d.z + [s * m[1]] * d.z + [s * m[2]] * d.bc + [s * m[3]] * d.bc
               + [s * m[4]] * d.dt) if self.mamba else []
        self.register_buffer("attn_in_scale", torch.tensor(attn, dtype=torch.float32), persistent=False)
        self.register_buffer("ssm_in_scale", torch.tensor(ssm, dtype=torch.float32), persistent=False)
        # Folded: v rows also carry attention_out_multiplier (o is linear in v); the conv output
        # of the x channels carries ssm_out_multiplier (y and D*x are linear in x), so no
        # activation-sized scaling pass remains. A gated RMSNorm would normalise that scale away:
        # there the norm's output carries it (norm_out_scale).
        attn_rows = ([a] * d.q + [a * c.key_multiplier] * d.kv + [a * c.attention_out_multiplier] * d.kv
                     if self.attention else [])
        x_out = 1.0 if c.mamba_rms_norm else c.ssm_out_multiplier
        conv_out = [x_out] * d.z + [1.0] * (2 * d.bc) if self.mamba else []
        self.register_buffer("conv_out_scale", torch.tensor(conv_out, dtype=torch.float32), persistent=False)
        self.norm_out_scale = c.ssm_out_multiplier if self.scales_in_weights and c.mamba_rms_norm else 1.0
        if self.scales_in_weights:
            rows = [attn_rows + ssm] if self.fused else [attn_rows] * self.attention + [ssm] * self.mamba
            for name, values in zip(self._in_projections(), rows):
                _register_row_scale(self, f"{name}_row_scale", values, getattr(self, name).weight.dtype)

    def _project_in(self, name: str, u):
        """u @ W^T of the in-projection `name`, its rows µP-scaled when the scales are folded."""
        linear = getattr(self, name)
        if self.scales_in_weights:
            return project_row_scaled(linear, u, getattr(self, f"{name}_row_scale"),
                                      self.kernel_options.triton_row_scale)
        return linear(u)[0]

    # ---- branches on local heads; inputs [s, b, channels] ----
    def _attention(self, qkv, rotary_freqs, documents, in_projection_gradient=None):
        """in_projection_gradient: split_in_projection's, qkv being its attention columns."""
        d, c = self.dims, self.cfg
        s, b = qkv.shape[:2]
        hd = c.kv_channels
        q, k, v = kernels.rotary_qkv(qkv, rotary_freqs, d.q, d.kv, hd, rope.attention_scaling(c),
                                     self.kernel_options.triton_rotary, gradient=in_projection_gradient,
                                     one_launch=self.kernel_options.rotary_one_launch)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        backend = "sdpa" if c.attention_backend == "auto" else c.attention_backend
        if self.context_parallel is not None:
            o = context_parallel_attention(q, k, v, hd ** -0.5, backend, self.context_parallel)
        else:
            if documents is not None and c.attention_backend == "auto":
                backend = packed_attention_backend(self.kernel_options.packed_attention, q)
            o = kernels.causal_attention(q, k, v, scale=hd ** -0.5, backend=backend, documents=documents)
        o = o.permute(2, 0, 1, 3)  # [s, b, heads, d]: kernels.out_projection_input reads it in place
        return o if self.fused and self.kernel_options.triton_out_projection_input else o.reshape(s, b, -1)

    def _mamba(self, zxbcdt, seq_idx, in_projection_gradient=None):
        """zxbcdt [s, b, .] (already µP-scaled) -> y [s, b, d_ssm] (as a transposed view); with the
        scales folded, ssm_out_multiplier is applied by the conv to x, so y comes out scaled.
        seq_idx [b, s] (packed rows, else None): conv window and SSM state restart per document.
        in_projection_gradient: split_in_projection's, zxbcdt being its Mamba columns (fused branch)."""
        d, c, k, cp = self.dims, self.cfg, self.kernel_options, self.context_parallel
        conv_scale = self.conv_out_scale if self.scales_in_weights else None
        if self.fused_mamba_branch:
            from falcon_h1.kernels.mamba_branch import mamba_conv_scan

            y = mamba_conv_scan(zxbcdt.transpose(0, 1), self.conv1d_weight, self.conv1d_bias, conv_scale,
                                -torch.exp(self.A_log.float()), self.D, self.dt_bias, d.z, d.bc, d.ssm_heads,
                                d.groups, c.mamba_chunk_size, tuple(c.time_step_limit), seq_idx=seq_idx,
                                keep_forward_states=k.ssd_keep_forward_states, own_forward=k.own_ssd_forward,
                                own_backward=k.own_ssd_backward, in_projection_gradient=in_projection_gradient,
                                keep_conv_output=k.mamba_keep_conv_output,
                                streaming_conv=k.streaming_conv)
            return self._norm_gated(y.transpose(0, 1))
        # [b, s, .] views; under context parallelism this rank's chunks as a batch [chunks * b, c, .]
        zx = zxbcdt.transpose(0, 1) if cp is None else cp_mamba.as_chunk_batch(zxbcdt, cp)
        z, xBC, dt = zx.split([d.z, d.conv_channels, d.dt], dim=-1)
        if cp is None:
            xBC = kernels.causal_conv1d_silu(xBC, self.conv1d_weight, self.conv1d_bias, k.triton_conv,
                                             out_scale=conv_scale, seq_idx=seq_idx,
                                             streaming=k.streaming_conv)
        else:
            xBC = cp_mamba.causal_conv1d_silu(xBC, self.conv1d_weight, self.conv1d_bias, k.triton_conv, conv_scale,
                                              cp, streaming=k.streaming_conv)
        x, B, C = xBC.split([d.z, d.bc, d.bc], dim=-1)
        heads = lambda t, n: t.unflatten(-1, (n, -1))  # splitting the contiguous last dim: a view
        A, limit = -torch.exp(self.A_log.float()), tuple(c.time_step_limit)
        start = None if cp is None else cp_mamba.carried_in_states(
            heads(x, d.ssm_heads), dt, A, heads(B, d.groups), self.dt_bias, limit, cp)
        y = kernels.ssd_scan(
            heads(x, d.ssm_heads), dt, A, heads(B, d.groups), heads(C, d.groups),
            c.mamba_chunk_size, self.D, self.dt_bias, limit, k.triton_ssd,
            z=heads(z, d.ssm_heads) if self.gate_in_scan else None, seq_idx=seq_idx, initial_states=start,
        ).flatten(-2)
        if cp is None:  # [s, b, .] before the norm, which then writes the out-projection's layout
            y, z = y.transpose(0, 1), z.transpose(0, 1)
        y = self._norm_gated(y) if self.gate_in_scan else self.gated_output(y, z)
        return y if cp is None else cp_mamba.from_chunk_batch(y, cp)

    def _norm_gated(self, y):
        """The scan's gated output y [..., d_ssm] -> the branch output: with mamba_rms_norm (gate
        first), its group-wise RMSNorm; on the Triton path an [s, b, .] y comes out contiguous."""
        c, k = self.cfg, self.kernel_options
        if not c.mamba_rms_norm:
            return y
        return kernels.group_rms_norm(y, self.norm_weight, self.dims.groups, c.rms_norm_eps, self.norm_out_scale,
                                      k.triton_rms_norm)

    def gated_output(self, y, z):
        """The scan's ungated output y [..., d_ssm] gated by z as this layer's branch does (the gated
        RMSNorm, or y * silu(z)); a decode step gates its one-token output with it too."""
        c = self.cfg
        if c.mamba_rms_norm:
            return kernels.gated_rms_norm_reference(y, z, self.norm_weight, self.dims.groups, c.rms_norm_eps,
                                                    c.mamba_norm_before_gate, self.norm_out_scale)
        return y * F.silu(z)

    def forward(self, u, rotary_freqs, documents=None):
        """documents: kernels.documents.Documents of packed rows (None: one document per row)."""
        qkv, zxbcdt, gradient = self._branch_inputs(u, self.shares_in_projection_gradient and torch.is_grad_enabled())
        seq_idx = documents.seq_idx if documents is not None else None
        y = self._mamba(zxbcdt, seq_idx, in_projection_gradient=gradient) if self.mamba else None
        o = self._attention(qkv, rotary_freqs, documents, in_projection_gradient=gradient) if self.attention else None
        return self.branch_outputs_combined(y, o)

    def branch_inputs(self, u):
        """u [s, b, H] -> (qkv, zxbcdt) [s, b, .] of this rank's heads as the branches take them,
        µP-scaled (by the in-projection itself when the scales are folded); None for an absent
        branch. Generation's decode step starts from these too."""
        qkv, zxbcdt, _ = self._branch_inputs(u, share_gradient=False)
        return qkv, zxbcdt

    def _branch_inputs(self, u, share_gradient: bool):
        """branch_inputs and, with share_gradient (shares_in_projection_gradient, in training), the
        InProjectionGradient the fused branch writes the projection's gradient into (else None)."""
        gradient = None
        if self.fused:
            projection, offset = self._project_in("in_proj", u), sum(self.dims.attention_in)
            if share_gradient:
                from falcon_h1.kernels.mamba_branch import split_in_projection

                qkv, zxbcdt, gradient = split_in_projection(projection, offset)
            else:
                qkv, zxbcdt = projection.split([offset, sum(self.dims.mamba_in)], dim=-1)
        else:
            qkv = self._project_in("attn_in_proj", u) if self.attention else None
            zxbcdt = self._project_in("mamba_in_proj", u) if self.mamba else None
        if not self.scales_in_weights:
            qkv = qkv * self.attn_in_scale.to(qkv.dtype) if self.attention else None
            zxbcdt = zxbcdt * self.ssm_in_scale.to(zxbcdt.dtype) if self.mamba else None
        return qkv, zxbcdt, gradient

    def branch_outputs_combined(self, y_ssm, o_attn):
        """The branches' outputs [s, b, .] (None for an absent branch) -> mixer output [s, b, H]:
        their out multipliers (already carried by the v rows and the conv output when the scales
        are folded), then the out-projection."""
        c, folded = self.cfg, self.scales_in_weights
        parts = []
        if self.mamba:
            parts.append(y_ssm if folded else y_ssm * c.ssm_out_multiplier)
        if self.attention:
            parts.append(o_attn if folded else o_attn * c.attention_out_multiplier)
        return self._project_out(parts)

    def _project_out(self, parts):
        """Out-projection of the branch outputs [s, b, ...] (summed, or one GEMM over them side by side)."""
        if self.fused:
            from falcon_h1.kernels.out_projection_input import out_projection_input

            return self.out_proj(out_projection_input(parts, self.kernel_options.triton_out_projection_input))[0]
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

    def __init__(self, cfg: FalconH1Config, config, linears: LinearSpec, kernel_options: KernelOptions):
        super().__init__(config)
        self.cfg = cfg
        tp = _tp_size()
        self.ffn_local = cfg.intermediate_size // tp
        self.linear_fc1 = _column(config, cfg.hidden_size, 2 * cfg.intermediate_size, linears.linear("mlp", "column"))
        self.linear_fc2 = _row(config, cfg.intermediate_size, cfg.hidden_size, linears.linear("mlp", "row"))
        self.triton_swiglu, self.triton_row_scale = kernel_options.triton_swiglu, kernel_options.triton_row_scale
        # silu(g * m_gate) * (up * m_down): both multipliers can ride on fc1's weight rows
        self.scales_in_weights = kernel_options.fold_scales and supports_row_scaling(self.linear_fc1)
        if self.scales_in_weights:
            m_gate, m_down = cfg.mlp_multipliers
            _register_row_scale(self, "fc1_row_scale", [m_gate] * self.ffn_local + [m_down] * self.ffn_local,
                                self.linear_fc1.weight.dtype)

    def forward(self, u):
        if self.scales_in_weights:
            h = kernels.swiglu(project_row_scaled(self.linear_fc1, u, self.fc1_row_scale, self.triton_row_scale),
                               self.triton_swiglu)
        else:
            m_gate, m_down = self.cfg.mlp_multipliers
            gate, up = self.linear_fc1(u)[0].chunk(2, dim=-1)
            h = F.silu(gate * m_gate) * up * m_down
        return self.linear_fc2(h)[0]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = prefix + "linear_fc1.weight"
        sd[key] = _split_factory(sd[key], [self.ffn_local, self.ffn_local], ["gate", "up"], 0)
        return sd


class FalconH1Layer(MegatronModule):
    """norm -> mixer (attention ∥ Mamba-2) -> residual -> norm -> SwiGLU MLP -> residual."""

    def __init__(self, cfg: FalconH1Config, config, kind: str, linears: LinearSpec, kernel_options: KernelOptions,
                 context_parallel: Optional[ContextParallelLayout] = None):
        super().__init__(config)
        self.kind = kind
        attention, mamba = kind in ("hybrid", "attention"), kind in ("hybrid", "mamba")
        if attention or mamba:
            self.input_layernorm = RMSNorm(config, cfg.hidden_size, cfg.rms_norm_eps, kernel_options)
            self.mixer = ParallelHybridMixer(cfg, config, attention, mamba, linears, kernel_options, context_parallel)
        self.pre_ff_layernorm = RMSNorm(config, cfg.hidden_size, cfg.rms_norm_eps, kernel_options)
        self.mlp = SwiGLUMLP(cfg, config, linears, kernel_options)

    def forward(self, h, rotary_freqs, documents=None, pending=None, defer_mlp_add=False):
        """The residual stream entering the layer is h + pending. pending (None: nothing) is the
        previous layer's MLP output not yet added: the layer's first norm adds it in its own pass,
        and its backward adds the stream's gradient there too, so neither the add nor the
        accumulation of h's two gradients is a pass of its own. defer_mlp_add: return (h, the MLP's
        output) for the next layer (or the final norm) to add the same way, else h + that output."""
        if self.kind == "mlp":
            h, normed = _add_and_norm(self.pre_ff_layernorm, h, pending)
        else:
            if self.config.recompute_granularity == "selective" and self.training:
                # the mixer (attention + SSM scan) holds most activations; recompute only it, saving
                # the layer's input alone (documents ride in the function: Megatron's checkpoint
                # saves tensor arguments only)
                h = h if pending is None else h + pending
                mixed = recompute(partial(self._mix, documents=documents), h, rotary_freqs)
            else:
                h, normed_input = _add_and_norm(self.input_layernorm, h, pending)
                mixed = self.mixer(normed_input, rotary_freqs, documents)
            h, normed = self.pre_ff_layernorm.add_and_norm(h, mixed)
        out = self.mlp(normed)
        return (h, out) if defer_mlp_add else h + out

    def _mix(self, h, rotary_freqs, documents=None):
        return self.mixer(self.input_layernorm(h), rotary_freqs, documents)


def _add_and_norm(norm: RMSNorm, h, pending):
    """(h + pending, its norm) in one pass; (h, its norm) without a pending add."""
    return (h, norm(h)) if pending is None else norm.add_and_norm(h, pending)
