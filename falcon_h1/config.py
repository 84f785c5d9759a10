"""Falcon-H1 model configuration.

Field names follow Hugging Face's `FalconH1Config` so HF configs map by eye;
fields after the HF block are this project's own (attention/SSM ratio, layer
pattern, fused projections, kernel choice).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from falcon_h1.errors import ConfigValueError, is_int_at_least
from falcon_h1.rope_parameters import scaling_type, validate_rope_scaling

# One character per decoder layer: H = parallel hybrid (attention + Mamba-2 side by
# side, then MLP), A = attention + MLP, M = Mamba-2 + MLP, "-" = MLP only.
LAYER_KINDS = {"H": "hybrid", "A": "attention", "M": "mamba", "-": "mlp"}
ATTENTION_BACKENDS = ("auto", "sdpa", "unfused")
KERNEL_BACKENDS = ("auto", "reference", "triton")
# whose Triton kernels run the SSD scan of the GPU path (falcon_h1.kernels: mamba_ssm's, or this
# project's kernels.ssd_fwd + kernels.ssd_bwd; benchmarks/NOTES.md compares them)
SSD_KERNELS = ("mamba_ssm", "own")
UNSUPPORTED_BIASES = ("projectors_bias", "attention_bias", "mlp_bias", "mamba_proj_bias")


@dataclass
class FalconH1Config:
    name: str = "falcon_h1_tiny"
    vocab_size: int = 320
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_theta: float = 1e11
    # Hugging Face's rope_parameters without rope_theta: None (plain RoPE) or {"rope_type": ..., ...};
    # every type FalconH1 runs is implemented in falcon_h1/rope.py.
    rope_scaling: Optional[dict[str, Any]] = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Mamba-2
    mamba_d_ssm: Optional[int] = 128  # None: mamba_expand * hidden_size
    mamba_expand: int = 2
    mamba_n_heads: int = 8
    mamba_d_head: Optional[int] = None  # None ("auto" in HF): mamba_d_ssm // mamba_n_heads
    mamba_n_groups: int = 1
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 32
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_rms_norm: bool = False
    mamba_norm_before_gate: bool = False
    time_step_limit: list[float] = field(default_factory=lambda: [0.0, math.inf])
    # Biases are not implemented (the released models have none): true is refused, not ignored.
    projectors_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # µP forward multipliers (non-learnable; carried as config, never folded into weights)
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: list[float] = field(default_factory=lambda: [1.0] * 5)  # z, x, B, C, dt
    mlp_multipliers: list[float] = field(default_factory=lambda: [1.0, 1.0])  # gate, down
    # --- this project's own ---
    # Fraction of the mixer width (attention q channels + SSM channels) given to
    # attention; None keeps the head counts above. See `apply_attention_ratio`.
    attention_ratio: Optional[float] = None
    # One char per layer from LAYER_KINDS; None = all "H" (the released models).
    layer_pattern: Optional[str] = None
    # One in-projection GEMM for [q,k,v,z,x,B,C,dt] and one out-projection over the
    # concatenated branch outputs (one TP all-reduce per mixer instead of two).
    fused_projections: bool = True
    attention_backend: str = "auto"
    kernel_backend: str = "auto"
    ssd_kernels: str = "mamba_ssm"
    # The fused Mamba branch keeps its conv output for the backward ([b, s, conv channels] a layer)
    # instead of recomputing it there (KernelOptions.mamba_keep_conv_output): faster where memory is spare.
    mamba_keep_conv_output: bool = False
    # Hugging Face config.json keys that do not change what the model computes (token ids,
    # use_cache, transformers_version, TII's own keys, ...) and the source's
    # generation_config.json: falcon_h1.from_hf keeps them, falcon_h1.to_hf writes them back.
    hf_extra_config: dict[str, Any] = field(default_factory=dict)
    hf_generation_config: Optional[dict[str, Any]] = None

    # ---- derived sizes ----
    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def d_ssm(self) -> int:
        return self.mamba_d_ssm if self.mamba_d_ssm is not None else self.mamba_expand * self.hidden_size

    @property
    def ssm_head_dim(self) -> int:
        return self.mamba_d_head if self.mamba_d_head is not None else self.d_ssm // max(self.mamba_n_heads, 1)

    @property
    def layer_kinds(self) -> list[str]:
        pattern = self.layer_pattern or "H" * self.num_hidden_layers
        return [LAYER_KINDS[c] for c in pattern]

    @property
    def has_attention(self) -> bool:
        return any(k in ("hybrid", "attention") for k in self.layer_kinds) and self.num_attention_heads > 0

    @property
    def has_mamba(self) -> bool:
        return any(k in ("hybrid", "mamba") for k in self.layer_kinds) and self.mamba_n_heads > 0

    def replace(self, **changes) -> "FalconH1Config":
        return dataclasses.replace(self, **changes)


def _fail(field_name: str, value, allowed: str) -> None:
    raise ConfigValueError(f"model.{field_name}", value, allowed)


def rope_type(cfg: FalconH1Config) -> str:
    return scaling_type(cfg.rope_scaling)


def check_rope_scaling(cfg: FalconH1Config) -> None:
    """validate_rope_scaling for this config; kv_channels (which divides by the head count) is
    only read when there is a rope_scaling to check."""
    if cfg.rope_scaling is not None:
        validate_rope_scaling(cfg.rope_scaling, cfg.kv_channels)


def fits_fused_mamba_branch(cfg: FalconH1Config) -> bool:
    """Whether the Mamba layers can take the fused conv + scan branch (kernels.mamba_branch): a
    width-4 conv, and the gate inside the scan (no gated RMSNorm between the scan and the gate: a
    norm after the gate, mamba_norm_before_gate = false, follows the branch)."""
    return cfg.mamba_d_conv == 4 and not (cfg.mamba_rms_norm and cfg.mamba_norm_before_gate)


def check_context_parallel(cfg: FalconH1Config, cp: int) -> None:
    """What context parallelism (parallel.cp) needs of the model config, beyond the sequence split."""
    if cp > 1 and cfg.has_mamba and cfg.ssd_kernels == "own":
        raise ConfigValueError(
            "model.ssd_kernels", cfg.ssd_kernels, "'mamba_ssm', or parallel.cp = 1",
            message=f"model.ssd_kernels = 'own' is not allowed with parallel.cp = {cp}: the own kernels run inside "
            "the fused Mamba branch, which scans each sequence from a zero state, and a context-parallel rank's "
            "chunks start from the previous rank's state (mamba_ssm's scan takes it); allowed: 'mamba_ssm', or "
            "parallel.cp = 1.")
    if cp > 1 and cfg.has_mamba and cfg.mamba_keep_conv_output:
        raise ConfigValueError(
            "model.mamba_keep_conv_output", True, "false, or parallel.cp = 1",
            message=f"model.mamba_keep_conv_output = true is not allowed with parallel.cp = {cp}: it keeps the "
            "fused Mamba branch's conv output, and context-parallel ranks take the unfused path (their chunks "
            "start from the previous rank's state), which keeps what its own autograd needs; allowed: false, "
            "or parallel.cp = 1.")
    if cp > 1 and cfg.has_attention and rope_type(cfg) in ("dynamic", "longrope"):
        raise ConfigValueError(
            "model.rope_scaling", cfg.rope_scaling, "another rope_type, or parallel.cp = 1",
            message=f"model.rope_scaling = {cfg.rope_scaling!r} is not allowed with parallel.cp = {cp}: rope_type "
            "dynamic and longrope pick their frequencies from the largest position in the batch, which each "
            "context-parallel rank sees only part of; allowed: another rope_type, or parallel.cp = 1.")


def apply_attention_ratio(cfg: FalconH1Config) -> FalconH1Config:
    """Re-split the mixer width between attention and SSM by `attention_ratio`.

    The mixer width W = num_attention_heads * head_dim + d_ssm of the base config
    is kept; attention gets round(ratio * W / head_dim) query heads, rounded to a
    multiple of num_key_value_heads, and the SSM the rest, in whole Mamba heads
    (a multiple of mamba_n_groups). ratio 0 gives Mamba-only mixers, 1 attention-only.
    """
    ratio = cfg.attention_ratio
    if ratio is None:
        return cfg
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0):
        _fail("attention_ratio", ratio, "a number in [0, 1] (fraction of mixer channels given to attention)")
    head_dim, ssm_head = cfg.kv_channels, cfg.ssm_head_dim
    width = cfg.num_attention_heads * head_dim + cfg.d_ssm
    kv = cfg.num_key_value_heads
    q_heads = int(round(ratio * width / head_dim / kv)) * kv
    if ratio > 0 and q_heads == 0:
        q_heads = kv
    if ratio == 1.0:
        q_heads = max(q_heads, kv)
    ssm_unit = ssm_head * cfg.mamba_n_groups
    ssm_width = 0 if ratio == 1.0 else max(width - q_heads * head_dim, 0) // ssm_unit * ssm_unit
    if ratio < 1.0 and ssm_width == 0:
        ssm_width = ssm_unit
    pattern = cfg.layer_pattern
    if ratio == 0.0:
        pattern = (pattern or "H" * cfg.num_hidden_layers).replace("H", "M").replace("A", "M")
    elif ratio == 1.0:
        pattern = (pattern or "H" * cfg.num_hidden_layers).replace("H", "A").replace("M", "A")
    return cfg.replace(
        num_attention_heads=q_heads if ratio > 0 else cfg.num_attention_heads,
        head_dim=head_dim,
        mamba_d_ssm=ssm_width if ratio < 1 else cfg.d_ssm,
        mamba_n_heads=ssm_width // ssm_head if ratio < 1 else cfg.mamba_n_heads,
        mamba_d_head=ssm_head,
        layer_pattern=pattern,
        attention_ratio=None,
    )


def validate(cfg: FalconH1Config, tp: int = 1) -> FalconH1Config:
    """Check a config (after `apply_attention_ratio`) for a tensor-parallel size.

    Raises ConfigValueError naming the field, the value and what is allowed.
    """
    positive = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "mamba_d_state", "mamba_d_conv", "mamba_chunk_size", "mamba_n_groups",
    ]
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            _fail(name, value, "a positive integer")
    if isinstance(cfg.rope_theta, bool) or not isinstance(cfg.rope_theta, (int, float)) or not cfg.rope_theta > 0:
        _fail("rope_theta", cfg.rope_theta, "a number > 0 (the base of the rotary embedding's frequencies)")
    if cfg.layer_pattern is not None:
        bad = sorted(set(cfg.layer_pattern) - set(LAYER_KINDS))
        if bad:
            _fail("layer_pattern", cfg.layer_pattern, f"one character per layer from {sorted(LAYER_KINDS)} "
                  "(H hybrid, A attention, M mamba, - MLP only)")
        if len(cfg.layer_pattern) != cfg.num_hidden_layers:
            _fail("layer_pattern", cfg.layer_pattern,
                  f"exactly num_hidden_layers = {cfg.num_hidden_layers} characters")
    if cfg.attention_ratio is not None:
        _fail("attention_ratio", cfg.attention_ratio, "resolved before validation (call apply_attention_ratio)")
    if cfg.attention_backend not in ATTENTION_BACKENDS:
        _fail("attention_backend", cfg.attention_backend, f"one of {ATTENTION_BACKENDS}")
    if cfg.kernel_backend not in KERNEL_BACKENDS:
        _fail("kernel_backend", cfg.kernel_backend, f"one of {KERNEL_BACKENDS}")
    if cfg.ssd_kernels not in SSD_KERNELS:
        _fail("ssd_kernels", cfg.ssd_kernels, f"one of {SSD_KERNELS}")
    if cfg.ssd_kernels == "own" and cfg.kernel_backend == "reference":
        _fail("ssd_kernels", cfg.ssd_kernels, "'mamba_ssm' under kernel_backend = 'reference' (the PyTorch "
              "reference runs no Triton scan; 'own' needs kernel_backend 'auto' or 'triton')")
    if cfg.ssd_kernels == "own" and cfg.has_mamba and not fits_fused_mamba_branch(cfg):
        _fail("ssd_kernels", cfg.ssd_kernels, "'mamba_ssm' here: the own kernels run inside the fused Mamba "
              f"branch, which takes mamba_d_conv = 4 and the gate before any gated RMSNorm (mamba_rms_norm = false "
              f"or mamba_norm_before_gate = false; got {cfg.mamba_d_conv}, {cfg.mamba_rms_norm} and "
              f"{cfg.mamba_norm_before_gate})")
    if not isinstance(cfg.mamba_keep_conv_output, bool):
        _fail("mamba_keep_conv_output", cfg.mamba_keep_conv_output, "true or false")
    if cfg.mamba_keep_conv_output and cfg.has_mamba and (cfg.kernel_backend == "reference"
                                                         or not fits_fused_mamba_branch(cfg)):
        _fail("mamba_keep_conv_output", cfg.mamba_keep_conv_output,
              "false here: only the fused Mamba branch recomputes its conv output, and these layers do not take "
              f"it (it needs kernel_backend 'auto' or 'triton', got {cfg.kernel_backend!r}; mamba_d_conv = 4, got "
              f"{cfg.mamba_d_conv}; the gate before any gated RMSNorm, got mamba_rms_norm = {cfg.mamba_rms_norm} "
              f"and mamba_norm_before_gate = {cfg.mamba_norm_before_gate})")
    if len(cfg.ssm_multipliers) != 5:
        _fail("ssm_multipliers", cfg.ssm_multipliers, "5 numbers (z, x, B, C, dt)")
    if len(cfg.mlp_multipliers) != 2:
        _fail("mlp_multipliers", cfg.mlp_multipliers, "2 numbers (gate, down)")
    if len(cfg.time_step_limit) != 2 or cfg.time_step_limit[0] > cfg.time_step_limit[1]:
        _fail("time_step_limit", cfg.time_step_limit, "[min, max] with min <= max")
    for name in UNSUPPORTED_BIASES:
        if getattr(cfg, name) is not False:
            _fail(name, getattr(cfg, name), "false (bias parameters are not implemented; the released "
                  "Falcon-H1 models have none)")
    check_rope_scaling(cfg)

    kinds = set(cfg.layer_kinds)
    if kinds & {"hybrid", "attention"}:
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        if not isinstance(heads, int) or heads <= 0:
            _fail("num_attention_heads", heads, "a positive integer when layers have attention")
        if cfg.head_dim is None and cfg.hidden_size % heads:
            _fail("num_attention_heads", heads,
                  f"a divisor of hidden_size = {cfg.hidden_size} (or set head_dim explicitly)")
        if not isinstance(kv, int) or kv <= 0 or heads % kv:
            _fail("num_key_value_heads", kv, f"a positive divisor of num_attention_heads = {heads}")
        if kv % tp:
            _fail("num_key_value_heads", kv,
                  f"a multiple of the tensor-parallel size parallel.tp = {tp} "
                  f"(each rank needs whole key/value heads)")
        if cfg.kv_channels % 2:
            _fail("head_dim", cfg.kv_channels, "an even number (rotary embeddings rotate pairs)")
    if kinds & {"hybrid", "mamba"}:
        d_ssm, nh = cfg.d_ssm, cfg.mamba_n_heads
        if not isinstance(nh, int) or nh <= 0:
            _fail("mamba_n_heads", nh, "a positive integer when layers have Mamba-2")
        if d_ssm % nh:
            _fail("mamba_n_heads", nh, f"a divisor of mamba_d_ssm = {d_ssm}")
        if cfg.ssm_head_dim * nh != d_ssm:
            _fail("mamba_d_head", cfg.mamba_d_head, f"mamba_d_ssm / mamba_n_heads = {d_ssm // nh}")
        if nh % cfg.mamba_n_groups:
            _fail("mamba_n_groups", cfg.mamba_n_groups, f"a divisor of mamba_n_heads = {nh}")
        if cfg.mamba_n_groups % tp:
            _fail("mamba_n_groups", cfg.mamba_n_groups,
                  f"a multiple of parallel.tp = {tp} (each rank needs whole B/C groups, as in Megatron's "
                  "MambaMixer); the released 0.5B-7B use 1 group: train them with data/pipeline "
                  "parallelism, or pretrain from scratch with model.mamba_n_groups a multiple of tp")
        if nh % tp:
            _fail("mamba_n_heads", nh, f"a multiple of parallel.tp = {tp}")
    if cfg.intermediate_size % tp:
        _fail("intermediate_size", cfg.intermediate_size, f"a multiple of parallel.tp = {tp}")
    return cfg


def resolve(cfg: FalconH1Config, tp: int = 1) -> FalconH1Config:
    """Apply the attention ratio and validate: the config a model is built from."""
    return validate(apply_attention_ratio(cfg), tp)


def check_recompute_layers(recompute: str, recompute_layers: Optional[int], layers_per_stage: int,
                           field: str = "recompute_layers") -> None:
    """Refuse a count of recomputed layers the model cannot honour (`field`: the setting's name
    in the caller's terms). None recomputes every layer; N, only the first N of each pipeline
    stage, so the others keep their activations (Megatron's "block" method)."""
    if recompute_layers is None:
        return
    if recompute != "full":
        raise ConfigValueError(field, recompute_layers,
                               f"null unless the recomputation is full (it is {recompute!r}): it picks how many "
                               "layers the full recomputation covers")
    if not is_int_at_least(recompute_layers, 1) or recompute_layers > layers_per_stage:
        raise ConfigValueError(field, recompute_layers,
                               f"null (every layer) or an integer in 1..{layers_per_stage} (the layers of one "
                               "pipeline stage)")
